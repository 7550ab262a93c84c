"""Every registered task: disjoint splits, determinism, correct answers, scoring; and the tasks CLI."""

from __future__ import annotations

import json
import re

import pytest
from typer.testing import CliRunner

from deltafleet.cli import app
from deltafleet.errors import DeltafleetError
from deltafleet.tasks import SPLITS, TASKS, GeneratedTask, SplitSizes, exact_match, get_task, normalize, perplexity
from deltafleet.tasks.arithmetic import CONVERSIONS, has_carry
from deltafleet.tasks.shakespeare import parse_play
from deltafleet.tasks.words import caesar, pig_latin_word

EXACT = sorted(n for n, t in TASKS.items() if t.kind == "exact_match")


def test_registry_has_eight_exact_tasks_and_shakespeare():
    assert len(EXACT) >= 8
    assert TASKS["shakespeare"].kind == "perplexity"
    with pytest.raises(DeltafleetError, match="task 'nope': unknown"):
        get_task("nope")


@pytest.mark.parametrize("name", sorted(TASKS))
def test_splits_are_disjoint_and_full_size(name):
    task = TASKS[name]
    splits = {s: task.examples(s) for s in SPLITS}
    for s in SPLITS:
        assert len(splits[s]) == task.sizes[s]
        assert len({ex.prompt for ex in splits[s]}) == len(splits[s]) or task.kind == "perplexity"
    for a, b in [("train", "val"), ("train", "test"), ("val", "test")]:
        assert not {ex.key for ex in splits[a]} & {ex.key for ex in splits[b]}, (a, b)
        assert not {ex.prompt for ex in splits[a]} & {ex.prompt for ex in splits[b]}, (a, b)
    # another seed draws other examples, still within the same split
    other = {ex.key for ex in task.examples("test", n=min(20, task.sizes.test), seed=7)}
    assert not other & ({ex.key for ex in splits["train"]} | {ex.key for ex in splits["val"]})


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_same_examples(name):
    task = TASKS[name]
    a = task.examples("val", n=10, seed=3)
    assert a == task.examples("val", n=10, seed=3)
    assert a != task.examples("val", n=10, seed=4)
    assert all(ex.prompt.strip() and ex.answer.strip() for ex in a)


@pytest.mark.parametrize("name", EXACT)
def test_answers_are_short_and_score_one(name):
    task = TASKS[name]
    for ex in task.examples("train", n=50):
        assert len(ex.answer) <= 60 and "\n" not in ex.answer
        assert task.score(ex.answer, ex) == 1.0
        assert task.score("  " + ex.answer.replace(" ", "\n ") + "\t", ex) == 1.0  # whitespace only
        assert task.score(ex.answer + ".", ex) == 0.0


def _answer_checks(name: str, prompt: str, answer: str) -> None:
    numbers = [int(x) for x in re.findall(r"\d+", prompt)]
    if name == "addition":
        a, b = numbers[:2]
        assert int(answer) == a + b and has_carry(a, b)
    elif name == "multiplication":
        a, b = numbers[:2]
        assert int(answer) == a * b and 10 <= a <= 99 and 2 <= b <= 9
    elif name == "sort":
        assert [int(x) for x in answer.split(", ")] == sorted(numbers)
    elif name == "reverse-words":
        words = prompt.split(": ", 1)[1].split(".")[0].split()
        assert answer.split() == words[::-1]
    elif name == "json-field":
        field = prompt.split("Extract the ", 1)[1].split(" ", 1)[0]
        value = json.loads(answer)[field]
        assert str(value) in prompt.split("Sentence: ", 1)[1]


@pytest.mark.parametrize("name", ["addition", "multiplication", "sort", "reverse-words", "json-field"])
def test_answers_are_correct(name):
    for ex in TASKS[name].examples("test", n=30):
        _answer_checks(name, ex.prompt, ex.answer)


