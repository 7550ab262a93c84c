"""HiWi's kind: gain changes applied through the model's norm hook equal merged gains; the tenant format round
trips and refuses hostile files; the norm pool and backends agree."""

from __future__ import annotations

import json

import pytest
import torch

from deltafleet.adapters import load_adapter, random_adapter, save_adapter
from deltafleet.adapters.adapter import merge_adapter
from deltafleet.adapters.hiwi import HiwiConfig
from deltafleet.adapters.serving import to_serving_form
from deltafleet.errors import ArtifactError
from deltafleet.models.config import ModelConfig
from deltafleet.models.loading import load_model
from deltafleet.serve.engine.backends import CpuBackend, ReferenceBackend
from deltafleet.serve.engine.layout import BatchLayout
from deltafleet.serve.engine.pools import NormPool, PoolSpec
from deltafleet.store.safetensors_io import load_tensors, save_tensors
from tests.conftest import assert_close


def _strong(adapter, f=10.0):
    return type(adapter)(adapter.config, {k: {n: t * f for n, t in p.items()} for k, p in adapter.params.items()})


def test_config_takes_norms_only():
    assert HiwiConfig().targets == ("input_layernorm", "post_attention_layernorm")
    with pytest.raises(ValueError, match="unknown norm 'q_proj'"):
        HiwiConfig(targets=("q_proj",))


def test_hooked_equals_merged_on_a_tiny_model(tiny_llama):
    model, _ = load_model(tiny_llama)
    cfg = model.config
    adapter = _strong(random_adapter(cfg, HiwiConfig(), seed=2))
    assert len(adapter.params) == 2 * cfg.num_layers
    ids = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        base = model(ids)
        hooked = model(ids, hook=adapter.hook())
        merge_adapter(model, adapter)
        merged = model(ids)
    assert (hooked - base).abs().max() > 1e-2
    assert_close(merged, hooked, "reordered", k=cfg.intermediate_size, depth=cfg.num_layers + 1)


def test_round_trip_and_hostile_files(tiny_llama, tmp_path):
    cfg = ModelConfig.from_file(tiny_llama / "config.json")
    adapter = random_adapter(cfg, HiwiConfig(), seed=0)
    d = save_adapter(adapter, tmp_path / "t", model_cfg=cfg)
    manifest = json.loads((d / "deltafleet.json").read_text())
    assert manifest["format"] == "deltafleet-hiwi" and manifest["bytes"] == 2 * 2 * cfg.num_layers * cfg.hidden_size
    back = load_adapter(d, cfg)
    for key, p in adapter.params.items():
        assert torch.equal(back.params[key]["delta"], p["delta"].half())
    weights = d / "adapter_model.safetensors"
    good = load_tensors(weights)
    first = sorted(good)[0]
    for damage in ("wide", "stray", "nan", "target", "empty"):
        tensors = dict(good)
        if damage == "wide":
            tensors[first] = torch.zeros(cfg.hidden_size + 1, dtype=torch.float16)
        elif damage == "stray":
            tensors["layers.0.q_proj.lora_A"] = torch.zeros(4, dtype=torch.float16)
        elif damage == "nan":
            tensors[first] = tensors[first].clone()
            tensors[first][0] = float("inf")
        elif damage == "target":
            tensors["layers.0.norm.delta"] = tensors.pop(first)
        else:
            tensors = {}
        save_tensors(tensors, weights)
        with pytest.raises(ArtifactError) as e:
            load_adapter(d, cfg)
        assert str(d) in str(e.value), damage


def test_norm_pool_and_backends_agree(tiny_llama):
    cfg = ModelConfig.from_file(tiny_llama / "config.json")
    pool = NormPool(PoolSpec("hiwi", "norm", 2, 1), cfg, torch.float32)
    forms = [to_serving_form(random_adapter(cfg, HiwiConfig(), seed=s), torch.float32) for s in range(2)]
    for slot, form in enumerate(forms):
        pool.write(slot, form)
    layout = BatchLayout.build([(pool, 1), (None, -1), (pool, 0)], tokens_per_row=3)
    hook = layout.hook(CpuBackend())
    assert hook.norms
    step = layout.pool_steps[0]
    key = (1, "post_attention_layernorm")
    x = torch.randn(9, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    y = torch.randn(9, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    want = ReferenceBackend().apply_norm(x, y, pool.tensors[key], step)
    assert torch.equal(want[3:6], y[3:6]) and (want - y).abs().max() > 0  # the base row is untouched
    assert_close(CpuBackend().apply_norm(x, y, pool.tensors[key], step), want, "reordered", k=2)  # fused FMA
    pool.clear(1)
    assert pool.tensors[key]["delta"][1].abs().max() == 0
