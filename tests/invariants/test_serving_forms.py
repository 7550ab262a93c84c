"""Serving forms, for every registered kind: applied the way the engine applies them (batched slot pools through
the reference and CPU backends), they equal the kind's own `apply`; merge-only kinds have none and the engine
refuses them. A kind defined only here is served in a mixed batch with no change to the engine."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import pytest
import torch

from deltafleet.adapters import KINDS, AdapterConfig, AdapterKind, LoraConfig, random_adapter
from deltafleet.adapters.registry import register_kind
from deltafleet.adapters.serving import (
    ADDITIVE,
    ELEMENTWISE,
    NORM,
    SPARSE,
    ServingParams,
    served_kinds,
    to_serving_form,
)
from deltafleet.models.config import NORMS
from deltafleet.models.generate import greedy_generate
from deltafleet.models.loading import load_model
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from deltafleet.serve.engine.backends import CpuBackend, make_backend
from deltafleet.serve.engine.layout import BatchLayout
from deltafleet.serve.engine.pools import POOL_CLASSES, pool_specs_for
from deltafleet.serve.engine.types import NO_ADAPTER
from tests.conftest import assert_close, forward_chain, token_batch
from tests.invariants.test_adapter_invariants import ALL, CONFIGS

MERGE_ONLY = sorted(set(KINDS) - set(served_kinds()))


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return load_model(tiny_checkpoints["qwen2-bias"])[0]  # has biases: RoAd rotates them too


@pytest.fixture
def ids(model):
    return token_batch(model.config.vocab_size, 4, 7, seed=12)


def test_the_built_in_kinds_are_served_as_documented():
    assert served_kinds() == ["hiwi", "lora", "lowrank", "pafi", "qlowrank", "road"]
    assert MERGE_ONLY == ["bitdelta", "sparse"]
    assert [k for k in sorted(KINDS) if KINDS[k].compact] == ["qlowrank"]


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_serving_form_is_declared_per_projection(model, kind):
    """Served kinds give a valid form for every projection shape, merge-only kinds None."""
    k, cfg = KINDS[kind], CONFIGS[kind]
    g = torch.Generator().manual_seed(1)
    for proj in cfg.targets:
        out_f, in_f = model.config.module_shape(proj)
        sp = k.serving_form(cfg, k.init_params(cfg, out_f, in_f, identity=False, generator=g))
        if kind in MERGE_ONLY:
            assert sp is None
            continue
        shapes = {n: tuple(t.shape) for n, t in sp.tensors.items()}
        if sp.family == ADDITIVE:
            assert shapes == {"A": (sp.width, in_f), "B": (sp.width, out_f)}
        elif sp.family == SPARSE:
            nnz = shapes["values"][0]
            assert shapes == {"values": (nnz,), "cols": (nnz,), "row_ptr": (out_f + 1,)}
        elif sp.family == NORM:
            assert shapes == {"delta": (out_f,)} and proj in NORMS
        else:
            assert sp.family == ELEMENTWISE and shapes == {"c": (out_f,), "s": (out_f,)}


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("kind", sorted(set(KINDS) - set(MERGE_ONLY)))
def test_served_form_equals_apply(model, ids, kind, backend):
    """Two adapters of the kind in one pool, rows mixed with the base: each row matches the kind's `apply`."""
    adapters = [random_adapter(model.config, CONFIGS[kind], seed=s) for s in (6, 7)]
    forms = [to_serving_form(a, torch.float32) for a in adapters]
    (spec,) = pool_specs_for((f.family, f.width) for f in forms)
    pool = POOL_CLASSES[spec.family](spec, model.config, torch.float32)
    for slot, form in enumerate(forms):
        pool.write(slot, form)
    layout = BatchLayout.build([(pool, 1), (None, NO_ADAPTER), (pool, 0), (pool, 1)], ids.shape[1])
    with torch.no_grad():
        got = model(ids, hook=layout.hook(make_backend(backend)))
        base = model(ids)
        for row, adapter in ((0, adapters[1]), (2, adapters[0]), (3, adapters[1])):
            want = model(ids[row:row + 1], hook=adapter.hook())[0]
            assert not torch.allclose(want, base[row], atol=1e-2)
            assert_close(got[row], want, "reordered", **forward_chain(model.config))
    assert_close(got[1], base[1], "reordered", **forward_chain(model.config))


