"""Fine-tuning on a quantized base through the training recipe (zero LoRA and a LoRA initialisation), and the
quantize / lowbit-ppl commands through typer's CliRunner."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from deltafleet.cli.bench import lowbit_bench_command
from deltafleet.cli.quant import lowbit_ppl_command, quantize_command
from deltafleet.errors import ArtifactError
from deltafleet.models.loading import load_model
from deltafleet.quant.base import LORA_INIT
from deltafleet.quant.pipeline import quantize_base
from deltafleet.store.fingerprint import base_fingerprint
from deltafleet.train.config import TrainConfig
from deltafleet.train.recipe import train
from tests.quant.conftest import tiny_config
from tests.train.conftest import chat_tiny, smollm2_tokenizer  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def chat_loftq(chat_tiny, tmp_path_factory):  # noqa: F811
    d = tmp_path_factory.mktemp("chat-loftq") / "base"
    quantize_base(chat_tiny, tiny_config("loftq", 2, rank=4, alpha=8.0), d)
    return d


def _cfg(base, out, **kw):
    return TrainConfig(base=str(base), task="sort", method="lora", out=out, steps=4, batch_size=4, lr=1e-2,
                       precision="fp32", eval_examples=0, save_every=0, lora_rank=4, lora_alpha=8.0, **kw)


def test_train_from_lora_init_on_quantized_base(chat_loftq, tmp_path):
    zero = train(_cfg(chat_loftq, tmp_path / "zero"), show_progress=False)
    init = train(_cfg(chat_loftq, tmp_path / "init", lora_init=chat_loftq / LORA_INIT), show_progress=False)
    assert zero.completed and init.completed
    assert init.losses[0] != pytest.approx(zero.losses[0], rel=1e-4)  # started from the LoftQ factors
    manifest = json.loads((tmp_path / "init" / "deltafleet.json").read_text())
    assert manifest["base_fingerprint"] == base_fingerprint(chat_loftq)
    assert manifest["hyperparameters"]["lora_init"] == str(chat_loftq / LORA_INIT)
    # The exported adapter serves on the quantized base through our loader.
    from deltafleet.adapters import load_adapter

    model, _ = load_model(chat_loftq)
    adapter = load_adapter(tmp_path / "init", model.config, expected_fingerprint=base_fingerprint(chat_loftq))
    ids = torch.tensor([[1, 5, 9, 30]])
    with torch.no_grad():
        assert (model(ids, hook=adapter.hook()) - model(ids)).abs().max() > 1e-4


def test_lora_init_must_match_rank_and_method(chat_loftq, tmp_path):
    with pytest.raises(ArtifactError, match=r"adapter_config.json: r=4, but this run uses 8"):
        train(TrainConfig(base=str(chat_loftq), task="sort", method="lora", out=tmp_path / "o", steps=1,
                          precision="fp32", eval_examples=0, lora_rank=8, lora_alpha=8.0,
                          lora_init=chat_loftq / LORA_INIT), show_progress=False)
    with pytest.raises(ValueError, match="lora_init=.*only method 'lora'"):
        TrainConfig(base=str(chat_loftq), task="sort", method="road", out=tmp_path / "o",
                    lora_init=chat_loftq / LORA_INIT)


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("quantize")(quantize_command)
    app.command("lowbit-ppl")(lowbit_ppl_command)
    app.command("lowbit-bench")(lowbit_bench_command)
    return app


def test_main_app_has_the_three_commands():
    from deltafleet.cli import app

    r = CliRunner().invoke(app, ["--help"])
    assert r.exit_code == 0 and all(c in r.output for c in ("quantize", "lowbit-ppl"))
    r = CliRunner().invoke(app, ["bench", "--help"])
    assert r.exit_code == 0 and "lowbit" in r.output


def test_cli_quantize_ppl_and_bench(chat_tiny, tmp_path, monkeypatch):  # noqa: F811
    import deltafleet.tasks.text as calib

    monkeypatch.setattr(calib, "shakespeare_text", lambda split: "To be, or not to be, that is the question. " * 400)
    runner = CliRunner()
    out = tmp_path / "q"
    r = runner.invoke(_app(), ["quantize", "--base", str(chat_tiny), "--bits", "4", "--method", "rtn",
                               "--out", str(out)])
    assert r.exit_code == 0, r.output
    assert "of bf16" in r.output and (out / "quantized.safetensors").is_file()
    r = runner.invoke(_app(), ["lowbit-ppl", "--base", str(out), "--windows", "2", "--seq-len", "16", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["perplexity"] > 1
    r = runner.invoke(_app(), ["lowbit-bench", "--base", str(out), "--batch", "2", "--prompt-len", "4",
                               "--max-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)
    assert row["quantized"] and row["decode_tokens"] == 4 and row["kernel"] == "native" and row["cache_bytes"] == 0
    r = runner.invoke(_app(), ["quantize", "--base", str(chat_tiny), "--bits", "5", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "bits=5" in r.output
    r = runner.invoke(_app(), ["quantize", "--base", str(out), "--out", str(tmp_path / "y")])
    assert r.exit_code == 2 and "already a quantized base" in r.output


def test_cli_onebit_quantize_resume_train_and_bench(chat_tiny, tmp_path, monkeypatch):  # noqa: F811
    """`quantize --method onebit` (SVID + a few distillation steps on text), `--resume` of an interrupted run,
    then LoRA and RoAd fine-tuning with `--base ONEBIT_DIR` and the decode bench on it."""
    import deltafleet.tasks.text as calib
    from deltafleet.quant.onebit_kd import CHECKPOINT_DIR, CURVES

    monkeypatch.setattr(calib, "shakespeare_text", lambda split: "To be, or not to be, that is the question. " * 400)
    runner = CliRunner()
    out = tmp_path / "ob"
    args = ["quantize", "--base", str(chat_tiny), "--method", "onebit", "--kd-steps", "4", "--kd-windows", "8",
            "--kd-seq-len", "16", "--kd-save-every", "2", "--no-progress", "--out", str(out)]
    r = runner.invoke(_app(), args)
    assert r.exit_code == 0, r.output
    assert "onebit 1-bit in" in r.output and "group" not in r.output and (out / CURVES).is_file()
    manifest = json.loads((out / "deltafleet.json").read_text())
    assert manifest["codec"] == "sign" and manifest["stats"]["kd"]["steps"] == 4
    # a checkpoint left by an interrupted run: refused without --resume, continued with it
    out2 = tmp_path / "ob2"
    (out2 / CHECKPOINT_DIR).mkdir(parents=True)
    import torch as _torch

    _torch.save({"settings": {}}, out2 / CHECKPOINT_DIR / "checkpoint.pt")
    r = runner.invoke(_app(), [*args[:-1], str(out2)])
    assert r.exit_code == 2 and "pass --resume" in r.output
    r = runner.invoke(_app(), [*args[:-1], str(out2), "--resume"])
    assert r.exit_code == 2 and "other settings" in r.output
    r = runner.invoke(_app(), ["quantize", "--base", str(chat_tiny), "--method", "onebit", "--bits", "2",
                               "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "onebit quantizes to 1 bits" in r.output
    for method in ("lora", "road"):
        res = train(TrainConfig(base=str(out), task="sort", method=method, out=tmp_path / method, steps=3,
                                batch_size=4, lr=1e-2, precision="fp32", eval_examples=0, save_every=0,
                                lora_rank=4, lora_alpha=8.0), show_progress=False)
        assert res.completed and all(loss == loss for loss in res.losses)
        m = json.loads((tmp_path / method / "deltafleet.json").read_text())
        assert m["base_fingerprint"] == base_fingerprint(out)
    r = runner.invoke(_app(), ["lowbit-bench", "--base", str(out), "--batch", "2", "--prompt-len", "4",
                               "--max-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    row = json.loads(r.output)
    assert row["quantized"] and row["kernel"] == "native" and row["decode_tokens"] == 4
    r = runner.invoke(_app(), ["lowbit-bench", "--base", str(chat_tiny), "--base", str(out), "--adapters", "4",
                               "--rounds", "2", "--batch", "4", "--prompt-len", "4", "--max-tokens", "3", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.output)
    assert [row["quantized"] for row in rep["rows"]] == [False, True] and rep["rows"][0]["vs_first"] == 1.0
    assert all(len(row["runs"]) == 2 and row["decode_tokens"] == 8 for row in rep["rows"])
    from deltafleet.cli import app

    text = tmp_path / "t.txt"
    text.write_text("To be, or not to be, that is the question. " * 40)
    for extra in ([], ["--adapter", str(tmp_path / "lora")]):
        r = runner.invoke(app, ["eval", "ppl", "--text", str(text), "--base", str(out), "--window", "16",
                                "--max-windows", "2", "--json", *extra])
        assert r.exit_code == 0, r.output
        assert json.loads(r.output)["ppl"] > 1
