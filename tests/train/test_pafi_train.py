"""`deltafleet train --method pafi`: the sparse-delta layer's gradients equal dense autograd masked to the mask,
a short run lowers the loss and exports a values-only tenant that loads, merges and serves as it trained, and the
mask is computed once per (base, density)."""

from __future__ import annotations

import functools
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from deltafleet.adapters import load_adapter, merge_adapter
from deltafleet.adapters.pafi import magnitude_mask
from deltafleet.adapters.pafi.functional import flat_index
from deltafleet.eval.core import validation_metrics
from deltafleet.models.loading import load_model
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from deltafleet.train import pafi, recipe
from deltafleet.train.config import TrainConfig
from tests.conftest import assert_close

train = functools.partial(recipe.train, validate=validation_metrics)


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DELTAFLEET_CACHE_DIR", str(tmp_path / "cache"))


def test_sparse_delta_linear_gradients_equal_masked_dense_autograd():
    g = torch.Generator().manual_seed(0)
    base = torch.nn.Linear(40, 24, bias=True)
    with torch.no_grad():
        base.bias.normal_(generator=g)
    cols, row_ptr = magnitude_mask(base.weight, 0.2)
    layer = pafi.PafiLinear(base, cols, row_ptr)
    with torch.no_grad():
        layer.values.normal_(generator=g)
    x = torch.randn(3, 7, 40, generator=g, requires_grad=True)
    gy = torch.randn(3, 7, 24, generator=g)
    layer(x).backward(gy)

    flat = flat_index(cols, row_ptr, 40)
    dense = torch.zeros(24 * 40).index_put((flat,), layer.values.detach()).view(24, 40).requires_grad_(True)
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, base.weight + dense, base.bias).backward(gy)
    assert_close(layer.values.grad, dense.grad.flatten()[flat], "reordered", k=21)
    assert_close(x.grad, x2.grad, "reordered", k=24)
    assert base.weight.grad is None  # the base stays frozen
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the recipe's bf16 path runs
        out = layer(x)
    out.float().sum().backward()


def test_pafi_trains_exports_values_only_and_serves_as_trained(chat_tiny, tmp_path):
    out = tmp_path / "pafi"
    cfg = TrainConfig(base=str(chat_tiny), task="sort", method="pafi", out=out, steps=8, batch_size=4, lr=3e-2,
                      precision="fp32", eval_examples=4, save_every=0, pafi_density=0.05)
    result = train(cfg, show_progress=False)
    assert result.completed and sum(result.losses[-2:]) / 2 < result.losses[0] - 0.1, result.losses
    manifest = json.loads((out / "deltafleet.json").read_text())
    assert manifest["format"] == "deltafleet-pafi" and manifest["kind"] == "pafi" and manifest["steps"] == 8
    assert manifest["config"]["density"] == 0.05 and manifest["hyperparameters"]["pafi_density"] == 0.05
    assert manifest["trainable_params"] == result.trainable_params == manifest["num_params"]
    weights = out / "adapter_model.safetensors"
    assert weights.stat().st_size < 2 * result.trainable_params + 20_000  # fp16 values and a header

    model, _ = load_model(chat_tiny)
    adapter = load_adapter(out, model.config)
    assert adapter.num_params - sum(p["cols"].numel() + p["row_ptr"].numel() for p in adapter.params.values()) \
        == result.trainable_params

    # The tenant as trained (transformers + PafiLinear, fp16-rounded values) against our merged model.
    hf = AutoModelForCausalLM.from_pretrained(str(chat_tiny), dtype=torch.float32)
    pafi.prepare(hf, cfg)
    for (layer, proj), p in adapter.params.items():
        parent, name = pafi._linear(hf, layer, proj)
        with torch.no_grad():
            getattr(parent, name).values.copy_(p["values"].float())
    ids = torch.randint(0, 1000, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = hf(input_ids=ids).logits
        base_logits = model(ids)
        merge_adapter(model, adapter)
        got = model(ids)
    assert (want - base_logits).abs().max() > 1e-3
    assert_close(got, want, "reordered", k=model.config.intermediate_size, depth=model.config.num_layers + 1)

    # Served in a mixed batch: its greedy tokens equal the merged model's.
    from deltafleet.models.generate import greedy_generate

    engine = Engine(load_model(chat_tiny)[0], None, EngineConfig(dtype="float32", max_model_len=64,
                                                                 pafi_density=0.05),
                    adapters_dir=tmp_path)
    prompt = ids[0].tolist()
    outs = engine.generate([Request(prompt, SamplingParams(max_tokens=6, ignore_eos=True), adapter="pafi"),
                            Request(prompt, SamplingParams(max_tokens=6, ignore_eos=True))])
    assert outs[0].token_ids == greedy_generate(model, prompt, 6)


def test_mask_is_computed_once_per_base_and_density(chat_tiny, tmp_path, monkeypatch):
    cfg = TrainConfig(base=str(chat_tiny), task="sort", method="pafi", out=tmp_path / "o", pafi_density=0.05,
                      precision="fp32")
    first = pafi.prepare(AutoModelForCausalLM.from_pretrained(str(chat_tiny)), cfg).pafi["config"].mask
    calls = []
    monkeypatch.setattr(pafi, "build_mask", lambda *a: calls.append(a))
    second = pafi.prepare(AutoModelForCausalLM.from_pretrained(str(chat_tiny)), cfg).pafi["config"].mask
    assert first == second and not calls
