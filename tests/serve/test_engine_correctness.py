"""Mixed batches through the engine give every request the tokens it gets alone with its adapter merged."""

from __future__ import annotations

import random

import pytest
import torch

from deltafleet.models.loading import load_model
from deltafleet.serve.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams
from tests.serve.conftest import ADAPTER_CONFIGS

NAMES = sorted(ADAPTER_CONFIGS)


def make_engine(base, adapters_dir, **kw):
    cfg = dict(dtype="float32", max_model_len=64, lora_slots=8, max_lora_rank=16, delta_slots=2,
               max_delta_rank=64, road_slots=4)
    cfg.update(kw)
    model, _ = load_model(base)
    return Engine(model, None, EngineConfig(**cfg), adapters_dir=adapters_dir)


def workload(n: int, pattern: str, with_base: bool, seed: int) -> list[Request]:
    rng = random.Random(seed)
    choices = NAMES + ([None] if with_base else [])
    reqs = []
    for i in range(n):
        if pattern == "distinct":
            adapter = choices[i % len(choices)]
        elif pattern == "identical":
            adapter = choices[seed % len(choices)]
        else:  # zipf: adapter k drawn with weight 1/(k+1)
            adapter = rng.choices(choices, weights=[1 / (k + 1) for k in range(len(choices))])[0]
        prompt = [rng.randrange(320) for _ in range(rng.randint(1, 20))]
        reqs.append(Request(prompt, SamplingParams(max_tokens=rng.randint(1, 10), ignore_eos=True), adapter=adapter))
    return reqs


@pytest.mark.parametrize("n", [1, 3, 7, 33])
@pytest.mark.parametrize("pattern,with_base", [("distinct", True), ("identical", False), ("zipf", True),
                                               ("zipf", False)])
def test_mixed_batch_equals_solo_merged(tiny_llama, adapters_dir, solo, n, pattern, with_base):
    engine = make_engine(tiny_llama, adapters_dir, max_batch=16)  # 33 requests: some queue, then join
    reqs = workload(n, pattern, with_base, seed=n)
    outs = engine.generate(reqs)
    for r, o in zip(reqs, outs, strict=True):
        assert o.finish_reason == FinishReason.LENGTH
        assert o.token_ids == solo(r.prompt_ids, r.params.max_tokens, r.adapter), (r.adapter, r.prompt_ids)
    assert len({tuple(o.token_ids) for o in outs if o.completion_tokens > 3}) > 1 or n == 1 or pattern == "identical"


def test_reference_backend_matches(tiny_llama, adapters_dir, solo):
    engine = make_engine(tiny_llama, adapters_dir, backend="reference", max_batch=7)
    reqs = workload(7, "distinct", True, seed=3)
    for r, o in zip(reqs, engine.generate(reqs), strict=True):
        assert o.token_ids == solo(r.prompt_ids, r.params.max_tokens, r.adapter)


def test_bf16_adapter_pools_match_reference_backend(tiny_llama, adapters_dir):
    """bf16 pools under an fp32 model (the native kernels widen the weights as they read them) give the reference
    backend's tokens on the same pools, for LoRA, RoAd and low-rank deltas mixed with base requests."""
    reqs = workload(9, "distinct", True, seed=5)
    cpu = make_engine(tiny_llama, adapters_dir, max_batch=9, adapter_dtype="bfloat16")
    ref = make_engine(tiny_llama, adapters_dir, max_batch=9, adapter_dtype="bfloat16", backend="reference")
    assert cpu.adapter_dtype == torch.bfloat16 and cpu.dtype == torch.float32
    got, want = cpu.generate(reqs), ref.generate(reqs)
    assert [o.token_ids for o in got] == [o.token_ids for o in want]
    pool_dtypes = {t.dtype for p in cpu.adapters.pools for m in p.tensors.values() for t in m.values()
                   if t.is_floating_point()}  # (a sparse pool's shared mask is int32)
    assert pool_dtypes == {torch.bfloat16}


def test_adapters_change_outputs(tiny_llama, adapters_dir, solo):
    """Guard against vacuous equality: each adapter's greedy continuation differs from the base's."""
    prompt = [5, 17, 33, 2, 250, 101]
    base = solo(prompt, 12, None)
    differs = [name for name in NAMES if solo(prompt, 12, name) != base]
    assert len(differs) >= len(NAMES) - 1, differs


def test_chunked_prefill_and_joining_mid_batch(tiny_llama, adapters_dir, solo):
    engine = make_engine(tiny_llama, adapters_dir, prefill_tokens=5, max_batch=4)
    first = workload(4, "distinct", True, seed=11)
    handles = [engine.submit(r) for r in first]
    for _ in range(3):
        engine.step()
    late = workload(6, "zipf", True, seed=12)
    handles += [engine.submit(r) for r in late]
    while not all(h.done.is_set() for h in handles):
        engine.step()
    for r, h in zip(first + late, handles, strict=True):
        assert h.result.token_ids == solo(r.prompt_ids, r.params.max_tokens, r.adapter)


def test_slot_eviction_under_pressure(tiny_llama, adapters_dir, solo):
    """Two LoRA slots for four LoRA adapters: requests wait for slots, evictions happen, outputs stay exact."""
    engine = make_engine(tiny_llama, adapters_dir, lora_slots=2, delta_slots=0, max_batch=4)
    reqs = [Request([3, 4, 5, i], SamplingParams(max_tokens=4, ignore_eos=True), adapter=name)
            for i, name in enumerate(n for n in NAMES * 2 if n.startswith("lora"))]
    for r, o in zip(reqs, engine.generate(reqs), strict=True):
        assert o.token_ids == solo(r.prompt_ids, 4, r.adapter)
    assert engine.adapters.stats.evictions >= 2
    assert engine.adapters.resident_count <= 2


def test_stop_token_ids(tiny_llama, adapters_dir, solo):
    engine = make_engine(tiny_llama, adapters_dir)
    prompt = [9, 8, 7, 6]
    full = solo(prompt, 8, "road1-all")
    stop_at = next(i for i in range(1, 8) if full[i] not in full[:i])
    params = SamplingParams(max_tokens=8, stop_token_ids=(full[stop_at],), ignore_eos=True)
    out = engine.generate([Request(prompt, params, adapter="road1-all")])[0]
    assert out.finish_reason == FinishReason.STOP
    assert out.token_ids == full[: stop_at + 1]


@pytest.mark.parametrize("mixed", [True, False])
def test_prompts_joining_decoding_batches_in_one_forward(tiny_llama, adapters_dir, solo, mixed):
    """Requests admitted while others decode: with `mixed_steps`, their prompt chunks (some split by
    `prefill_tokens`) run in the decode step's forward, laid end to end and padded to the bucket; without, a prefill
    forward runs first. Every adapter kind and the base, every answer equal to its solo reference either way."""
    engine = make_engine(tiny_llama, adapters_dir, max_batch=5, prefill_tokens=7, prefill_bucket=4,
                         mixed_steps=mixed)
    reqs = workload(24, "distinct", True, seed=21)
    outs = engine.generate(reqs)
    for r, o in zip(reqs, outs, strict=True):
        assert o.token_ids == solo(r.prompt_ids, r.params.max_tokens, r.adapter), (r.adapter, r.prompt_ids)
    c = engine.counters
    assert (c["mixed_steps"] > 5) == mixed and (c["mixed_steps"] == 0) == (not mixed)
    assert c["prompt_tokens"] == sum(len(r.prompt_ids) for r in reqs)
    assert c["decode_tokens"] + c["mixed_decode_tokens"] + sum(1 for _ in reqs) == c["generated_tokens"]
