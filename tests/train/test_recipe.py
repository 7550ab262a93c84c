"""The training recipe end to end on a tiny model with SmolLM2's tokenizer: loss goes down for every method,
outputs load back (peft, deltafleet's loader, transformers), resume equals an uninterrupted run, Ctrl-C saves."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM

from deltafleet.adapters import load_adapter
from deltafleet.errors import DeltafleetError
from deltafleet.eval.core import validation_metrics
from deltafleet.models.config import ModelConfig
from deltafleet.models.loading import load_model
from deltafleet.store.fingerprint import base_fingerprint
from deltafleet.train import recipe
from deltafleet.train.checkpoint import latest_checkpoint
from deltafleet.train.config import TrainConfig
from tests.conftest import assert_close, forward_chain, token_batch

train = functools.partial(recipe.train, validate=validation_metrics)  # the validation `deltafleet train` runs

# lr well above the method defaults: 8 steps on a random tiny model must move the loss.
FAST = {"lora": 1e-2, "road": 3e-2, "ia3": 3e-2, "full": 1e-3}


def _cfg(base, out, method, **kw):
    settings = {"task": "sort", "steps": 8, "batch_size": 4, "lr": FAST[method], "precision": "fp32",
                "eval_examples": 4, "save_every": 0, **kw}
    return TrainConfig(base=str(base), method=method, out=out, **settings)


def _tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


@pytest.mark.parametrize("method", ["lora", "road", "ia3", "full"])
def test_loss_goes_down_and_manifest_is_complete(chat_tiny, tmp_path, method):
    precision = "bf16" if method == "road" else "fp32"  # one method through the bf16 autocast path
    result = train(_cfg(chat_tiny, tmp_path / "out", method, precision=precision), show_progress=False)
    assert result.completed and result.steps == 8 and len(result.losses) == 8
    assert sum(result.losses[-2:]) / 2 < result.losses[0] - 0.1, result.losses
    manifest = json.loads((tmp_path / "out" / "deltafleet.json").read_text())
    assert manifest["schema_version"] == 1 and manifest["kind"] == method and manifest["method"] == method
    assert manifest["base_fingerprint"] == base_fingerprint(chat_tiny)
    assert manifest["base_model"] == str(chat_tiny) and manifest["task"] == "sort" and manifest["steps"] == 8
    assert manifest["hyperparameters"]["lr"] == FAST[method]
    assert manifest["hyperparameters"]["precision"] == precision
    assert set(manifest["final_metrics"]) == {"val_loss", "val_accuracy"}
    assert 0 < manifest["final_metrics"]["val_loss"] < result.losses[0]
    assert 0.0 <= manifest["final_metrics"]["val_accuracy"] <= 1.0
    assert manifest["trainable_params"] == result.trainable_params > 0 and manifest["train_seconds"] > 0
    files = {p.name for p in (tmp_path / "out").rglob("*") if p.is_file()}
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)


@pytest.mark.parametrize("method", ["lora", "road"])
def test_adapter_loads_into_peft_and_deltafleet_with_equal_logits(chat_tiny, tmp_path, method):
    out = tmp_path / "out"
    train(_cfg(chat_tiny, out, method, steps=4), show_progress=False)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == method.upper() and len(cfg["target_modules"]) == 7
    n_saved = sum(t.numel() for t in _tensors(out / "adapter_model.safetensors").values())
    assert n_saved == json.loads((out / "deltafleet.json").read_text())["trainable_params"]

    hf = AutoModelForCausalLM.from_pretrained(str(chat_tiny), dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(hf, str(out)).eval()
    model, _ = load_model(chat_tiny)
    adapter = load_adapter(out, model.config, expected_fingerprint=base_fingerprint(chat_tiny))
    assert adapter.config.kind == method and len(adapter.layers) == 2
    ids = token_batch(model.config.vocab_size, 3, 9, seed=1)
    with torch.no_grad():
        want = peft_model(ids).logits
        got = model(ids, hook=adapter.hook())
        assert not torch.allclose(got, model(ids), atol=1e-3), "the trained adapter must change the output"
    assert_close(got, want, "reordered", **forward_chain(model.config))


def test_full_finetune_is_a_plain_checkpoint(chat_tiny, tmp_path):
    out = tmp_path / "out"
    train(_cfg(chat_tiny, out, "full", steps=3), show_progress=False)
    config = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in config and config["vocab_size"] == 49152
    assert (out / "tokenizer.json").is_file() and (out / "model.safetensors").is_file()
    ModelConfig.from_file(out / "config.json")  # our loader accepts it as a base
    tuned = _tensors(out / "model.safetensors")
    base = _tensors(chat_tiny / "model.safetensors")
    assert set(tuned) == set(base)
    assert all(tuned[k].dtype == torch.float32 for k in tuned)
    assert sum(not torch.equal(tuned[k], base[k]) for k in base) >= len(base) - 2  # (norm weights may not move)
    reloaded = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    assert reloaded.num_parameters() == AutoModelForCausalLM.from_pretrained(str(chat_tiny)).num_parameters()


def test_resume_after_interrupt_equals_uninterrupted_run(chat_tiny, tmp_path):
    whole = train(_cfg(chat_tiny, tmp_path / "whole", "lora", grad_accum=2), show_progress=False)

    def ctrl_c_at_step_3(step, loss):
        if step == 3:
            raise KeyboardInterrupt

    cut = tmp_path / "cut"
    first = train(_cfg(chat_tiny, cut, "lora", grad_accum=2, save_every=2), show_progress=False,
                  on_step=ctrl_c_at_step_3)
    assert not first.completed and first.steps == 3 and first.final_metrics == {}
    assert latest_checkpoint(cut).name == "step-00000003"
    manifest = json.loads((cut / "deltafleet.json").read_text())
    assert manifest["completed"] is False and manifest["steps"] == 3
    assert load_adapter(cut).config.kind == "lora"  # the interrupted export is usable

    with pytest.raises(DeltafleetError, match="holds checkpoints of an earlier run; pass --resume"):
        train(_cfg(chat_tiny, cut, "lora", grad_accum=2), show_progress=False)
    with pytest.raises(DeltafleetError, match="cannot resume: hyperparameters="):
        train(_cfg(chat_tiny, cut, "lora", grad_accum=1, resume=True), show_progress=False)

    resumed = train(_cfg(chat_tiny, cut, "lora", grad_accum=2, resume=True), show_progress=False)
    assert resumed.completed and resumed.steps == 8
    # Exact: the checkpoint restores every bit (test_checkpoint), and the same kernels then run on the same shapes
    # and values in this process.
    assert resumed.losses == whole.losses
    want = _tensors(tmp_path / "whole" / "adapter_model.safetensors")
    got = _tensors(cut / "adapter_model.safetensors")
    assert set(got) == set(want)
    for k in want:
        assert_close(got[k], want[k], "exact", msg=k)
    assert resumed.final_metrics["val_loss"] == whole.final_metrics["val_loss"]


def test_open_text_task_reports_perplexity(chat_tiny, tmp_path):
    result = train(_cfg(chat_tiny, tmp_path / "out", "lora", task="shakespeare", steps=2, batch_size=2,
                        max_seq_len=256), show_progress=False)
    metrics = result.final_metrics
    assert set(metrics) == {"val_loss", "val_perplexity"}
    assert metrics["val_perplexity"] == pytest.approx(math.exp(metrics["val_loss"]))
    no_eval = train(_cfg(chat_tiny, tmp_path / "quiet", "ia3", steps=1, eval_examples=0), show_progress=False)
    assert no_eval.completed and no_eval.final_metrics == {}
