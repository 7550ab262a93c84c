"""What a tenant task is: examples in disjoint splits, a metric, and the registry of tasks.

An `Example` is a user prompt and the assistant's answer. Each example also has a `key`, the canonical
problem it poses (by default the prompt itself; the play's name for Shakespeare; the quantity and units for a
unit conversion). The split of an example is a pure function of `(task name, key)` (a SHA-256 bucket), so
train, validation and test are disjoint by construction, whatever seed or count is asked for, and two phrasings
of one problem can never land in different splits.

Metrics (`Task.kind`):
- `exact_match`: the answer is short; a prediction scores 1.0 when it equals the answer after whitespace
  normalisation (strip, collapse runs of whitespace to one space), else 0.0;
- `perplexity`: open text; scored by the model's perplexity on the answer tokens of held-out examples,
  `exp(total NLL / total answer tokens)`.
"""

from __future__ import annotations

import hashlib
import math
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from deltafleet.errors import DeltafleetError
from deltafleet.registry import Registry

SPLITS = ("train", "val", "test")
KINDS = ("exact_match", "perplexity")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


@dataclass(frozen=True)
class Example:
    """One tenant request: `prompt` is the user message, `answer` the assistant message; `key` decides the split."""

    prompt: str
    answer: str
    key: str


@dataclass(frozen=True)
class SplitSizes:
    """How many examples a split holds by default (a generated task can produce more on request)."""

    train: int
    val: int
    test: int

    def __post_init__(self) -> None:
        for split in SPLITS:
            n = getattr(self, split)
            if not isinstance(n, int) or n <= 0:
                raise ValueError(f"{split}={n!r}: split sizes must be positive integers")

    def __getitem__(self, split: str) -> int:
        check_split(split)
        return getattr(self, split)


def check_split(split: str) -> None:
    if split not in SPLITS:
        raise DeltafleetError(f"split={split!r}: must be one of {SPLITS}")


def split_of(task_name: str, key: str, fractions: tuple[float, float, float] = DEFAULT_FRACTIONS) -> str:
    """The split of a problem: SHA-256 of `task_name NUL key` read as a number in [0, 1), cut at `fractions`."""
    digest = hashlib.sha256(f"{task_name}\0{key}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < fractions[0]:
        return "train"
    return "val" if u < fractions[0] + fractions[1] else "test"


def normalize(text: str) -> str:
    """Whitespace normalisation only: strip the ends, collapse internal runs of whitespace to one space."""
    return " ".join(text.split())


def exact_match(prediction: str, answer: str) -> float:
    return 1.0 if normalize(prediction) == normalize(answer) else 0.0


def perplexity(total_nll: float, n_tokens: int) -> float:
    """exp(mean NLL per answer token); `total_nll` is in nats, summed over `n_tokens` tokens."""
    if n_tokens <= 0:
        raise ValueError(f"n_tokens={n_tokens}: perplexity needs at least one token")
    return math.exp(total_nll / n_tokens)


class Task(Protocol):
    """A tenant task. `examples` is deterministic in (split, n, seed); splits never share a key."""

    name: str
    kind: str
    description: str

    @property
    def sizes(self) -> SplitSizes: ...

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]: ...


@dataclass(frozen=True)
class GeneratedTask:
    """An exact-match task drawn from a seeded generator `draw(rng) -> Example` (a pure function of the rng).

    `examples(split, n, seed)` draws from `random.Random("{name}/{split}/{seed}")`, keeps the first `n`
    distinct keys whose hash bucket is `split`, and fails (naming the task) if the problem space is too small.
    """

    name: str
    description: str
    draw: Callable[[random.Random], Example]
    sizes: SplitSizes
    kind: ClassVar[str] = "exact_match"
    max_draws_per_example: ClassVar[int] = 200

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        check_split(split)
        n = self.sizes[split] if n is None else n
        if n < 0:
            raise DeltafleetError(f"n={n}: must be >= 0")
        rng = random.Random(f"{self.name}/{split}/{seed}")
        seen: set[str] = set()
        out: list[Example] = []
        budget = self.max_draws_per_example * n + 1000
        for _ in range(budget):
            if len(out) == n:
                break
            ex = self.draw(rng)
            if ex.key in seen or split_of(self.name, ex.key) != split:
                continue
            seen.add(ex.key)
            out.append(ex)
        if len(out) < n:
            raise DeltafleetError(
                f"task {self.name!r}: only {len(out)} distinct {split} examples in {budget} draws; n={n} is too many"
            )
        return out

    def score(self, prediction: str, example: Example) -> float:
        return exact_match(prediction, example.answer)


def _check_task(name: str, task: Task) -> None:
    if task.kind not in KINDS:
        raise ValueError(f"task {name!r}: kind={task.kind!r} must be one of {KINDS}")


TASKS: Registry[Task] = Registry("task", _check_task)


def register_task(task: Task) -> Task:
    return TASKS.register(task.name, task)


def get_task(name: str) -> Task:
    if name not in TASKS:
        raise DeltafleetError(f"task {name!r}: unknown; known tasks: {', '.join(sorted(TASKS))}")
    return TASKS[name]
