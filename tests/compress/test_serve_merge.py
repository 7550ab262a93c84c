"""A compressed delta served by the engine in a mixed batch equals its merged reconstruction; `merge` exports a
checkpoint that transformers loads with the same logits as our model with the adapter."""

from __future__ import annotations

import pytest
import torch

from deltafleet.adapters import LoraConfig, RoadConfig, load_adapter, merge_adapter, random_adapter, save_adapter
from deltafleet.compress import CompressSettings, compress_deltas, load_extras, save_compressed
from deltafleet.compress.delta import swapped_extras
from deltafleet.compress.merge import merge_to_checkpoint
from deltafleet.models.generate import greedy_generate
from deltafleet.models.loading import load_model
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from deltafleet.store.fingerprint import base_fingerprint
from tests.conftest import assert_close, forward_chain, token_batch

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tenants(tiny_llama, tiny_deltas, tmp_path_factory):
    d = tmp_path_factory.mktemp("tenants")
    cfg = tiny_deltas.config
    fp = base_fingerprint(tiny_llama)
    for name, method, u_groups in (("dc", "delta-come", "rank"), ("dco", "delta-come", "out"),
                                   ("lr", "lowrank", "rank"), ("bd", "bitdelta", "rank")):
        c = compress_deltas(tiny_deltas, CompressSettings(method, ratio=1 / 8, quantizer="rtn", u_groups=u_groups))
        save_compressed(c, d / name, base_fingerprint=fp)
    lora = random_adapter(cfg, LoraConfig(r=4, alpha=8.0, targets=ALL), seed=3)
    lora = type(lora)(lora.config, {k: {n: t * 2 for n, t in p.items()} for k, p in lora.params.items()})
    save_adapter(lora, d / "lora", model_cfg=cfg, base_fingerprint=fp)
    save_adapter(random_adapter(cfg, RoadConfig(group_size=64, targets=ALL), seed=4), d / "road", model_cfg=cfg,
                 base_fingerprint=fp)
    return d


def test_engine_serves_compressed_deltas_in_mixed_batches_like_the_merged_reconstruction(tiny_llama, tenants):
    model, _ = load_model(tiny_llama)
    engine = Engine(model, None, EngineConfig(dtype="float32", max_model_len=64, max_lora_rank=8, delta_slots=3,
                                              max_delta_rank=64, road_slots=2), tenants, base_fingerprint(tiny_llama))
    names = ["dc", "lora", "lr", None, "road", "dco", "dc", "lr", "lora"]
    g = torch.Generator().manual_seed(0)
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    reqs = [Request(torch.randint(0, 320, (3 + i,), generator=g).tolist(), params, adapter=n)
            for i, n in enumerate(names)]
    outs = engine.generate(reqs)
    ref, _ = load_model(tiny_llama)
    got = {}
    for r, o in zip(reqs, outs, strict=True):
        a = None if r.adapter is None else load_adapter(tenants / r.adapter, ref.config)
        want = greedy_generate(ref, r.prompt_ids, 8, hook=None if a is None else a.hook())
        assert o.token_ids == want, r.adapter
        got[r.adapter] = o.token_ids
        if a is not None:  # the hook (activations) and the merged weights agree
            merge_adapter(ref, a)
            assert greedy_generate(ref, r.prompt_ids, 8) == want
            ref, _ = load_model(tiny_llama)
    base_tokens = greedy_generate(ref, reqs[0].prompt_ids, 8)
    assert got["dc"] != base_tokens or got["lr"] != base_tokens  # the deltas change the output
    listing = {e["name"]: e for e in engine.adapters.listing()}
    for name in ("dc", "dco", "lr"):
        manifest = listing[name]["manifest"]
        assert listing[name]["bytes"] == manifest["bytes"]["compressed"]  # host memory: the compressed bytes
        assert "projection deltas only" in manifest["serving"]
    assert engine.adapters.host["dc"].nbytes == load_adapter(tenants / "dc").nbytes


def test_engine_refuses_bitdelta_with_a_clear_error(tiny_llama, tenants):
    model, _ = load_model(tiny_llama)
    engine = Engine(model, None, EngineConfig(dtype="float32", max_model_len=32), tenants)
    out = engine.generate([Request([1, 2, 3], SamplingParams(max_tokens=2), adapter="bd")])[0]
    assert out.error is not None and "'bitdelta' is not served" in out.error and "deltafleet merge" in out.error


@pytest.mark.parametrize("name", ["dc", "dco", "lora", "road"])
def test_merged_checkpoint_loads_in_transformers_with_equal_logits(tiny_llama, tenants, tmp_path, name):
    from transformers import AutoModelForCausalLM

    out = merge_to_checkpoint(tiny_llama, tenants / name, tmp_path / "merged")
    hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ours, _ = load_model(tiny_llama)
    a = load_adapter(tenants / name, ours.config)
    ids = token_batch(320, 2, 12, seed=1)
    extras = load_extras(tenants / name) if name in ("dc", "dco") else {}
    with torch.no_grad():
        base = ours(ids)
        with swapped_extras(ours, extras):
            want = ours(ids, hook=a.hook())
        got = hf(ids).logits
    assert not torch.allclose(want, base, atol=1e-2)  # a merge that dropped the delta would fail below
    assert_close(got, want, "reordered", **forward_chain(ours.config))  # W + dW in transformers vs W x + dW x
    with pytest.raises(ValueError, match="not empty"):
        merge_to_checkpoint(tiny_llama, tenants / name, out)
