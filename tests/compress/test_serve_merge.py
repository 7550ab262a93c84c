"""A compressed whole fine-tune (projections, tables, norm gains) served by the engine in a mixed batch equals its
merged reconstruction, on an untied and a tied base; the merge equals the fine-tune up to the compression itself;
`merge` exports a checkpoint that transformers loads with the same logits as our model with the adapter."""

from __future__ import annotations

import pytest
import torch

from deltafleet.adapters import LoraConfig, RoadConfig, load_adapter, merge_adapter, random_adapter, save_adapter
from deltafleet.adapters.serving import to_quantized_form, to_serving_form
from deltafleet.compress import CompressSettings, compress_deltas, extract_deltas, load_extras, save_compressed
from deltafleet.compress.delta import weight_name
from deltafleet.compress.merge import merge_to_checkpoint, merged_model
from deltafleet.models.config import MODEL_LAYER
from deltafleet.models.generate import greedy_generate
from deltafleet.models.loading import load_model
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from deltafleet.serve.engine.backends import make_backend
from deltafleet.serve.engine.layout import BatchLayout
from deltafleet.serve.engine.pools import POOL_CLASSES, pool_specs_for
from deltafleet.serve.engine.types import NO_ADAPTER
from deltafleet.store.fingerprint import base_fingerprint
from deltafleet.store.safetensors_io import load_tensors
from tests.compress.conftest import make_finetune
from tests.conftest import assert_close, forward_chain, token_batch

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@pytest.fixture(scope="module")
def tenants(tiny_llama, tiny_deltas, tmp_path_factory):
    d = tmp_path_factory.mktemp("tenants")
    cfg = tiny_deltas.config
    fp = base_fingerprint(tiny_llama)
    for name, method, u_groups in (("dc", "delta-come", "rank"), ("dco", "delta-come", "out"),
                                   ("lr", "lowrank", "rank"), ("bd", "bitdelta", "rank")):
        plan = "alloc" if u_groups == "out" else "auto"  # allocation needs U grouped along out
        c = compress_deltas(tiny_deltas, CompressSettings(method, ratio=1 / 8, quantizer="rtn", u_groups=u_groups,
                                                          plan=plan))
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
        want = greedy_generate(ref, r.prompt_ids, 8, hook=None if a is None else a.hook(ref.config))
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
        if name == "dco":  # kept quantized for the qdelta pool: codes as stored, group scales and biases in fp32
            assert engine.adapters.host[name].family == "qadditive"
            assert manifest["bytes"]["compressed"] < listing[name]["bytes"] < 1.25 * manifest["bytes"]["compressed"]
        else:
            assert listing[name]["bytes"] == manifest["bytes"]["compressed"]  # host memory: the compressed bytes
        assert "table deltas and the norm gain deltas" in manifest["serving"]
        assert set(manifest["bytes"]["parts"]) == {"projections", "tables", "gains"}
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
    assert load_extras(tenants / name) == {}  # the whole delta is in the adapter: tables and gains too
    with torch.no_grad():
        base = ours(ids)
        want = ours(ids, hook=a.hook(ours.config))
        got = hf(ids).logits
    assert not torch.allclose(want, base, atol=1e-2)  # a merge that dropped the delta would fail below
    assert_close(got, want, "reordered", **forward_chain(ours.config))  # W + dW in transformers vs W x + dW x
    with pytest.raises(ValueError, match="not empty"):
        merge_to_checkpoint(tiny_llama, tenants / name, out)


# ------------------------------------------------------------------------ the whole fine-tune, tied and untied
@pytest.fixture(scope="module", params=["llama", "llama3-rope-tied"])
def whole(request, tiny_checkpoints, tmp_path_factory):
    """(base dir, fine-tune dir, deltas) of a fine-tune that changes projections, tables and norms."""
    base = tiny_checkpoints[request.param]
    ft = make_finetune(base, tmp_path_factory.mktemp(f"ft-{request.param}"), seed=7)
    return base, ft, extract_deltas(base, ft)


def test_the_whole_delta_is_extracted(whole):
    base, _, ds = whole
    tied = ds.config.tie_word_embeddings
    tables = sorted(name for layer, name in ds.deltas if layer == MODEL_LAYER)
    assert tables == (["lm_head"] if tied else ["embed_tokens", "lm_head"])
    assert sorted(ds.gains) == [(MODEL_LAYER, "norm"), (0, "input_layernorm")] and ds.extras == {}


