"""The qdelta pool (qadditive family): compressed whole fine-tunes kept quantized as stored. Placement (U grouped
along out goes to qdelta, along the rank to the expanded delta pool, and everything to delta without a qdelta
pool); slots written, regrown and cleared without touching other slots; one group size per pool; and served
answers equal to the same tenant served expanded, and to its merge, in a batch mixed with LoRA and the base."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from deltafleet.adapters import LoraConfig, random_adapter, save_adapter
from deltafleet.adapters.qadditive import QADDITIVE, dense_rows
from deltafleet.adapters.serving import ADDITIVE, to_quantized_form
from deltafleet.bench.density import kind_configs
from deltafleet.models.config import MODEL_LAYER, PROJECTIONS, ModelConfig
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from deltafleet.serve.engine.backends import CpuBackend, ReferenceBackend
from deltafleet.serve.engine.layout import BatchLayout
from deltafleet.serve.engine.pools import PoolSpec, QAdditivePool
from tests.conftest import assert_close
from tests.serve.conftest import SoloReference


@pytest.fixture(scope="module")
def model_cfg(tiny_llama):
    return ModelConfig.from_file(tiny_llama / "config.json")


@pytest.fixture(scope="module")
def tenants(tiny_llama, model_cfg, tmp_path_factory):
    """q0, q1: whole fine-tunes, U grouped along out (quantized form); r0: U grouped along the rank; lora."""
    root = tmp_path_factory.mktemp("qdelta")
    qcfg = kind_configs(model_cfg, 1 / 4)["ft"]
    for i in range(2):
        save_adapter(random_adapter(model_cfg, qcfg, seed=60 + i, whole=True), root / f"q{i}", model_cfg=model_cfg)
    save_adapter(random_adapter(model_cfg, replace(qcfg, u_groups="rank"), seed=62, whole=True), root / "r0",
                 model_cfg=model_cfg)
    save_adapter(random_adapter(model_cfg, LoraConfig(r=4, alpha=8.0, targets=PROJECTIONS), seed=63), root / "lora",
                 model_cfg=model_cfg)
    return root


def _engine(tiny_llama, root, **kw):
    cfg = dict(dtype="float32", max_batch=8, max_model_len=64, lora_slots=2, max_lora_rank=4, delta_slots=2,
               qdelta_slots=2, max_delta_rank=256, road_slots=0, pafi_slots=0, hiwi_slots=0) | kw
    return Engine.from_pretrained(tiny_llama, root, EngineConfig(**cfg))


def test_placement_and_answers_equal_the_merge_in_a_mixed_batch(tiny_llama, tenants):
    engine = _engine(tiny_llama, tenants)
    names = ["q0", None, "lora", "q1", "r0", "q0", "lora"]
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    reqs = [Request([3 + i, 17, 40 + 2 * i, 9], params, adapter=n) for i, n in enumerate(names)]
    outs = engine.generate(reqs)
    ref = SoloReference(tiny_llama, tenants)
    for r, o in zip(reqs, outs, strict=True):
        assert o.error is None and o.token_ids == ref(r.prompt_ids, 6, r.adapter), r.adapter
    families = {name: engine.adapters.host[name].family for name in ("q0", "q1", "r0", "lora")}
    assert families == {"q0": QADDITIVE, "q1": QADDITIVE, "r0": ADDITIVE, "lora": ADDITIVE}
    pools = {e.name: e.slot[0].name for e in engine.adapters.entries.values() if e.slot is not None}
    assert pools["q0"] == pools["q1"] == "qdelta" and pools["r0"] == "delta"


def test_without_a_qdelta_pool_the_tenant_is_served_expanded(tiny_llama, tenants):
    quantized = _engine(tiny_llama, tenants)
    expanded = _engine(tiny_llama, tenants, qdelta_slots=0)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    reqs = [Request([5, 11, 2, 30], params, adapter="q1"), Request([7, 7, 1], params, adapter="q0")]
    assert [o.token_ids for o in quantized.generate(reqs)] == [o.token_ids for o in expanded.generate(reqs)]
    assert expanded.adapters.host["q1"].family == ADDITIVE and quantized.adapters.host["q1"].family == QADDITIVE


def test_a_tenant_the_qdelta_pool_cannot_take_now_is_served_expanded(tiny_llama, tenants, model_cfg):
    """A tenant of another group size than the qdelta pool's residents: expanded into 'delta', the same answer."""
    qcfg = replace(kind_configs(model_cfg, 1 / 4)["ft"], group_size=64)
    save_adapter(random_adapter(model_cfg, qcfg, seed=64, whole=True), tenants / "g64", model_cfg=model_cfg)
    engine = _engine(tiny_llama, tenants)
    params = SamplingParams(max_tokens=6, ignore_eos=True)
    first = engine.generate([Request([4, 8, 15], params, adapter="q0")])
    engine.adapters.wait_loaded("g64")
    out = engine.generate([Request([4, 8, 15], params, adapter="g64"), Request([4, 8, 15], params, adapter="q0")])
    ref = SoloReference(tiny_llama, tenants)
    assert [o.token_ids for o in out] == [ref([4, 8, 15], 6, "g64"), first[0].token_ids]
    assert engine.adapters.host["g64"].family == ADDITIVE and engine.adapters.entries["g64"].slot[0].name == "delta"


