"""`deltafleet train` through typer's runner, and a real SIGINT (Ctrl-C) during training."""

from __future__ import annotations

import json
import os
import re
import signal

from typer.testing import CliRunner

from deltafleet.cli import app
from deltafleet.dtypes import native_bf16
from deltafleet.train.checkpoint import latest_checkpoint
from deltafleet.train.config import TrainConfig
from deltafleet.train.recipe import DeferredInterrupt, train

runner = CliRunner()


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)


def test_train_command_writes_an_adapter(chat_tiny, tmp_path):
    out = tmp_path / "tenant"
    args = ["train", "--base", str(chat_tiny), "--task", "multiplication", "--method", "lora", "--steps", "3",
            "--batch-size", "2", "--rank", "4", "--alpha", "8", "--targets", "q_proj,v_proj",
            "--eval-examples", "2", "--out", str(out)]
    result = runner.invoke(app, args, env={"COLUMNS": "200"})
    text = _plain(result.output)
    assert result.exit_code == 0, text
    assert re.search(r"3 steps in [\d.]+ s training \([\d.]+ s wall\), \d+ tokens/s; 2,048 trainable params; "
                     r"loss [\d.]+ -> [\d.]+", text), text
    assert re.search(r"val_loss [\d.]+, val_accuracy [\d.]+", text)
    peft_cfg = json.loads((out / "adapter_config.json").read_text())
    assert peft_cfg["r"] == 4 and peft_cfg["lora_alpha"] == 8 and sorted(peft_cfg["target_modules"]) == [
        "q_proj", "v_proj"]
    hp = json.loads((out / "deltafleet.json").read_text())["hyperparameters"]
    assert hp["lora_rank"] == 4 and hp["targets"] == ["q_proj", "v_proj"] and hp["lr"] == 3e-4
    assert hp["precision"] == ("bf16" if native_bf16() else "fp32")


def test_train_command_refuses_bad_settings(tmp_path):
    result = runner.invoke(app, ["train", "--task", "sort", "--method", "dora", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "method='dora': must be one of" in _plain(result.output)
    result = runner.invoke(app, ["train", "--task", "sort", "--method", "road", "--road-variant", "road_8",
                                 "--out", str(tmp_path)])
    assert result.exit_code == 2 and "road_variant='road_8'" in _plain(result.output)


def test_sigint_is_deferred_to_a_safe_point():
    before = signal.getsignal(signal.SIGINT)  # default_int_handler, or SIG_IGN when run in the background
    with DeferredInterrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.requested
        try:
            interrupt.check()
            raise AssertionError("check() must raise after a SIGINT")
        except KeyboardInterrupt:
            pass
    assert signal.getsignal(signal.SIGINT) is before


def test_ctrl_c_during_training_saves_a_checkpoint(chat_tiny, tmp_path):
    def ctrl_c(step, loss):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)

    cfg = TrainConfig(base=str(chat_tiny), task="caesar", method="road", out=tmp_path, steps=5, batch_size=2,
                      precision="fp32", eval_examples=2)
    before = signal.getsignal(signal.SIGINT)
    result = train(cfg, show_progress=False, on_step=ctrl_c)
    assert not result.completed and result.steps == 2
    assert latest_checkpoint(tmp_path).name == "step-00000002"
    assert json.loads((tmp_path / "deltafleet.json").read_text())["completed"] is False
    assert signal.getsignal(signal.SIGINT) is before


def test_train_command_new_methods_and_their_options(chat_tiny, tmp_path, monkeypatch):
    """PaFi, HiWi and MEFT through the CLI: their options reach the manifest, bad values are refused."""
    monkeypatch.setenv("DELTAFLEET_CACHE_DIR", str(tmp_path / "cache"))
    common = ["train", "--base", str(chat_tiny), "--task", "sort", "--steps", "1", "--batch-size", "2",
              "--eval-examples", "1", "--precision", "fp32"]
    cases = {"pafi": (["--pafi-density", "0.05", "--targets", "q_proj,down_proj"], {"pafi_density": 0.05}),
             "hiwi": (["--hiwi-bottleneck", "8", "--targets", "post_attention_layernorm"], {"hiwi_bottleneck": 8}),
             "meft": (["--meft-variant", "meft3", "--meft-rev-layers", "1", "--meft-bottleneck", "4"],
                      {"meft_variant": "meft3", "meft_rev_layers": 1, "meft_bottleneck": 4})}
    for method, (opts, want) in cases.items():
        out = tmp_path / method
        result = runner.invoke(app, [*common, "--method", method, *opts, "--out", str(out)], env={"COLUMNS": "200"})
        assert result.exit_code == 0, _plain(result.output)
        manifest = json.loads((out / "deltafleet.json").read_text())
        assert manifest["method"] == method and manifest["steps"] == 1
        assert {k: manifest["hyperparameters"][k] for k in want} == want, manifest["hyperparameters"]
    bad = {"pafi": ["--pafi-density", "1.5"], "hiwi": ["--targets", "q_proj"], "meft": ["--meft-variant", "meft9"]}
    for method, opts in bad.items():
        result = runner.invoke(app, [*common, "--method", method, *opts, "--out", str(tmp_path / "bad")])
        assert result.exit_code == 2, (method, _plain(result.output))
