"""`--plan alloc`: bits per singular vector, module shape and part chosen greedily under the whole delta's budget
(`compress.alloc`): never over the budget, bands contiguous with non-increasing bits, and lower error than the
fixed plan at equal bytes on the tiny fine-tune."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltafleet.compress import CompressSettings, compress_deltas
from deltafleet.compress.alloc import ALLOC_BITS, ShapeGroup, allocate, quant_error, vector_weights
from deltafleet.compress.budget import bands_bytes
from deltafleet.errors import DeltafleetError


def test_quantization_error_falls_with_bits():
    errs = [quant_error(b, 192, 576, 128) for b in (0, *ALLOC_BITS)]
    assert errs[0] == 1.0 and errs[-1] == 0.0 and all(a > b for a, b in zip(errs, errs[1:], strict=False))


def test_vector_weights_are_relative_energies():
    S, Vt = torch.tensor([3.0, 2.0, 1.0]), torch.eye(3)
    torch.testing.assert_close(vector_weights(S, Vt), torch.tensor([9.0, 4.0, 1.0]) / 14)
    H = torch.diag(torch.tensor([1.0, 1.0, 100.0]))  # the input is large along v_3: its weight grows
    w = vector_weights(S, Vt, H)
    assert w[2] > w[1] and float(w.sum()) == pytest.approx(1.0)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([(64, 128), (128, 128), (320, 128)]), st.integers(1, 4),
                          st.floats(0.3, 2.0)), min_size=1, max_size=3, unique_by=lambda t: t[0]),
       st.integers(0, 200_000))
def test_allocation_fits_the_budget_with_contiguous_non_increasing_bands(spec, budget):
    groups = []
    for (o, i), count, alpha in spec:
        k = torch.arange(1, min(o, i) + 1, dtype=torch.float32)
        groups.append(ShapeGroup(o, i, count, count * k ** -alpha / (k ** -alpha).sum()))
    plan = allocate(groups, budget, 32)
    used = sum(g.count * bands_bytes(g.out_f, g.in_f, plan[(g.out_f, g.in_f)], 32, "out") for g in groups)
    assert used <= budget
    for g in groups:
        ranks = plan[(g.out_f, g.in_f)]
        bits = [b for b, _ in ranks]
        assert bits == sorted(bits, reverse=True) and len(set(bits)) == len(bits) and all(r > 0 for _, r in ranks)
        assert sum(r for _, r in ranks) <= min(g.out_f, g.in_f)
    if budget >= 4 * sum(g.count * bands_bytes(g.out_f, g.in_f, ((16, 1),), 32, "out") for g in groups):
        assert all(plan.values())  # room for several fp16 vectors per shape: none is left empty


@pytest.mark.parametrize("ratio", [1 / 8, 1 / 32, 1 / 64])
def test_alloc_beats_the_fixed_plan_at_equal_bytes(tiny_deltas, ratio):
    """Weight-space objective (RTN, no calibration): lower mean relative error within the same whole budget."""
    fixed = compress_deltas(tiny_deltas, CompressSettings("delta-come", ratio=ratio, quantizer="rtn", plan="auto"))
    alloc = compress_deltas(tiny_deltas, CompressSettings("delta-come", ratio=ratio, quantizer="rtn", plan="alloc"))
    assert alloc.bytes <= ratio * alloc.fp16_bytes and fixed.bytes <= ratio * fixed.fp16_bytes
    assert alloc.mean_rel_error < fixed.mean_rel_error
    assert alloc.bytes > 0.95 * ratio * alloc.fp16_bytes  # the budget is used


def test_alloc_with_calibration_and_refusals(tiny_deltas, tiny_base_model, calib_ids):
    c = compress_deltas(tiny_deltas, CompressSettings("delta-come", ratio=1 / 16, plan="alloc"), tiny_base_model,
                        calib_ids)
    assert c.bytes <= c.fp16_bytes / 16 and c.adapter.params
    with pytest.raises(DeltafleetError, match="u_groups='out'"):
        compress_deltas(tiny_deltas, CompressSettings("delta-come", ratio=1 / 16, plan="alloc", quantizer="rtn",
                                                      u_groups="rank"))
    lowrank = compress_deltas(tiny_deltas, CompressSettings("lowrank", ratio=1 / 16, quantizer="rtn"))
    assert {b for _, ranks in lowrank.adapter.config.bands for b, _ in ranks} == {16}  # the default plan: fp16


@pytest.mark.parametrize("ratio", [1 / 8, 1 / 32])
def test_per_matrix_allocation_gives_modules_their_own_plans(tiny_deltas, tmp_path, ratio):
    """alloc_per='matrix': one plan per module (objective no worse than per shape, the same budget), saved and
    loaded with its 'OUTxIN@module' keys; the loaded artifact's factors are the compressed ones."""
    from deltafleet.adapters import load_adapter
    from deltafleet.compress import save_compressed

    per = {a: compress_deltas(tiny_deltas, CompressSettings("delta-come", ratio=ratio, quantizer="rtn", alloc_per=a))
           for a in ("shape", "matrix")}
    m = per["matrix"]
    assert m.bytes <= ratio * m.fp16_bytes and m.bytes > 0.95 * ratio * m.fp16_bytes
    keys = [k for k, _ in m.adapter.config.bands]
    assert all("@" in k for k in keys) and len(keys) == len(tiny_deltas.deltas)
    plans_by_shape: dict = {}
    for k, ranks in m.adapter.config.bands:
        plans_by_shape.setdefault(k.split("@")[0], set()).add(ranks)
    assert any(len(p) > 1 for p in plans_by_shape.values())  # some shape's modules were given different plans
    assert m.mean_rel_error <= per["shape"].mean_rel_error * 1.02
    d = save_compressed(m, tmp_path / "m")
    loaded = load_adapter(d)
    assert loaded.config == m.adapter.config
    for key, params in m.adapter.params.items():
        out_f, in_f = tiny_deltas.deltas[key].shape
        want = m.adapter.kind.delta_weight(m.adapter.config, params, torch.zeros(out_f, in_f))
        got = loaded.kind.delta_weight(loaded.config, loaded.params[key], torch.zeros(out_f, in_f))
        torch.testing.assert_close(got, want)


def test_module_plan_keys_are_validated():
    from deltafleet.adapters.qlowrank import QLowRankConfig

    cfg = QLowRankConfig(targets=("q_proj",), bands=(("64x64", ((2, 4),)), ("64x64@layers.1.q_proj", ((8, 1),))),
                         u_groups="out")
    assert cfg.ranks(64, 64) == ((2, 4),) and cfg.ranks(64, 64, "layers.0.q_proj") == ((2, 4),)
    assert cfg.ranks(64, 64, "layers.1.q_proj") == ((8, 1),)
    for bad in ("64x64@", "64x64@../x", "64x64@layers.1.q_proj.A", "x@layers.1.q_proj"):
        with pytest.raises(ValueError, match="must be a projection shape"):
            QLowRankConfig(targets=("q_proj",), bands=((bad, ((2, 4),)),))
    only_modules = QLowRankConfig(targets=("q_proj",), bands=(("64x64@layers.1.q_proj", ((8, 1),)),))
    with pytest.raises(ValueError, match=r"no band plan for a 64x64 projection \(layers.0.q_proj\)"):
        only_modules.ranks(64, 64, "layers.0.q_proj")
