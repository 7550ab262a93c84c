"""OneBit (quant.onebit, quant.onebit_kd, quant.sign_linear): SVID, the packed 1-bit linear, distillation, and the
1-bit base format through every `--base` path (our model, transformers, the engine with adapters, training)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from deltafleet.errors import ArtifactError, DeltafleetError
from deltafleet.models.loading import load_model
from deltafleet.quant.base import MANIFEST, WEIGHTS, hf_causal_lm, read_quantized_base, set_kernel
from deltafleet.quant.config import QuantConfig
from deltafleet.quant.onebit import rank1_nmf, rank1_svd, svid, svid_matrices
from deltafleet.quant.onebit_kd import CHECKPOINT_DIR, CURVES, distill, forward_hidden, kd_loss, student_model
from deltafleet.quant.pipeline import quantize_base
from deltafleet.quant.registry import RunContext
from deltafleet.quant.sign_linear import KERNELS, LayerNormedLinear, SignLinear
from deltafleet.store.safetensors_io import load_tensors, save_tensors
from deltafleet.store.signs import SignMatrix
from tests.conftest import assert_close, forward_chain, token_batch
from tests.quant.conftest import CALIB


def onebit_config(**kw) -> QuantConfig:
    defaults = dict(kd_steps=0, kd_batch_size=2, kd_save_every=0, kd_precision="fp32", kd_lr=1e-2)
    return QuantConfig("onebit", **{**defaults, **kw})


@pytest.fixture(scope="module")
def onebit_bases(tiny_llama, tmp_path_factory) -> dict:
    """'svid': SVID only; 'kd': 6 distillation steps; 'ln': SVID with the LayerNorm. Dense tensors fp32."""
    import deltafleet.quant.pipeline as pipeline

    saved = pipeline.calibration_windows
    pipeline.calibration_windows = lambda path, cfg, calib: (CALIB, "random")
    try:
        out = {}
        for name, kw in {"svid": {}, "kd": {"kd_steps": 6}, "ln": {"onebit_layernorm": True}}.items():
            d = tmp_path_factory.mktemp(f"onebit-{name}") / "base"
            quantize_base(tiny_llama, onebit_config(**kw), d, dense_dtype="float32", show_progress=False)
            out[name] = d
        return out
    finally:
        pipeline.calibration_windows = saved


# --------------------------------------------------------------------------------------------- SVID
@pytest.mark.parametrize("method", ["svd", "nmf"])
def test_svid_reconstructs_a_rank1_magnitude_matrix_exactly(method):
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(23, generator=g) + 0.1, torch.rand(41, generator=g) + 0.1
    signs = torch.where(torch.rand(23, 41, generator=g) < 0.5, -1.0, 1.0)
    W = signs * a[:, None] * b[None, :]
    s, gin, hout = svid(W, method)
    assert torch.equal(s, signs)
    torch.testing.assert_close(hout[:, None] * s * gin[None, :], W, rtol=1e-5, atol=0)
    assert bool((gin >= 0).all() and (hout >= 0).all())


def test_nmf_and_svd_reach_the_same_rank1_factor():
    W = torch.randn(48, 80, generator=torch.Generator().manual_seed(2)).abs()
    a1, b1 = rank1_svd(W)
    a2, b2 = rank1_nmf(W, iters=100)
    torch.testing.assert_close(a2[:, None] * b2, a1[:, None] * b1, rtol=1e-5, atol=1e-6)
    best = (W - a1[:, None] * b1).norm()
    for _ in range(5):  # no nearby rank-1 matrix does better
        da, db = torch.randn(48) * 1e-2, torch.randn(80) * 1e-2
        assert (W - (a1 + da)[:, None] * (b1 + db)).norm() >= best


# --------------------------------------------------------------------------------------------- SignLinear
@pytest.mark.parametrize("C", [1, 8, 13, 576])
def test_packed_and_unpacked_signs_agree_bit_for_bit(C):
    from deltafleet.quant.sign_linear import fast_signs
    from deltafleet.store.signs import pack_signs, unpack_signs

    w = torch.randn(7, C, generator=torch.Generator().manual_seed(C))
    packed = pack_signs(w)
    for dtype in (torch.float32, torch.bfloat16):
        assert torch.equal(fast_signs(packed, C, dtype), unpack_signs(packed, C).to(dtype))
    assert torch.equal(unpack_signs(packed, C), torch.where(w >= 0, 1.0, -1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("C", [64, 37])
@pytest.mark.parametrize("layernorm", [False, True])
@pytest.mark.parametrize("tokens", [3, 5])  # x (2, tokens): 6 rows take the select-add kernel, 10 the unpack
def test_sign_linear_kernels_agree(dtype, C, layernorm, tokens):
    g = torch.Generator().manual_seed(C)
    sm = SignMatrix.from_factors(torch.randn(24, C, generator=g), torch.rand(C, generator=g) + 0.5,
                                 torch.rand(24, generator=g) * 0.2)
    bias = torch.randn(24, generator=g)
    x = torch.randn(2, tokens, C, generator=g).to(dtype)
    layer = SignLinear(sm, bias.to(dtype), "reference", layernorm)
    want = layer(x.float().to(dtype)).float()
    w_hat = sm.dequantize()
    dense = torch.nn.functional.linear(x.float(), w_hat)
    if layernorm:
        dense = torch.nn.functional.layer_norm(dense, (24,), eps=1e-5)
    assert_close(want, dense + bias, "rounded" if dtype == torch.bfloat16 else "reordered", dtype, k=C)
    for kernel in KERNELS:
        layer.set_kernel(kernel)
        got = layer(x)
        assert got.dtype == dtype and got.shape == (2, tokens, 24)
        assert_close(got.float(), want, "rounded" if dtype == torch.bfloat16 else "reordered", dtype, k=C,
                     msg=kernel)


def test_sign_linear_under_autograd_and_module_to():
    sm = SignMatrix.from_factors(torch.randn(8, 16), torch.rand(16), torch.rand(8))
    layer = SignLinear(sm)
    x = torch.randn(3, 16, requires_grad=True)
    layer(x).sum().backward()  # native falls back to a differentiable path
    torch.testing.assert_close(x.grad, (sm.dequantize().sum(0)).expand(3, 16), rtol=1e-5, atol=1e-6)
    layer.to(torch.bfloat16)
    assert torch.equal(layer.g, sm.g) and torch.equal(layer.h, sm.h)  # stored scales never rounded by .to
    with pytest.raises(ValueError, match="kernel='bogus'"):
        layer.set_kernel("bogus")


# --------------------------------------------------------------------------------------------- the base
def test_onebit_base_loads_as_sign_linears_and_equals_its_dequantized_weights(onebit_bases, tiny_llama):
    path = onebit_bases["svid"]
    model, _ = load_model(path)
    assert sum(isinstance(m, SignLinear) for m in model.modules()) == 7 * model.config.num_layers
    qb = read_quantized_base(path)
    assert qb.manifest["codec"] == "sign" and qb.manifest["bits"] == 1 and "group_size" not in qb.manifest
    ids = token_batch(model.config.vocab_size, 3, 11)
    hf = hf_causal_lm(path)
    with torch.no_grad():
        got = model(ids)
        want = hf(ids).logits
    assert_close(got, want, "reordered", **forward_chain(model.config))
    # SVID itself: the stored matrices are exactly SVID of the source weights, rounded to fp16
    src, _ = load_model(tiny_llama)
    for (layer, proj), sm in qb.matrices.items():
        s, g, h = svid(src.linear(layer, proj).weight.detach())
        assert torch.equal(sm.signs(), s) and torch.equal(sm.g, g.half()) and torch.equal(sm.h, h.half())


def test_save_load_is_bit_exact(onebit_bases, tmp_path):
    path = onebit_bases["kd"]
    qb = read_quantized_base(path)
    model, _ = load_model(path)
    for (layer, proj), sm in qb.matrices.items():
        lin = model.linear(layer, proj)
        assert torch.equal(lin.qsigns, sm.packed) and torch.equal(lin.g, sm.g) and torch.equal(lin.h, sm.h)
    again = tmp_path / "copy"
    shutil.copytree(path, again)
    assert load_tensors(again / WEIGHTS).keys() == load_tensors(path / WEIGHTS).keys()


def test_layernorm_base_in_our_model_and_in_transformers(onebit_bases):
    path = onebit_bases["ln"]
    model, _ = load_model(path)
    assert all(m.layernorm for m in model.modules() if isinstance(m, SignLinear))
    hf = hf_causal_lm(path)
    assert sum(isinstance(m, LayerNormedLinear) for m in hf.modules()) == 7 * model.config.num_layers
    ids = token_batch(model.config.vocab_size, 2, 9)
    with torch.no_grad():
        assert_close(model(ids), hf(ids).logits, "reordered", **forward_chain(model.config))
        plain = load_model(onebit_bases["svid"])[0](ids)
    assert (model(ids) - plain).abs().max() > 1e-3  # the LayerNorm really acts


def test_bytes_per_weight_and_manifest(onebit_bases):
    m = json.loads((onebit_bases["kd"] / MANIFEST).read_text())
    qb = read_quantized_base(onebit_bases["kd"])
    weights = sum(r * c for r, c in (sm.shape for sm in qb.matrices.values()))
    assert m["bytes"]["projections"] == sum(sm.nbytes for sm in qb.matrices.values())
    bits_per_weight = 8 * m["bytes"]["projections"] / weights
    assert 1.0 < bits_per_weight < 1.0 + 16 * 2 / 32 + 0.3  # 1 + 16 (R + C) / (R C) + row padding, tiny shapes
    assert m["stats"]["kd"]["steps"] == 6 and len(m["stats"]["kd"]["first"]) == 4
    assert (onebit_bases["kd"] / CURVES).is_file() and not (onebit_bases["kd"] / CHECKPOINT_DIR).exists()


@pytest.fixture
def broken(onebit_bases, tmp_path):
    d = tmp_path / "b"
    shutil.copytree(onebit_bases["svid"], d)
    return d


def _edit_manifest(d, **fields):
    m = json.loads((d / MANIFEST).read_text())
    m.update(fields)
    (d / MANIFEST).write_text(json.dumps(m))


def test_malformed_onebit_bases_are_refused_naming_file_and_rule(broken):
    tensors = load_tensors(broken / WEIGHTS)
    key = "model.layers.0.mlp.up_proj"
    cases = [
        (lambda: save_tensors({k: v for k, v in tensors.items() if k != f"{key}.qout"}, broken / WEIGHTS),
         rf"{WEIGHTS}: tensor '{key}.qout' is missing"),
        (lambda: save_tensors({**tensors, f"{key}.qsigns": tensors[f"{key}.qsigns"][:, :-1].contiguous()},
                              broken / WEIGHTS), rf"{WEIGHTS}: tensor '{key}.qsigns' is torch.uint8"),
        (lambda: save_tensors({**tensors, f"{key}.qin": torch.full_like(tensors[f"{key}.qin"], float("nan"))},
                              broken / WEIGHTS), "non-finite scales"),
        (lambda: _edit_manifest(broken, bits=2), rf"{MANIFEST}: bits=2: must be one of \(1,\) for codec 'sign'"),
        (lambda: _edit_manifest(broken, codec="ternary"), rf"{MANIFEST}: codec='ternary': must be one of"),
        (lambda: _edit_manifest(broken, codec=None), rf"{MANIFEST}: codec=None"),
        (lambda: _edit_manifest(broken, quantized_tables=["model.embed_tokens"]), "only an affine-codec base"),
        (lambda: (broken / WEIGHTS).write_bytes((broken / WEIGHTS).read_bytes()[:1000]), WEIGHTS),
    ]
    original_w, original_m = (broken / WEIGHTS).read_bytes(), (broken / MANIFEST).read_text()
    for damage, msg in cases:
        (broken / WEIGHTS).write_bytes(original_w)
        (broken / MANIFEST).write_text(original_m)
        damage()
        with pytest.raises(ArtifactError, match=msg):
            load_model(broken)
    # an affine base whose manifest claims the sign codec is refused too (its tensors are not signs)


def test_affine_base_claiming_the_sign_codec_is_refused(quantized_tiny, tmp_path):
    d = tmp_path / "q"
    shutil.copytree(quantized_tiny["rtn"], d)
    _edit_manifest(d, codec="sign", bits=1)
    with pytest.raises(ArtifactError, match=r"qsigns' is missing"):
        read_quantized_base(d)


def test_config_rules():
    assert QuantConfig("onebit").bits == 1 and QuantConfig("rtn").bits == 4
    for kw, msg in [({"bits": 4}, "onebit quantizes to 1 bits"), ({"embedding": "rtn"}, "keeps the tables dense"),
                    ({"onebit_svid": "pca"}, "onebit_svid='pca'"), ({"kd_steps": -1}, "kd_steps=-1"),
                    ({"kd_warmup": 1.0}, "kd_warmup=1.0"), ({"kd_precision": "fp16"}, "kd_precision='fp16'"),
                    ({"kd_lr": 0.0}, "kd_lr=0.0"), ({"kd_batch_size": 0}, "kd_batch_size=0")]:
        with pytest.raises(ValueError, match=msg):
            QuantConfig("onebit", **kw)
    with pytest.raises(ValueError, match=r"bits=1: rtn quantizes to 4 or 2 or 3 or 8 bits"):
        QuantConfig("rtn", bits=1)
    assert "group_size" not in QuantConfig("onebit").settings()
    assert not any(k.startswith(("kd_", "onebit_")) for k in QuantConfig("gptq").settings())


# --------------------------------------------------------------------------------------------- distillation
def test_a_distillation_step_lowers_the_loss(tiny_llama):
    model, _ = load_model(tiny_llama)
    factors = svid_matrices(model, "svd")
    ids = CALIB[:2]
    student, _ = student_model(model, factors, False)

    def loss_of(fs) -> float:
        st, _ = student_model(model, fs, False)
        with torch.no_grad():
            t, th = forward_hidden(model, ids)
            s, sh = forward_hidden(st, ids)
        return float(kd_loss(t, th, s, sh, 0.01, 1.0)[0])

    cfg = onebit_config(kd_steps=8, kd_lr=5e-3, kd_warmup=0.0)
    trained, stats = distill(model, factors, cfg, ids, lambda m: None, RunContext(show_progress=False))
    assert stats["steps"] == 8 and stats["last"][1] < stats["first"][1]
    assert loss_of(trained) < loss_of(factors)  # on the same windows, measured outside the loop
    # the student's gradients reach the latent signs, g and h
    with torch.no_grad():
        t, th = forward_hidden(model, ids)
    s, sh = forward_hidden(student, ids)
    kd_loss(t, th, s, sh, 0.01, 1.0)[0].backward()
    lin = student.linear(0, "q_proj")
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in (lin.latent, lin.g, lin.h))


def test_distillation_resumes_exactly_and_refuses_a_stale_checkpoint(tiny_llama, tmp_path):
    model, _ = load_model(tiny_llama)
    factors = svid_matrices(model, "svd")
    cfg = onebit_config(kd_steps=20, kd_save_every=5, kd_lr=5e-3)
    full, _ = distill(model, factors, cfg, CALIB, lambda m: None, RunContext(tmp_path / "a", show_progress=False))

    class Stop(Exception):
        pass

    def stop_at_10(msg: str) -> None:
        if "step 10/" in msg:
            raise Stop

    with pytest.raises(Stop):
        distill(model, factors, cfg, CALIB, stop_at_10, RunContext(tmp_path / "b", show_progress=False))
    assert (tmp_path / "b" / CHECKPOINT_DIR / "checkpoint.pt").is_file()  # saved at step 5
    with pytest.raises(DeltafleetError, match="pass --resume"):
        distill(model, factors, cfg, CALIB, lambda m: None, RunContext(tmp_path / "b", show_progress=False))
    other = onebit_config(kd_steps=20, kd_save_every=5, kd_lr=1e-3)
    with pytest.raises(DeltafleetError, match="other settings"):
        distill(model, factors, other, CALIB, lambda m: None, RunContext(tmp_path / "b", True, False))
    said = []
    resumed, stats = distill(model, factors, cfg, CALIB, said.append, RunContext(tmp_path / "b", True, False))
    assert any("resumed distillation at step 5/20" in m for m in said) and stats["steps"] == 20
    for key, (s, g, h) in full.items():
        assert torch.equal(resumed[key][0], s)
        torch.testing.assert_close(resumed[key][1], g, rtol=1e-6, atol=0)
        torch.testing.assert_close(resumed[key][2], h, rtol=1e-6, atol=0)


# --------------------------------------------------------------------------------------------- serving
def test_mixed_lora_and_road_on_a_onebit_base_equal_solo(onebit_bases, tmp_path):
    from deltafleet.adapters import random_adapter, save_adapter
    from deltafleet.models.generate import greedy_generate
    from deltafleet.serve.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
    from tests.quant.test_engine_quantized import ADAPTERS

    base = onebit_bases["kd"]
    model, _ = load_model(base)
    adapters = {}
    for i, (name, acfg) in enumerate(ADAPTERS.items()):
        a = random_adapter(model.config, acfg, seed=20 + i)
        save_adapter(a, tmp_path / name, model_cfg=model.config)
        adapters[name] = a
    names = [*ADAPTERS, None]
    g = torch.Generator().manual_seed(3)
    reqs = [Request(torch.randint(0, 320, (2 + i,), generator=g).tolist(),
                    SamplingParams(max_tokens=3 + i % 4, ignore_eos=True), adapter=names[i % len(names)])
            for i in range(8)]
    cfg = EngineConfig(dtype="float32", max_model_len=32, max_batch=6, lora_slots=4, max_lora_rank=8, road_slots=4)
    mixed = Engine(load_model(base)[0], None, cfg, adapters_dir=tmp_path).generate(reqs)
    for r, o in zip(reqs, mixed, strict=True):
        assert o.finish_reason == FinishReason.LENGTH
        hook = None if r.adapter is None else adapters[r.adapter].hook()
        assert o.token_ids == greedy_generate(model, r.prompt_ids, r.params.max_tokens, hook=hook), r.adapter


def test_every_kernel_gives_the_same_greedy_tokens(onebit_bases):
    model, _ = load_model(onebit_bases["kd"])
    from deltafleet.models.generate import greedy_generate

    want = greedy_generate(model, [3, 14, 15, 92], 6)
    for kernel in ("reference", "fast", "cached"):
        assert set_kernel(model, kernel) == 7 * model.config.num_layers
        assert greedy_generate(model, [3, 14, 15, 92], 6) == want, kernel


def test_distillation_continues_from_a_stored_onebit_base(onebit_bases, tiny_llama, tmp_path):
    import deltafleet.quant.pipeline as pipeline

    saved = pipeline.calibration_windows
    pipeline.calibration_windows = lambda path, cfg, calib: (CALIB, "random")
    try:
        d = tmp_path / "more"
        quantize_base(tiny_llama, onebit_config(kd_steps=0, kd_init=str(onebit_bases["kd"])), d,
                      dense_dtype="float32", show_progress=False)
        for key, sm in read_quantized_base(d).matrices.items():  # no steps: the stored base, unchanged
            src = read_quantized_base(onebit_bases["kd"]).matrices[key]
            assert torch.equal(sm.packed, src.packed) and torch.equal(sm.g, src.g) and torch.equal(sm.h, src.h)
        m = json.loads((d / MANIFEST).read_text())
        assert m["stats"]["init"] == str(onebit_bases["kd"]) and m["settings"]["kd_init"] == str(onebit_bases["kd"])
        with pytest.raises(ArtifactError, match="not a quantized base"):
            quantize_base(tiny_llama, onebit_config(kd_init=str(tmp_path)), tmp_path / "x", show_progress=False)
    finally:
        pipeline.calibration_windows = saved


def test_kd_init_must_be_a_onebit_base_of_this_model(quantized_tiny, tiny_llama, onebit_bases):
    import dataclasses

    from deltafleet.models.llama import Transformer
    from deltafleet.quant.onebit import stored_factors

    cfg = load_model(tiny_llama)[0].config
    model = Transformer(dataclasses.replace(cfg, intermediate_size=cfg.intermediate_size // 2))
    with pytest.raises(DeltafleetError, match="not a OneBit base"):
        stored_factors(load_model(quantized_tiny["rtn"])[0], str(quantized_tiny["rtn"]))
    with pytest.raises(DeltafleetError, match="a OneBit base of another model"):
        stored_factors(model, str(onebit_bases["kd"]))