@pytest.mark.parametrize("kind", MERGE_ONLY)
def test_engine_refuses_merge_only_kinds(tiny_llama, kind):
    m, _ = load_model(tiny_llama)
    engine = Engine(m, None, EngineConfig(dtype="float32", max_model_len=32, max_batch=2, prepack=False))
    with pytest.raises(ValueError, match=rf"adapter kind '{kind}' is not served .*\(deltafleet merge\)"):
        engine.add_adapter("x", random_adapter(m.config, CONFIGS[kind], seed=1))
    assert engine.adapters.names() == []


def test_serving_params_validation():
    t = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="family='dense': must be one of"):
        ServingParams("dense", 2, {"A": t, "B": t})
    with pytest.raises(ValueError, match=r"tensors=\['A'\]: additive slots hold \['A', 'B'\]"):
        ServingParams(ADDITIVE, 2, {"A": t})


# ------------------------------------------------------------------------------------ a kind defined in a test

@dataclass(frozen=True)
class OuterConfig(AdapterConfig):
    """A rank-1 delta dW = s * u v^T, u (out,), v (in,): a kind that exists only in this test."""

    scale: float = 2.0
    kind: ClassVar[str] = "test_outer"


class OuterKind(AdapterKind):
    name = "test_outer"
    config_cls = OuterConfig
    param_names = ("u", "v")

    def param_shapes(self, cfg, out_features, in_features):
        return {"u": (out_features,), "v": (in_features,)}

    def init_params(self, cfg, out_features, in_features, *, identity, generator):
        u = torch.zeros(out_features) if identity else torch.randn(out_features, generator=generator)
        return {"u": u, "v": torch.randn(in_features, generator=generator) / math.sqrt(in_features)}

    def apply(self, cfg, params, x, y):
        return y + cfg.scale * (x @ params["v"].to(x.dtype))[..., None] * params["u"].to(x.dtype)

    def delta_weight(self, cfg, params, weight):
        return cfg.scale * torch.outer(params["u"].float(), params["v"].float())

    def serving_form(self, cfg, params):
        return ServingParams(ADDITIVE, 1, {"A": params["v"].float()[None], "B": cfg.scale * params["u"].float()[None]})


@pytest.fixture
def outer_kind():
    register_kind(OuterKind())
    try:
        yield KINDS["test_outer"]
    finally:
        KINDS.unregister("test_outer")


def test_a_kind_registered_outside_the_package_is_served_in_mixed_batches(tiny_llama, outer_kind):
    ref, _ = load_model(tiny_llama)
    outer = random_adapter(ref.config, OuterConfig(targets=ALL), seed=3)
    lora = random_adapter(ref.config, LoraConfig(r=4, alpha=16.0, targets=ALL), seed=4)
    engine = Engine(load_model(tiny_llama)[0], None, EngineConfig(dtype="float32", max_model_len=48, max_batch=6))
    engine.add_adapter("outer", outer)
    engine.add_adapter("lora", lora)
    assert "test_outer" in served_kinds()
    g = torch.Generator().manual_seed(5)
    names = ["outer", None, "lora", "outer", None, "outer"]
    reqs = [Request(torch.randint(0, 320, (2 + i,), generator=g).tolist(),
                    SamplingParams(max_tokens=6, ignore_eos=True), adapter=n) for i, n in enumerate(names)]
    hooks = {"outer": outer.hook(), "lora": lora.hook(), None: None}
    differs = False
    for r, o in zip(reqs, engine.generate(reqs), strict=True):
        want = greedy_generate(ref, r.prompt_ids, 6, hook=hooks[r.adapter])
        assert o.token_ids == want, r.adapter
        differs |= r.adapter == "outer" and want != greedy_generate(ref, r.prompt_ids, 6)
    assert differs  # the toy adapter changes greedy tokens: the comparison is not base vs base
    assert {p.name for p in engine.adapters.pools if p.slot_modules[0]} == {"lora"}  # both in the additive pool


def test_cpu_backend_applies_every_family_the_pools_have():
    assert set(CpuBackend.appliers) == set(POOL_CLASSES)
    with pytest.raises(ValueError, match="pool family 'dense': backend 'cpu' applies"):
        CpuBackend().applier("dense")


def test_register_kind_refuses_a_compact_merge_only_kind():
    class CompactMergeOnly(OuterKind):
        compact = True
        serving_form = AdapterKind.serving_form

    with pytest.raises(TypeError, match="'test_outer': compact=True needs a serving_form"):
        register_kind(CompactMergeOnly())
    assert "test_outer" not in KINDS
