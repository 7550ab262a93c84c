"""CI's scaled-down end-to-end check: a few training steps per method on the tiny model (the loss goes down), then
`deltafleet eval` over the trained adapters through the engine, and `deltafleet eval ppl`, via the CLI groups
registered as in deltafleet.cli."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from deltafleet.cli.eval import eval_app, zoo_app
from deltafleet.eval.perplexity import perplexity
from deltafleet.models.loading import load_model
from deltafleet.train.config import TrainConfig
from deltafleet.train.recipe import train

# lr well above the method defaults: a handful of steps on a random tiny model must move the loss.
FAST = {"lora": 1e-2, "road": 3e-2, "ia3": 3e-2}
STEPS = 6

app = typer.Typer()
app.add_typer(eval_app, name="eval")
app.add_typer(zoo_app, name="zoo")
runner = CliRunner()


@pytest.fixture(scope="module")
def trained(chat_tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("trained")
    losses = {}
    for method in ("lora", "road", "ia3"):
        cfg = TrainConfig(base=str(chat_tiny), task="sort", method=method, out=root / f"sort-{method}", steps=STEPS,
                          batch_size=4, lr=FAST[method], precision="fp32", eval_examples=2, save_every=0)
        losses[method] = train(cfg, show_progress=False).losses
    return root, losses


def test_train_then_eval(chat_tiny, trained, tmp_path):
    root, losses = trained
    for method, ls in losses.items():
        assert len(ls) == STEPS and sum(ls[-2:]) / 2 < ls[0] - 0.05, (method, ls)
    results = tmp_path / "results.json"
    r = runner.invoke(app, ["eval", "--base", str(chat_tiny), "--adapters", str(root), "--examples", "4", "--json",
                            "--results", str(results)])
    assert r.exit_code == 0, r.output
    report = json.loads(r.output)
    assert list(report["tenants"]) == ["base", "sort-ia3", "sort-lora", "sort-road"]
    for name, t in report["tenants"].items():
        s = t["scores"]["sort"]
        assert s["metric"] == "accuracy" and s["n"] == 4 and 0.0 <= s["value"] <= 1.0, name
    assert report["tenants"]["sort-lora"]["trainable_params"] > report["tenants"]["sort-road"]["trainable_params"] > 0
    assert report["tenants"]["sort-lora"]["steps"] == STEPS and report["tenants"]["sort-lora"]["bytes"] > 0
    assert sorted(report["engines"][0]["tenants"]) == ["base", "sort-lora", "sort-road"]  # mixed in one engine
    saved = json.loads(results.read_text())
    assert saved["command"].startswith("deltafleet eval --base") and saved["table"][0]["task"] == "sort"
    assert set(saved["table"][0]["cells"]) == {"base", "lora", "road", "ia3"}

    r = runner.invoke(app, ["eval", "--base", str(chat_tiny), "--adapters", str(root), "--examples", "2"])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # rich wraps long lines at the terminal width
    assert "| task (metric, n) | base | lora | road | ia3 |" in text and "engine run: 3 tenant(s)" in text


def test_eval_ppl_cli(chat_tiny, trained, tmp_path, smollm2_tokenizer):
    root, _ = trained
    text = tmp_path / "text.txt"
    text.write_text("To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer\n" * 4)
    r = runner.invoke(app, ["eval", "ppl", "--base", str(chat_tiny), "--adapter", str(root / "sort-lora"),
                            "--text", str(text), "--window", "16", "--json"])
    assert r.exit_code == 0, r.output
    got = json.loads(r.output)
    from deltafleet.adapters import load_adapter

    model, _ = load_model(chat_tiny)
    want = perplexity(model, smollm2_tokenizer, text.read_text(), window=16,
                      hook=load_adapter(root / "sort-lora", model.config).hook())
    # the same function on the same inputs in this process, and JSON round-trips floats: exact
    assert got["ppl"] == want["ppl"] and got["tokens"] == want["tokens"]
    r = runner.invoke(app, ["eval", "ppl", "--base", str(chat_tiny), "--adapter", str(root / "sort-ia3"),
                            "--text", str(text), "--window", "16"])
    assert r.exit_code == 0 and "perplexity" in r.output, r.output


def test_cli_errors(chat_tiny, tmp_path):
    r = runner.invoke(app, ["eval", "--base", str(chat_tiny), "--tasks", "nope"])
    assert r.exit_code == 2 and "task 'nope': unknown" in r.output
    r = runner.invoke(app, ["eval", "--base", str(chat_tiny), "--adapters", str(tmp_path / "missing")])
    assert r.exit_code == 2 and "adapters directory not found" in " ".join(r.output.split())  # rich wraps lines
    r = runner.invoke(app, ["zoo", "build", "--base", str(chat_tiny), "--out", str(tmp_path / "z"), "--tasks",
                            "sort", "--steps", "2", "--dry-run"])
    assert r.exit_code == 0 and "broad-full" in r.output and "missing" in r.output, r.output
