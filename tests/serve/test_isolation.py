"""No request can affect another: inf/NaN logits, a raising sampler, a raising forward and tiny temperatures fail
(or are served) alone, and every other request of the batch gets exactly the tokens it gets alone."""

from __future__ import annotations

import math
import time

import pytest
import torch

from deltafleet.adapters import Adapter, LoraConfig, RoadConfig, random_adapter
from deltafleet.adapters.hiwi import HiwiConfig
from deltafleet.adapters.pafi import PafiConfig
from deltafleet.serve.engine import FinishReason, Request, SamplingParams
from deltafleet.serve.engine import sampling as sampling_module
from deltafleet.serve.engine.sampling import GREEDY_BELOW, RowFailure, filter_logits, sample
from tests.serve.conftest import ALL
from tests.serve.test_engine_correctness import make_engine

# Victims: the base and adapters of every pool, prompts of different lengths (the short ones read masked KV
# positions of their cache slot while a long one sets the step's key length).
VICTIMS = [([5, 9, 77], None), ([200, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23],
            "lora-r8-all"), ([11, 12], "road1-all"), ([7, 1, 7, 1, 7, 1, 7], "delta-r6"), ([42], "lora-r2-qv")]
MAX_TOKENS = 6
# Long enough that a later victim in its cache slot reads its stale positions as masked keys.
ATTACK_PROMPT = list(range(30, 60))


def victims() -> list[Request]:
    return [Request(p, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), adapter=a) for p, a in VICTIMS]


def assert_exact(outs, reqs, solo) -> None:
    for r, o in zip(reqs, outs, strict=True):
        assert o.finish_reason == FinishReason.LENGTH and o.error is None, (r.adapter, o.error)
        assert o.token_ids == solo(r.prompt_ids, r.params.max_tokens, r.adapter), r.adapter


def run(engine, requests: list[Request], before_step=None, timeout: float = 60.0) -> list:
    """Submit, then step until all finish (calling `before_step(handles)` first each time); the outputs."""
    handles = [engine.submit(r) for r in requests]
    end = time.monotonic() + timeout
    while not all(h.done.is_set() for h in handles):
        assert time.monotonic() < end, "requests did not finish"
        if before_step is not None:
            before_step(handles)
        if not engine.step():
            time.sleep(0.001)  # an adapter is loading
    return [h.result for h in handles]


BROKEN_CONFIGS = {"lora": LoraConfig(r=4, alpha=8.0, targets=ALL), "road": RoadConfig(group_size=64, targets=ALL),
                  "pafi": PafiConfig(density=0.02, targets=ALL), "hiwi": HiwiConfig()}


def broken_adapter(cfg, kind: str, value: float, seed: int = 7) -> Adapter:
    """A random adapter with `value` (NaN or inf) in the first element of every floating-point tensor."""
    a = random_adapter(cfg, BROKEN_CONFIGS[kind], seed=seed)
    for params in a.params.values():
        for t in params.values():
            if t.is_floating_point():
                t.view(-1)[0] = value
    return a


# ---------------------------------------------------------------------------------------------- sampling rows

TINY = [1e-38, 1e-45, 1e-300, 2.3e-308, 1e-310, 5e-324]


def flushing() -> bool:
    """Whether this thread's CPU flushes subnormal floats to zero."""
    return bool(torch.tensor(5e-324, dtype=torch.float64) * 2 == 0)


@pytest.mark.parametrize("flush_denormal", [False, True])
@pytest.mark.parametrize("temperature", TINY)
def test_tiny_temperatures_give_finite_near_greedy_sampling(temperature, flush_denormal):
    """Finite scaled logits for every normal temperature; subnormal ones (0 to a flush-to-zero CPU) are greedy."""
    logits = torch.tensor([[3.0, 30.0, -2.0, 29.999, -1e4]] * 3)
    params = [SamplingParams(temperature=temperature, **kw) for kw in ({}, {"top_p": 0.5}, {"top_k": 2})]
    was = flushing()  # the native kernels' -ffast-math build may have turned it on in this thread
    if not torch.set_flush_denormal(flush_denormal):
        pytest.skip("this CPU has no flush-to-zero mode")
    try:
        if temperature >= GREEDY_BELOW:
            for p in params:
                scaled = filter_logits(logits[0], p)
                assert not scaled.isnan().any() and scaled.max() == 0 and scaled.argmax() == 1
                assert scaled.softmax(-1)[1] == 1.0
        assert sample(logits, params, [torch.Generator().manual_seed(i) for i in range(3)]) == [1, 1, 1]
    finally:
        torch.set_flush_denormal(was)