@pytest.mark.parametrize("method", ["delta-come", "lowrank", "delta-come-quantized"])
@pytest.mark.parametrize("backend", ["reference", "cpu"])
def test_a_served_whole_finetune_equals_its_merge(whole, tmp_path, method, backend):
    """Ratio 1/16, two tenants of the method in one pool, rows mixed with the base: each row's logits (every
    position, and the LM head on selected rows) equal the merged artifact's. delta-come-quantized: U grouped along
    out (the default), served in the qadditive pool as stored (native kernel where the shapes allow: the untied
    base; the torch path on the tied one, whose 300-token vocabulary is no multiple of 64)."""
    base, _, ds = whole
    fp = base_fingerprint(base)
    quantized = method == "delta-come-quantized"
    settings = (CompressSettings("delta-come", ratio=1 / 16, quantizer="rtn", u_groups="out", plan="alloc")
                if quantized else CompressSettings(method, ratio=1 / 16, quantizer="rtn"))
    dirs = []
    for i in range(2):
        c = compress_deltas(ds, settings)
        if i:  # a second tenant: the same artifact with its gain deltas negated, so the two rows differ
            c.adapter.gains = {k: -g for k, g in c.adapter.gains.items()}
        dirs.append(save_compressed(c, tmp_path / f"t{i}", base_fingerprint=fp))
    model, _ = load_model(base)
    adapters = [load_adapter(d, model.config, expected_fingerprint=fp) for d in dirs]
    forms = [(to_quantized_form if quantized else to_serving_form)(a, torch.float32) for a in adapters]
    if quantized and None in forms:
        bits = sorted({b for a in adapters for _, ranks in a.config.bands for b, _ in ranks if (300 * b) % 8})
        assert bits, "no quantized form although every row is whole bytes"
        pytest.skip(f"{bits}-bit bands of a 300-column table are not whole bytes a row: served expanded")
    (spec,) = pool_specs_for((f.family, f.width) for f in forms)
    pool = POOL_CLASSES[spec.family](spec, model.config, torch.float32)
    for slot, f in enumerate(forms):
        pool.write(slot, f)
    rows = [(pool, 1), (None, NO_ADAPTER), (pool, 0), (pool, 0)]
    ids = token_batch(model.config.vocab_size, 4, 9, seed=3)
    layout = BatchLayout.build(rows, ids.shape[1])
    pick = torch.tensor([8, 9 + 8, 2 * 9 + 4, 3 * 9 + 8])  # the LM head on one row of each sequence
    with torch.no_grad():
        got = model(ids, hook=layout.hook(make_backend(backend)))
        got_pick = model(ids, hook=layout.hook(make_backend(backend), pick), logits_index=pick)
        base_logits = model(ids)
        for row, slot in ((0, 1), (2, 0), (3, 0)):
            merged, _, _ = merged_model(base, dirs[slot])
            want = merged(ids[row:row + 1])[0]
            assert not torch.allclose(want, base_logits[row], atol=1e-2)
            assert_close(got[row], want, "reordered", **forward_chain(model.config), msg=f"row {row}")
            assert_close(got_pick[row], want[int(pick[row]) - 9 * row], "reordered", **forward_chain(model.config))
    assert_close(got[1], base_logits[1], "exact")


@pytest.mark.parametrize("method", ["delta-come", "lowrank", "bitdelta", "dare"])
def test_the_merge_equals_the_finetune_up_to_the_compression(whole, tmp_path, method):
    """Every module of the merged artifact is the fine-tune's weight up to that module's reconstruction error (as
    the manifest reports it); the gains are the fine-tune's to fp16 rounding."""
    base, ft, ds = whole
    c = compress_deltas(ds, CompressSettings(method, ratio=1 / 16, quantizer="rtn"))
    d = save_compressed(c, tmp_path / method, base_fingerprint=base_fingerprint(base))
    merged, _, _ = merged_model(base, d)
    ft_state, base_state = load_tensors(ft / "model.safetensors"), load_tensors(base / "model.safetensors")
    state = dict(merged.named_parameters(remove_duplicate=False))
    errors = {(s.layer, s.proj): s.rel_error for s in c.stats}
    for key, delta in ds.deltas.items():
        name = weight_name(ds.config, key)
        err = float((state[name].detach() - ft_state[name]).norm() / delta.norm())
        assert err == pytest.approx(errors[key], rel=1e-3, abs=1e-5), key
    for key, g in ds.gains.items():
        name = weight_name(ds.config, key)
        torch.testing.assert_close(state[name], base_state[name] + g.half().float(), atol=1e-6, rtol=0)
    assert c.bytes <= c.fp16_bytes / 16 or method == "bitdelta"  # every byte counted, the whole delta at 1/16
