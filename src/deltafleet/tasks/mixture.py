"""A multi-task mixture: several exact-match tasks trained jointly as one task (the zoo's broad fine-tune).

`MixtureTask.examples(split, n, seed)` takes up to `per_task` examples of each member's split (fewer where the
member's split is smaller) and interleaves them round-robin, so every prefix of the list is balanced across
members and a training run of any length sees all of them. Keys are prefixed with the member's name, so the
members' disjoint splits stay disjoint. Scoring uses the member that produced the example (found by its key).

Importing this module registers `all-tasks`: every registered exact-match task, `per_task` 2000 train
examples (the members' default split sizes cap it). Open-text tasks are left out: the training recipe's
validation metric is chosen per task kind, and a mixture has one kind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltafleet.errors import DeltafleetError
from deltafleet.tasks.base import TASKS, Example, SplitSizes, check_split, get_task, register_task

SEP = "\0"


@dataclass(frozen=True)
class MixtureTask:
    name: str
    description: str
    members: tuple[str, ...] | None = None  # None: every registered exact-match task, resolved on use
    per_task: int = 2000
    kind: ClassVar[str] = "exact_match"

    def member_names(self) -> tuple[str, ...]:
        if self.members is not None:
            return self.members
        return tuple(sorted(n for n, t in TASKS.items() if t.kind == "exact_match" and n != self.name))

    def _count(self, member: str, split: str) -> int:
        return min(self.per_task, get_task(member).sizes[split])

    @property
    def sizes(self) -> SplitSizes:
        counts = {s: sum(self._count(m, s) for m in self.member_names()) for s in ("train", "val", "test")}
        return SplitSizes(**counts)

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        check_split(split)
        pools = []
        for m in self.member_names():
            task = get_task(m)
            if task.kind != "exact_match":
                raise DeltafleetError(f"mixture {self.name!r}: member {m!r} is {task.kind}; must be exact_match")
            pools.append([Example(ex.prompt, ex.answer, f"{m}{SEP}{ex.key}")
                          for ex in task.examples(split, n=self._count(m, split), seed=seed)])
        mixed = [pool[i] for i in range(max(map(len, pools), default=0)) for pool in pools if i < len(pool)]
        if n is not None and not 0 <= n <= len(mixed):
            raise DeltafleetError(f"task {self.name!r}: n={n}, but the {split} split has {len(mixed)} examples")
        return mixed if n is None else mixed[:n]

    def member_of(self, example: Example) -> str:
        return example.key.split(SEP, 1)[0]

    def score(self, prediction: str, example: Example) -> float:
        return get_task(self.member_of(example)).score(prediction, example)


ALL_TASKS = "all-tasks"
register_task(MixtureTask(ALL_TASKS, "every exact-match task jointly, interleaved round-robin"))