def _forms(model_cfg, ratio, seed, group_size=None):
    qcfg = kind_configs(model_cfg, ratio)["ft"]
    if group_size is not None:
        qcfg = replace(qcfg, group_size=group_size)
    return to_quantized_form(random_adapter(model_cfg, qcfg, seed=seed, whole=True), torch.float32)


def test_a_larger_tenant_regrows_the_pool_keeping_the_others(model_cfg):
    small, large = _forms(model_cfg, 1 / 8, 70), _forms(model_cfg, 1 / 2, 71)
    key = (0, "gate_proj")
    assert large.modules[key]["data"].numel() > small.modules[key]["data"].numel()
    pool = QAdditivePool(PoolSpec("qdelta", QADDITIVE, 3, 256), model_cfg, torch.float32)
    pool.write(0, small)
    held = pool.tensors[key]
    out_f, in_f = model_cfg.linear_shape("gate_proj")

    def rows(slot):
        return dense_rows({n: t[slot] for n, t in pool.tensors[key].items()}, in_f, out_f, pool.group)

    before = rows(0)
    pool.write(1, large)
    assert pool.tensors[key] is not held  # regrown: a new dict, so bound kernels rebind
    for got, want in zip(rows(0), before, strict=True):
        assert torch.equal(got, want)
    want = dense_rows(large.modules[key], in_f, out_f, large.group)
    for got, w in zip(rows(1), want, strict=True):
        assert torch.equal(got, w)
    pool.clear(1)
    assert rows(1)[0].shape[0] == 0 and not bool(pool.tensors[key]["bits"][1].any())  # no rows: the null row's


def test_one_group_size_per_pool(model_cfg):
    g64, g128 = _forms(model_cfg, 1 / 4, 72, group_size=64), _forms(model_cfg, 1 / 4, 73, group_size=128)
    pool = QAdditivePool(PoolSpec("qdelta", QADDITIVE, 2, 256), model_cfg, torch.float32)
    pool.write(0, g64)
    assert pool.accepts(g64) and not pool.accepts(g128)
    with pytest.raises(ValueError, match="group size 128 differs from the pool's 64"):
        pool.write(1, g128)
    pool.clear(0)
    assert pool.accepts(g128)
    pool.write(1, g128)
    assert pool.group == 128


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backends_agree_on_a_qdelta_pool(model_cfg, dtype):
    """The native kernels, the torch path (each distinct slot's rows dequantized) and the token-by-token reference
    give the same projection and embedding outputs for a batch over two tenants, an empty row and runs of one slot."""
    pool = QAdditivePool(PoolSpec("qdelta", QADDITIVE, 3, 256), model_cfg, torch.float32)
    for slot, seed in ((0, 80), (2, 81)):
        pool.write(slot, _forms(model_cfg, 1 / 4, seed))
    rows = [(pool, 2), (None, -1), (pool, 0), (pool, 2), (pool, 2)]
    layout = BatchLayout.build(rows, 3)
    (step,) = layout.pool_steps
    g = torch.Generator().manual_seed(9)
    out_f, in_f = model_cfg.linear_shape("down_proj")
    x = torch.randn(len(rows) * 3, in_f, generator=g).to(dtype)
    y = torch.randn(len(rows) * 3, out_f, generator=g).to(dtype)
    ids = torch.randint(0, model_cfg.vocab_size, (len(rows) * 3,), generator=g)
    e = torch.randn(len(rows) * 3, model_cfg.hidden_size, generator=g).to(dtype)
    proj, table = pool.tensors[(1, "down_proj")], pool.tensors[(MODEL_LAYER, "lm_head")]
    backends = {"reference": ReferenceBackend(), "torch": CpuBackend(native=False), "native": CpuBackend()}
    got = {name: (b.apply_qadditive(x, y.clone(), proj, step), b.apply_embedding(ids, e.clone(), table, step))
           for name, b in backends.items()}
    op = "reordered" if dtype is torch.float32 else "rounded"
    for name in ("torch", "native"):
        for i, want in enumerate(got["reference"]):
            assert_close(got[name][i].float(), want.float(), op, dtype, k=in_f, msg=name)
    assert all(b is not None for _, b in backends["native"]._bound.values())  # the kernels were taken
    assert torch.equal(got["native"][0][3:6], y[3:6])  # the base row is untouched
    assert not torch.equal(got["native"][0][:3], y[:3])


