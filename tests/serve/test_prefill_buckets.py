"""Prefill buckets: however many distinct prompt lengths arrive, the model sees few distinct prefill shapes (each
new token count reaching a oneDNN matmul keeps a cached primitive: memory grew with every new length), and the
padding changes no answer."""

from __future__ import annotations

import pytest
import torch

from deltafleet.models.loading import load_model
from deltafleet.models.prepack import PRIMITIVE_CACHE_VARS, bound_primitive_caches
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams

NO_POOLS = dict(lora_slots=0, delta_slots=0, road_slots=0)


def _prefill_shapes(engine: Engine, lengths: list[int]) -> tuple[set[int], list[list[int]]]:
    seen: set[int] = set()
    forward = engine.model.forward

    def spy(input_ids, *args, **kw):
        if input_ids.shape[1] > 1:  # prefill (decode steps are one token per row)
            seen.add(input_ids.shape[1])
        return forward(input_ids, *args, **kw)

    engine.model.forward = spy
    g = torch.Generator().manual_seed(0)
    outs = engine.generate([Request(torch.randint(3, 200, (n,), generator=g).tolist(),
                                    SamplingParams(max_tokens=3, temperature=0.0, ignore_eos=True)) for n in lengths])
    return seen, [o.token_ids for o in outs]


@pytest.mark.parametrize("bucket", [16, 32])
def test_distinct_prompt_lengths_give_few_prefill_shapes_and_the_same_answers(tiny_llama, bucket):
    lengths = list(range(2, 122, 3))  # 40 distinct lengths
    model, _ = load_model(tiny_llama)
    base = dict(dtype="float32", max_batch=1, max_model_len=160, **NO_POOLS)
    shapes, answers = _prefill_shapes(Engine(model, None, EngineConfig(**base, prefill_bucket=bucket)), lengths)
    assert shapes <= {bucket * k for k in range(1, 128 // bucket + 1)}
    assert len(shapes) <= -(-max(lengths) // bucket)
    model, _ = load_model(tiny_llama)
    plain, reference = _prefill_shapes(Engine(model, None, EngineConfig(**base, prefill_bucket=1)), lengths)
    assert len(plain) == len(lengths)  # without buckets: one shape per length
    assert answers == reference  # padding is masked: the same greedy tokens


def test_prefill_bucket_is_validated():
    with pytest.raises(ValueError, match="prefill_bucket=0"):
        EngineConfig(prefill_bucket=0)


def test_bound_primitive_caches_sets_both_variables(monkeypatch):
    for var in PRIMITIVE_CACHE_VARS:
        monkeypatch.delenv(var, raising=False)
    bound_primitive_caches(64)
    import os

    assert all(os.environ[var] == "64" for var in PRIMITIVE_CACHE_VARS)
    with pytest.raises(ValueError, match="capacity=0"):
        bound_primitive_caches(0)
