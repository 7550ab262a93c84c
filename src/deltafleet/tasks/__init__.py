"""Tenant tasks: seeded generators with disjoint train/val/test splits, exact-match or perplexity scoring,
and chat-template encoding. Importing this package registers every built-in task in `TASKS`.
"""

# registers the tasks; `mixture` adds all-tasks, whose members are read from the registry when used
from deltafleet.tasks import arithmetic, extraction, lists, mixture, shakespeare, words  # noqa: F401
from deltafleet.tasks.base import (
    KINDS,
    SPLITS,
    TASKS,
    Example,
    GeneratedTask,
    SplitSizes,
    Task,
    exact_match,
    get_task,
    normalize,
    perplexity,
    register_task,
    split_of,
)
from deltafleet.tasks.chat import EncodedExample, encode_example, end_of_turn_id, prompt_ids

__all__ = [
    "KINDS", "SPLITS", "TASKS", "EncodedExample", "Example", "GeneratedTask", "SplitSizes", "Task",
    "encode_example", "end_of_turn_id", "exact_match", "get_task", "normalize", "perplexity", "prompt_ids",
    "register_task", "split_of",
]
