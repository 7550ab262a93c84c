"""A slot written over its previous occupant (`Pool.write` does not clear first) holds exactly what a cleared slot
written with the same form holds: wider over narrower and narrower over wider (rank tails, quantized rows past the
new ones), other module sets (the old occupant's other modules cleared), for every pool family the engine
serves; other slots untouched; and a write that fails midway leaves the slot cleared, not half-written."""

from __future__ import annotations

import pytest
import torch

from deltafleet.adapters import LoraConfig, RoadConfig, random_adapter
from deltafleet.adapters.qadditive import QADDITIVE, dense_rows
from deltafleet.adapters.serving import ADDITIVE, ELEMENTWISE, to_quantized_form, to_serving_form
from deltafleet.bench.density import kind_configs
from deltafleet.models.config import ModelConfig
from deltafleet.serve.engine.pools import AdditivePool, ElementwisePool, PoolSpec, QAdditivePool


@pytest.fixture(scope="module")
def cfg(tiny_llama):
    return ModelConfig.from_file(tiny_llama / "config.json")


def _lora(cfg, r, targets, seed):
    return to_serving_form(random_adapter(cfg, LoraConfig(r=r, alpha=2.0 * r, targets=targets), seed=seed),
                           torch.float32)


def _road(cfg, targets, seed):
    return to_serving_form(random_adapter(cfg, RoadConfig(variant="road_1", group_size=8, targets=targets),
                                          seed=seed), torch.float32)


def _ft(cfg, ratio, seed):
    return to_quantized_form(random_adapter(cfg, kind_configs(cfg, ratio)["ft"], seed=seed, whole=True),
                             torch.float32)


def _slot(pool, slot):
    return {key: {name: t[slot].clone() for name, t in m.items()} for key, m in pool.tensors.items()}


def _same(a, b, cfg, group=0):
    """Equal slot contents; a quantized module's as it is read: its bits, and its rows dequantized (offsets, scales
    and data past a slot's first 0 bits are never read, and a write leaves them)."""
    assert a.keys() == b.keys()
    for key in a:
        if "bits" in a[key]:
            assert torch.equal(a[key]["bits"], b[key]["bits"]), key
            out_f, in_f = cfg.module_shape(key[1])
            for x, y in zip(dense_rows(a[key], in_f, out_f, group), dense_rows(b[key], in_f, out_f, group),
                            strict=True):
                assert torch.equal(x, y), key
            continue
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), (key, name)


CASES = {
    "lora wide over narrow": (AdditivePool, ADDITIVE, 16, lambda c: [_lora(c, 4, ("q_proj", "v_proj"), 1),
                                                                    _lora(c, 16, ("q_proj", "up_proj"), 2)]),
    "lora narrow over wide": (AdditivePool, ADDITIVE, 16, lambda c: [_lora(c, 16, ("q_proj", "up_proj"), 3),
                                                                    _lora(c, 4, ("q_proj", "v_proj"), 4)]),
    "road, other modules": (ElementwisePool, ELEMENTWISE, 8, lambda c: [_road(c, ("q_proj", "o_proj"), 5),
                                                                       _road(c, ("o_proj", "down_proj"), 6)]),
    "ft narrow over wide": (QAdditivePool, QADDITIVE, 256, lambda c: [_ft(c, 1 / 2, 7), _ft(c, 1 / 8, 8)]),
    "ft wide over narrow": (QAdditivePool, QADDITIVE, 256, lambda c: [_ft(c, 1 / 8, 9), _ft(c, 1 / 2, 10)]),
}


@pytest.mark.parametrize("case", list(CASES))
def test_a_slot_written_over_its_occupant_equals_a_cleared_slot_written(cfg, case):
    cls, family, width, make = CASES[case]
    first, second = make(cfg)
    over, fresh = (cls(PoolSpec("p", family, 3, width), cfg, torch.float32) for _ in range(2))
    for pool in (over, fresh):  # the same tensors allocated (and grown) in both
        pool.write(2, first)
        pool.write(2, second)
        pool.clear(2)
    over.write(0, first)
    over.write(1, second)
    other = _slot(over, 1)
    over.write(0, second)  # over the first
    fresh.write(0, second)
    group = getattr(over, "group", 0)
    _same(_slot(over, 0), _slot(fresh, 0), cfg, group)
    _same(_slot(over, 1), other, cfg, group)
    assert over.slot_modules[0] == fresh.slot_modules[0] and over.slot_width[0] == fresh.slot_width[0]


def test_a_write_that_fails_midway_leaves_the_slot_cleared(cfg):
    pool = AdditivePool(PoolSpec("p", ADDITIVE, 2, 16), cfg, torch.float32)
    good, bad = _lora(cfg, 8, ("q_proj", "v_proj"), 11), _lora(cfg, 8, ("q_proj", "up_proj"), 12)
    pool.write(0, good)
    key = next(k for k in bad.modules if k[1] == "up_proj")
    bad.modules[key]["B"] = bad.modules[key]["B"][:, :3]  # a wrong shape: its copy raises after others were written
    with pytest.raises(RuntimeError):
        pool.write(0, bad)
    assert pool.slot_modules[0] == frozenset() and pool.slot_width[0] == 0
    for m in pool.tensors.values():
        for name, t in m.items():
            assert not bool(t[0].any()), name