def test_sample_fails_only_rows_with_non_finite_logits():
    logits = torch.randn(5, 50)
    logits[1, 3], logits[3, 0] = float("nan"), float("inf")
    logits[4] = 1e37  # huge but finite: the row sum overflows, the row is still fine
    params = [SamplingParams(), SamplingParams(), SamplingParams(temperature=0.7, seed=1),
              SamplingParams(temperature=0.7, seed=2), SamplingParams(temperature=1e-38)]
    out = sample(logits, params, [None, None, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2),
                                  torch.Generator().manual_seed(3)])
    assert out[0] == int(logits[0].argmax())
    assert isinstance(out[1], RowFailure) and isinstance(out[3], RowFailure)
    assert "non-finite logits" in str(out[1])
    assert isinstance(out[2], int) and 0 <= out[2] < 50 and isinstance(out[4], int)


# ---------------------------------------------------------------------------------------------- engine

@pytest.mark.parametrize("temperature", TINY)
def test_tiny_temperature_is_served_as_near_greedy_and_harms_no_one(tiny_llama, adapters_dir, solo, temperature):
    engine = make_engine(tiny_llama, adapters_dir, max_batch=12)
    attackers = [Request(ATTACK_PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=3,
                                                       ignore_eos=True, **kw), adapter=a)
                 for kw, a in (({}, "lora-r8-all"), ({"top_p": 0.5}, None), ({"top_k": 7}, "road2-qkv"))]
    reqs = victims()
    outs = run(engine, [*attackers, *reqs])
    assert_exact(outs[len(attackers):], reqs, solo)
    # a temperature this small is greedy in effect (the tiny model's logits have no exact ties)
    assert_exact(outs[:len(attackers)], attackers, solo)


@pytest.mark.parametrize("value", [math.nan, math.inf])
@pytest.mark.parametrize("kind", ["lora", "road", "pafi", "hiwi"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_broken_adapter_fails_only_its_requests(tiny_llama, adapters_dir, solo, kind, value, temperature):
    engine = make_engine(tiny_llama, adapters_dir, max_batch=12)
    engine.add_adapter("broken", broken_adapter(engine.model.config, kind, value))
    attack = [Request(ATTACK_PROMPT, SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=1),
                      adapter="broken") for _ in range(2)]
    reqs = victims()
    outs = run(engine, [*attack, *reqs])
    assert_exact(outs[2:], reqs, solo)
    for o in outs[:2]:
        assert o.finish_reason == FinishReason.ERROR and o.token_ids == []
        assert o.error == "adapter 'broken': non-finite logits (the forward pass produced inf/NaN)", o.error
    # the attackers' cache slots (0 and 1) go to the next victims, the short ones reading stale positions masked
    reqs = victims()
    assert_exact(run(engine, reqs), reqs, solo)
    assert engine.running == [] and all(e.refs == 0 for e in engine.adapters.entries.values())


def test_pafi_tenant_with_a_foreign_mask_fails_only_its_requests(tiny_llama, adapters_dir, solo):
    """A PaFi tenant whose mask differs from the resident PaFi tenants' (another base's, same density) is refused
    when it is placed: its requests fail with the rule named, everyone else is served exactly. (The pool adopts the
    mask of the first tenant placed in it while empty: see the README's PaFi section for that limit.)"""
    engine = make_engine(tiny_llama, adapters_dir, max_batch=12)
    pafi = Request([3, 4, 5], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), adapter="pafi-all")
    assert_exact(run(engine, [pafi]), [pafi], solo)  # resident: the pool holds its mask
    odd = random_adapter(engine.model.config, PafiConfig(density=0.02, targets=ALL), seed=3)
    for p in odd.params.values():
        p["cols"] = p["cols"].flip(0).contiguous()  # the same entry count, other positions
    engine.add_adapter("odd-mask", odd)
    reqs = [pafi, *victims()]
    attack = [Request(ATTACK_PROMPT, SamplingParams(max_tokens=MAX_TOKENS), adapter="odd-mask")]
    outs = run(engine, [*attack, *reqs])
    assert outs[0].finish_reason == FinishReason.ERROR and "sparsity mask differs" in outs[0].error, outs[0].error
    assert_exact(outs[1:], reqs, solo)


def test_sampling_exception_fails_only_that_request(tiny_llama, adapters_dir, solo, monkeypatch):
    engine = make_engine(tiny_llama, adapters_dir, max_batch=12)
    sampled = Request([8, 6, 4], SamplingParams(max_tokens=MAX_TOKENS, temperature=0.9, seed=11, ignore_eos=True),
                      adapter="lora-r16-mlp")
    alone = run(engine, [sampled])[0].token_ids
    real = sampling_module.filter_logits

    def exploding(logits, params):
        if params.seed == 666:
            raise RuntimeError("sampler exploded")
        return real(logits, params)

    monkeypatch.setattr(sampling_module, "filter_logits", exploding)
    attack = Request([1, 2, 3], SamplingParams(max_tokens=MAX_TOKENS, temperature=1.0, seed=666), adapter="road4-mlp")
    reqs = victims()
    again = Request([8, 6, 4], sampled.params, adapter="lora-r16-mlp")
    outs = run(engine, [attack, again, *reqs])
    assert outs[0].finish_reason == FinishReason.ERROR
    assert outs[0].error == "adapter 'road4-mlp': sampling failed: RuntimeError: sampler exploded"
    assert outs[1].token_ids == alone and outs[1].finish_reason == FinishReason.LENGTH
    assert_exact(outs[2:], reqs, solo)