def test_fused_calls_follow_a_regrown_pool(model_cfg):
    """A projection's fused call (`CpuBackend.fuse`, kept across steps) is built again once the pool regrows (a new
    tensor dict, `Pool.version`): after a larger tenant arrives, the hook still equals the reference backend's, for
    the old tenant and the new one."""
    pool = QAdditivePool(PoolSpec("qdelta", QADDITIVE, 3, 256), model_cfg, torch.bfloat16)
    pool.write(0, _forms(model_cfg, 1 / 8, 90))
    native, reference = CpuBackend(), ReferenceBackend()
    out_f, in_f = model_cfg.linear_shape("gate_proj")
    g = torch.Generator().manual_seed(3)

    def both(rows):
        layout = BatchLayout.build(rows, 1)
        x = torch.randn(len(rows), 1, in_f, generator=g).to(torch.bfloat16)
        y = torch.randn(len(rows), 1, out_f, generator=g).to(torch.bfloat16)
        return (layout.hook(native)(0, "gate_proj", x, y.clone()), layout.hook(reference)(0, "gate_proj", x, y.clone()))

    got, want = both([(pool, 0), (None, -1), (pool, 0)])
    assert_close(got.float(), want.float(), "rounded", torch.bfloat16, k=in_f)
    version = pool.version
    pool.write(1, _forms(model_cfg, 1 / 2, 91))  # larger: regrows every module
    assert pool.version > version
    got, want = both([(pool, 1), (pool, 0), (None, -1)])
    assert_close(got.float(), want.float(), "rounded", torch.bfloat16, k=in_f)
    assert len(native._tables) == 2  # one fused table per pool version


def test_a_fused_norm_equals_the_norm_then_its_gain_hook(model_cfg):
    """bf16, the model's native RMSNorm: the hook's one-call norm (`hook.norm`, `CpuBackend.fuse_norm`) gives the
    bits of the norm followed by the gain hook (`hook(layer, name, unit, y)`), for tenant rows and base rows; over
    a plain torch RMSNorm it declines (None), so a row's bits never depend on its batch."""
    from deltafleet.models.llama import RMSNorm
    from deltafleet.models.prepack import NativeRMSNorm

    pool = QAdditivePool(PoolSpec("qdelta", QADDITIVE, 3, 256), model_cfg, torch.bfloat16)
    pool.write(0, _forms(model_cfg, 1 / 4, 92))
    pool.write(2, _forms(model_cfg, 1 / 4, 93))
    H, g = model_cfg.hidden_size, torch.Generator().manual_seed(4)
    plain = RMSNorm(H, model_cfg.rms_norm_eps)
    with torch.no_grad():
        plain.weight.copy_(1 + 0.1 * torch.randn(H, generator=g))
    plain.weight.data = plain.weight.data.to(torch.bfloat16)
    norm = NativeRMSNorm(plain)
    layout = BatchLayout.build([(pool, 2), (None, -1), (pool, 0), (pool, 2)], 3)
    x = torch.randn(4, 3, H, generator=g).to(torch.bfloat16) * 4
    for layer, name in ((1, "post_attention_layernorm"), (MODEL_LAYER, "norm")):
        with torch.inference_mode():
            hook = layout.hook(CpuBackend())
            got = hook.norm(layer, name, norm, x)
            want = hook(layer, name, norm.unit(x), norm(x))
            assert got is not None and torch.equal(got, want)
            assert hook.norm(layer, name, plain, x) is None
            assert not torch.equal(want[:, 1], want[:, 0])  # (non-trivial gains)