def test_word_transforms():
    assert caesar("zebra", 3) == "cheud"
    assert caesar("abc", 25) == "zab"
    assert [pig_latin_word(w) for w in ("string", "apple", "queen", "rhythm", "yellow", "chair")] == [
        "ingstray", "appleway", "eenquay", "ythmrhay", "ellowyay", "airchay"]
    assert has_carry(15, 5) and has_carry(950, 70) and not has_carry(123, 456)


def test_unit_conversion_rephrasings_share_a_split():
    task = TASKS["unit-conversion"]
    by_key: dict[str, set[str]] = {}
    for s in SPLITS:
        for ex in task.examples(s):
            by_key.setdefault(ex.key, set()).add(s)
    assert all(len(s) == 1 for s in by_key.values())
    factors = {(src, dst): factor for src, dst, factor, _ in CONVERSIONS}
    for ex in task.examples("test", n=30):
        v, src, _, dst = ex.key.split()
        assert int(ex.answer) == int(v) * factors[src, dst]
        assert f" {v} {src}" in ex.prompt and f"How many {dst} is that?" in ex.prompt


def test_shakespeare_split_by_play():
    task = TASKS["shakespeare"]
    plays = {s: set(task.plays(s)) for s in SPLITS}
    assert len(plays["test"]) == 4 and len(plays["val"]) == 3 and len(plays["train"]) == 31
    assert not (plays["train"] & plays["val"]) and not (plays["train"] & plays["test"])
    assert {ex.key for ex in task.examples("test")} == plays["test"]
    ex = task.examples("val", n=1)[0]
    assert ex.prompt.startswith("Continue this scene from Shakespeare's ")
    assert 1 <= len(ex.answer.splitlines()) <= 4


def test_parse_play_joins_verse_after_stage_directions():
    text = ("# Macbeth\n\n## ACT I\n\n## SCENE I. A heath.\n\n_Thunder._\n\n**First Witch**  \nWhen shall we three"
            "  \nmeet again\n\n_Exit_\n\nIn thunder?\n\n**Second Witch**  \nWhen the hurlyburly's done.\n\n"
            "### SCENE II. A camp.\n\n**DUNCAN**  \nWhat bloody man is that?\n")
    title, scenes = parse_play(text)
    assert title == "Macbeth"
    assert [[s.speaker for s in sc] for sc in scenes] == [["First Witch", "Second Witch"], ["DUNCAN"]]
    assert scenes[0][0].lines == ("When shall we three", "meet again", "In thunder?")


def test_scoring_and_perplexity():
    assert normalize("  a \n b\t c ") == "a b c"
    assert exact_match(" 42\n", "42") == 1.0 and exact_match("42.", "42") == 0.0
    assert exact_match("4 2", "42") == 0.0
    assert perplexity(2 * 3.0, 2) == pytest.approx(20.0855, rel=1e-4)
    with pytest.raises(ValueError, match="n_tokens=0"):
        perplexity(1.0, 0)


def test_too_small_problem_space_is_refused():
    task = GeneratedTask(name="tiny-space", description="x", sizes=SplitSizes(train=5, val=5, test=5),
                         draw=lambda rng: TASKS["multiplication"].draw(rng))
    with pytest.raises(DeltafleetError, match="only .* distinct test examples"):
        task.examples("test", n=200)
    with pytest.raises(ValueError, match="val=0: split sizes must be positive"):
        SplitSizes(train=1, val=0, test=1)


runner = CliRunner()


def test_cli_tasks_list_and_sample():
    result = runner.invoke(app, ["tasks", "list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for name in TASKS:
        assert name in result.output
    assert re.search(r"multiplication\s*│\s*exact_match\s*│.*│\s*450\s*│\s*40\s*│\s*50", result.output)
    result = runner.invoke(app, ["tasks", "sample", "sort", "-n", "2", "--split", "test", "--seed", "5"],
                           env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    for ex in TASKS["sort"].examples("test", n=2, seed=5):
        assert f"answer: {ex.answer}" in result.output
    result = runner.invoke(app, ["tasks", "sample", "sort", "--split", "dev"])
    assert result.exit_code == 2 and "split='dev'" in result.output
