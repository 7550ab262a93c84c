"""Slot pools built from typed specs: validation, the default pools, sizing pools for given adapters."""

from __future__ import annotations

import pytest
import torch

from deltafleet.adapters import LoraConfig, RoadConfig, random_adapter
from deltafleet.adapters.qadditive import QADDITIVE
from deltafleet.adapters.serving import ADDITIVE, ELEMENTWISE, NORM, SPARSE, to_serving_form
from deltafleet.models.generate import greedy_generate
from deltafleet.models.loading import load_model
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from deltafleet.serve.engine.config import standard_pools
from deltafleet.serve.engine.pools import AdditivePool, ElementwisePool, PoolSpec, pool_specs_for


@pytest.mark.parametrize("args,match", [
    (("", ADDITIVE, 1, 4), "name='': a pool needs a non-empty name"),
    (("p", "dense", 1, 4),
     r"pool 'p': family='dense': must be one of \['additive', 'elementwise', 'norm', 'qadditive', 'sparse'\]"),
    (("p", ADDITIVE, 0, 4), "pool 'p': slots=0: must be an integer >= 1"),
    (("p", ADDITIVE, 2.5, 4), "pool 'p': slots=2.5: must be an integer >= 1"),
    (("p", ADDITIVE, 1, 0), "pool 'p': width=0: must be an integer >= 1"),
    (("p", ELEMENTWISE, 1, 3), r"pool 'p': width=3: must be a positive even integer \(the group size G\)"),
    (("p", ELEMENTWISE, 1, 0), "pool 'p': width=0: must be a positive even integer"),
])
def test_pool_spec_validation(args, match):
    with pytest.raises(ValueError, match=match):
        PoolSpec(*args)


def test_pool_class_holds_its_own_family(tiny_llama):
    cfg = load_model(tiny_llama)[0].config
    with pytest.raises(ValueError, match="pool 'r': family='elementwise': AdditivePool holds additive adapters"):
        AdditivePool(PoolSpec("r", ELEMENTWISE, 1, 64), cfg, torch.float32)


def test_default_pools_are_the_standard_six():
    assert EngineConfig().pools == (PoolSpec("lora", ADDITIVE, 32, 16), PoolSpec("qdelta", QADDITIVE, 32, 256),
                                    PoolSpec("delta", ADDITIVE, 4, 256),
                                    PoolSpec("road", ELEMENTWISE, 64, 64), PoolSpec("pafi", SPARSE, 32, 20_000),
                                    PoolSpec("hiwi", NORM, 64, 1))
    assert EngineConfig(delta_slots=0, road_group_size=32, pafi_slots=0, hiwi_slots=0, qdelta_slots=0).pools == (
        PoolSpec("lora", ADDITIVE, 32, 16), PoolSpec("road", ELEMENTWISE, 64, 32))
    assert EngineConfig(pafi_density=0.005).pools[-2] == PoolSpec("pafi", SPARSE, 32, 5_000)
    assert standard_pools(0, 16, 0, 256, 0, 64) == ()


def test_engine_config_pools_validation():
    spec = PoolSpec("a", ADDITIVE, 2, 8)
    assert EngineConfig(pools=[spec]).pools == (spec,)
    assert EngineConfig(pools=()).pools == ()
    with pytest.raises(ValueError, match="lora_slots=3: pools= replaces the lora/delta/qdelta/road/pafi/hiwi fields"):
        EngineConfig(pools=(spec,), lora_slots=3)
    with pytest.raises(ValueError, match="pools: name 'a' used twice"):
        EngineConfig(pools=(spec, PoolSpec("a", ELEMENTWISE, 1, 64)))
    with pytest.raises(ValueError, match="pools: .* must be a PoolSpec"):
        EngineConfig(pools=(("a", ADDITIVE, 2, 8),))


def test_pool_specs_for_sizes_one_pool_per_family_and_group_size():
    shapes = [(ELEMENTWISE, 64), (ADDITIVE, 4), (ADDITIVE, 16), (ELEMENTWISE, 32), (ELEMENTWISE, 64)]
    assert pool_specs_for(shapes) == (PoolSpec("additive", ADDITIVE, 2, 16),
                                      PoolSpec("elementwise-g32", ELEMENTWISE, 1, 32),
                                      PoolSpec("elementwise-g64", ELEMENTWISE, 2, 64))
    assert pool_specs_for([]) == ()
    with pytest.raises(ValueError, match="family='dense'"):
        pool_specs_for([("dense", 4)])


def test_engine_builds_its_pools_from_specs_and_serves_two_group_sizes(tiny_llama):
    """Sized by `pool_specs_for`, one engine serves RoAd adapters of two group sizes and a LoRA in one batch."""
    ref, _ = load_model(tiny_llama)
    adapters = {"road32": random_adapter(ref.config, RoadConfig(variant="road_2", group_size=32), seed=1),
                "road64": random_adapter(ref.config, RoadConfig(variant="road_4", group_size=64), seed=2),
                "lora": random_adapter(ref.config, LoraConfig(r=4, alpha=16.0), seed=3)}
    forms = [to_serving_form(a, torch.float32) for a in adapters.values()]
    specs = pool_specs_for((f.family, f.width) for f in forms)
    engine = Engine(load_model(tiny_llama)[0], None,
                    EngineConfig(dtype="float32", max_model_len=32, max_batch=4, pools=specs))
    assert [(type(p), p.spec) for p in engine.adapters.pools] == [
        (AdditivePool, specs[0]), (ElementwisePool, specs[1]), (ElementwisePool, specs[2])]
    for name, a in adapters.items():
        engine.add_adapter(name, a)
    names = ["road64", None, "road32", "lora"]
    reqs = [Request([3 + i, 50, 7 * i], SamplingParams(max_tokens=5, ignore_eos=True), adapter=n)
            for i, n in enumerate(names)]
    for r, o in zip(reqs, engine.generate(reqs), strict=True):
        hook = None if r.adapter is None else adapters[r.adapter].hook()
        assert o.token_ids == greedy_generate(ref, r.prompt_ids, 5, hook=hook), r.adapter
    assert [p.slot_width[0] for p in engine.adapters.pools] == [4, 32, 64]