def explode(engine, path: str, armed=lambda: True) -> None:
    """Make adapter 'boom' raise inside the forward while `armed()`: in its pool's additive applier (`path` =
    "applier", fused calls off), or in the fused call of each projection whose pools include it ("fused")."""

    def boom_in(step):
        e = engine.adapters.entries.get("boom")
        return armed() and e.slot is not None and step.pool is e.slot[0] and bool((step.index == e.slot[1]).any())

    def exploding(*args):
        raise RuntimeError("kernel exploded")

    if path == "applier":
        real = engine.backend.apply_additive

        def applier(x, y, tensors, step):
            return exploding() if boom_in(step) else real(x, y, tensors, step)

        engine.backend.apply_additive = applier  # what the batch layout looks up each step
        engine.backend.fuse = lambda members, x, y: None
    else:  # fused calls are built once and kept across steps: the check runs at each call, on that forward's steps
        current, real_prepare, real_fuse = [], engine.backend.prepare, engine.backend.fuse

        def prepare(steps):
            current[:] = steps
            real_prepare(steps)

        def fuse(members, x, y):
            fused, pools = real_fuse(members, x, y), {id(st.pool) for st, _ in members}

            def call(x, y):
                if any(id(st.pool) in pools and boom_in(st) for st in current):
                    exploding()
                return fused is not None and fused(x, y)

            return call

        engine.backend.prepare, engine.backend.fuse = prepare, fuse


@pytest.mark.parametrize("path", ["applier", "fused"])
@pytest.mark.parametrize("phase", ["prefill", "decode"])
def test_forward_failure_fails_only_the_adapter_that_raises(tiny_llama, adapters_dir, solo, phase, path):
    engine = make_engine(tiny_llama, adapters_dir, max_batch=12)
    engine.add_adapter("boom", adapters_dir / "lora-r4-ko")
    armed = [phase == "prefill"]
    explode(engine, path, lambda: armed[0])
    attack = Request([3, 3, 3], SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), adapter="boom")
    reqs = victims()

    def arm(handles):
        armed[0] = armed[0] or bool(handles[0].out)

    outs = run(engine, [attack, *reqs], before_step=arm)
    assert outs[0].finish_reason == FinishReason.ERROR
    assert outs[0].error == "adapter 'boom': forward pass failed: RuntimeError: kernel exploded"
    assert len(outs[0].token_ids) == (0 if phase == "prefill" else 1)
    assert_exact(outs[1:], reqs, solo)


@pytest.mark.parametrize("path", ["applier", "fused"])
def test_a_prompt_that_fails_inside_a_mixed_step_fails_alone(tiny_llama, adapters_dir, solo, path):
    """The attacker's prompt arrives while the victims decode, so it runs in their step's forward (mixed steps), and
    its adapter raises there: the step runs again per adapter group, the attacker fails, every victim's answer
    stays exact."""
    engine = make_engine(tiny_llama, adapters_dir, max_batch=12)
    engine.add_adapter("boom", adapters_dir / "lora-r4-ko")
    explode(engine, path)
    reqs = victims()
    handles = [engine.submit(r) for r in reqs]
    engine.step()  # the victims' prompts
    assert engine.counters["mixed_steps"] == 0
    attack = engine.submit(Request(ATTACK_PROMPT, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True),
                                   adapter="boom"))
    engine.adapters.wait_loaded("boom")
    while not all(h.done.is_set() for h in [*handles, attack]):
        if not engine.step():
            time.sleep(0.001)
    assert engine.counters["mixed_steps"] >= 1
    assert attack.result.finish_reason == FinishReason.ERROR and attack.result.token_ids == []
    assert attack.result.error == "adapter 'boom': forward pass failed: RuntimeError: kernel exploded"
    assert_exact([h.result for h in handles], reqs, solo)


def test_whole_forward_failure_fails_that_step_and_the_engine_thread_goes_on(tiny_llama, adapters_dir, solo):
    engine = make_engine(tiny_llama, adapters_dir, max_batch=12)
    real = engine.model.forward
    broken = [True]

    def failing(*args, **kw):
        if broken[0]:
            raise RuntimeError("device lost")
        return real(*args, **kw)

    engine.model.forward = failing
    engine.start()
    try:
        outs = engine.generate(victims())
        assert all(o.finish_reason == FinishReason.ERROR for o in outs)
        assert {o.error for o in outs} == {f"{'base model' if a is None else f'adapter {a!r}'}: forward pass failed: "
                                           f"RuntimeError: device lost" for _, a in VICTIMS}
        assert engine._thread.is_alive()
        broken[0] = False
        reqs = victims()
        assert_exact(engine.generate(reqs), reqs, solo)
        assert engine.stats()["running"] == 0
    finally:
        engine.shutdown(deadline=1)
