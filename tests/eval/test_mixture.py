"""The `all-tasks` mixture: balanced interleaving of every exact-match task, disjoint splits, member scoring."""

from __future__ import annotations

from collections import Counter

import pytest

from deltafleet.errors import DeltafleetError
from deltafleet.tasks import TASKS, get_task
from deltafleet.tasks.mixture import ALL_TASKS, MixtureTask


def test_members_are_every_exact_match_task():
    mix = get_task(ALL_TASKS)
    assert set(mix.member_names()) == {n for n, t in TASKS.items() if t.kind == "exact_match" and n != ALL_TASKS}
    assert "shakespeare" not in mix.member_names() and mix.kind == "exact_match"


def test_interleaved_balanced_and_disjoint():
    mix = MixtureTask("mix-test", "test", members=("sort", "multiplication", "caesar"), per_task=100)
    train = mix.examples("train", seed=3)
    assert len(train) == 300 == mix.sizes.train
    assert Counter(mix.member_of(ex) for ex in train[:30]) == {"sort": 10, "multiplication": 10, "caesar": 10}
    assert [ex.prompt for ex in train if mix.member_of(ex) == "sort"] == [
        ex.prompt for ex in get_task("sort").examples("train", n=100, seed=3)]
    test_keys = {ex.key for ex in mix.examples("test", seed=3)}
    assert not test_keys & {ex.key for ex in train}
    assert mix.examples("val", n=5, seed=3) == mix.examples("val", seed=3)[:5]
    ex = train[1]
    assert mix.score(f"  {ex.answer} ", ex) == 1.0 and mix.score(ex.answer + "0", ex) == 0.0


def test_refuses_open_text_members_and_too_many():
    with pytest.raises(DeltafleetError, match="member 'shakespeare' is perplexity"):
        MixtureTask("m", "m", members=("sort", "shakespeare")).examples("val")
    with pytest.raises(DeltafleetError, match="n=999"):
        MixtureTask("m", "m", members=("caesar",), per_task=10).examples("val", n=999)
