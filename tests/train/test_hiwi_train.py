"""`deltafleet train --method hiwi`: starts at the base, lowers the loss, exports the changed gains only, and the
tenant served in a mixed batch gives the trained model's greedy tokens."""

from __future__ import annotations

import functools
import json

import torch
from transformers import AutoModelForCausalLM

from deltafleet.adapters import load_adapter, merge_adapter
from deltafleet.eval.core import validation_metrics
from deltafleet.models.generate import greedy_generate
from deltafleet.models.loading import load_model
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from deltafleet.train import hiwi, recipe
from deltafleet.train.config import TrainConfig
from tests.conftest import assert_close

train = functools.partial(recipe.train, validate=validation_metrics)


def test_hiwi_starts_at_the_base(chat_tiny, tmp_path):
    cfg = TrainConfig(base=str(chat_tiny), task="sort", method="hiwi", out=tmp_path / "o", precision="fp32")
    ids = torch.randint(0, 1000, (2, 7), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(str(chat_tiny), dtype=torch.float32)
    with torch.no_grad():
        want = base(input_ids=ids).logits
        got = hiwi.prepare(base, cfg)(input_ids=ids).logits
    assert_close(got, want, "reordered", k=64, depth=3)
    trainable = [n for n, p in base.named_parameters() if p.requires_grad]
    assert trainable and all(".adapter." in n or n.startswith("hiwi.") for n in trainable)


def test_hiwi_trains_exports_gains_and_serves_as_trained(chat_tiny, tmp_path):
    out = tmp_path / "hiwi"
    cfg = TrainConfig(base=str(chat_tiny), task="sort", method="hiwi", out=out, steps=8, batch_size=4, lr=3e-2,
                      precision="fp32", eval_examples=4, save_every=0)
    result = train(cfg, show_progress=False)
    assert result.completed and sum(result.losses[-2:]) / 2 < result.losses[0] - 0.05, result.losses
    manifest = json.loads((out / "deltafleet.json").read_text())
    assert manifest["format"] == "deltafleet-hiwi" and manifest["kind"] == "hiwi" and manifest["steps"] == 8
    hidden, layers = 64, 2
    assert manifest["num_params"] == 2 * layers * hidden and manifest["trainable_params"] == result.trainable_params

    model, _ = load_model(chat_tiny)
    adapter = load_adapter(out, model.config)
    merge_adapter(model, adapter)
    prompt = torch.randint(0, 1000, (12,), generator=torch.Generator().manual_seed(1)).tolist()
    engine = Engine(load_model(chat_tiny)[0], None, EngineConfig(dtype="float32", max_model_len=64),
                    adapters_dir=tmp_path)
    outs = engine.generate([Request(prompt, SamplingParams(max_tokens=6, ignore_eos=True), adapter="hiwi"),
                            Request(prompt, SamplingParams(max_tokens=6, ignore_eos=True))])
    assert outs[0].token_ids == greedy_generate(model, prompt, 6)
