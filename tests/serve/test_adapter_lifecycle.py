"""Adapter lifecycle under churn: add/remove/replace from any thread, slots freed at once or at the last release,
gauges equal to the listing, every load failure FAILED (logged once, never retried), and the load deadline."""

from __future__ import annotations

import logging
import threading
import time

import pytest
import torch

from deltafleet.adapters import load_adapter
from deltafleet.adapters.serving import ADDITIVE, to_serving_form
from deltafleet.models.config import ModelConfig
from deltafleet.serve.engine import EngineConfig, FinishReason, Request, SamplingParams
from deltafleet.serve.engine import adapters as adapters_module
from deltafleet.serve.engine.adapters import AdapterLoadError, AdapterState, UnknownAdapterError
from deltafleet.serve.engine.pools import AdditivePool, PoolSpec
from tests.conftest import assert_close
from tests.serve.test_engine_correctness import make_engine
from tests.serve.test_isolation import run

PROMPT = [6, 5, 4, 3]


def greedy(adapter: str | None, max_tokens: int = 5, prompt=PROMPT) -> Request:
    return Request(list(prompt), SamplingParams(max_tokens=max_tokens, ignore_eos=True), adapter=adapter)


def assert_gauges_match_listing(engine) -> None:
    rows = engine.adapters.listing()
    resident = sum(r["state"] is AdapterState.RESIDENT for r in rows)
    assert engine.adapters.resident_count == resident == engine.stats()["resident_adapters"]


def in_thread(fn, *args):
    """Run fn(*args) on a fresh thread (not the engine's, not inference mode); re-raise what it raised."""
    box: list = []

    def target():
        try:
            fn(*args)
        except BaseException as e:  # noqa: BLE001 (handed back to the test)
            box.append(e)

    t = threading.Thread(target=target)
    t.start()
    t.join(30)
    if box:
        raise box[0]


def test_pool_mutations_work_from_any_thread(tiny_llama, adapters_dir):
    cfg = load_adapter(adapters_dir / "lora-r8-all").config
    pool = AdditivePool(PoolSpec("lora", ADDITIVE, 2, 16), ModelConfig.from_file(tiny_llama / "config.json"),
                        torch.float32)
    form = to_serving_form(load_adapter(adapters_dir / "lora-r8-all"), torch.float32)
    with torch.inference_mode():  # written on the engine's loop, cleared from another thread, and back
        pool.write(0, form)
    in_thread(pool.clear, 0)
    in_thread(pool.write, 1, form)
    with torch.inference_mode():
        pool.clear(1)
    pool.write(0, form)
    key = next(iter(form.modules))
    assert_close(pool.tensors[key]["A"][0, :cfg.r], form.modules[key]["A"], "exact")  # a copy
    assert pool.tensors[key]["A"][1].abs().sum() == 0 and pool.slot_modules[1] == frozenset()


def test_remove_of_a_resident_idle_adapter_frees_its_slot_at_once(tiny_llama, adapters_dir, solo):
    engine = make_engine(tiny_llama, adapters_dir, lora_slots=1, delta_slots=0)
    engine.add_adapter("extra", adapters_dir / "lora-r8-all")
    run(engine, [greedy("extra")])
    assert engine.adapters.status("extra") is AdapterState.RESIDENT and engine.adapters.resident_count == 1
    in_thread(engine.remove_adapter, "extra")  # e.g. the HTTP server's thread
    assert engine.adapters.resident_count == 0 and engine.adapters.slots_in_use == 0
    assert "extra" not in engine.adapters.names()
    assert_gauges_match_listing(engine)
    out = run(engine, [greedy("lora-r2-qv")])[0]  # the one LoRA slot is free for another adapter
    assert out.token_ids == solo(PROMPT, 5, "lora-r2-qv")


def test_remove_in_use_frees_the_slot_at_the_last_release(tiny_llama, adapters_dir, solo):
    engine = make_engine(tiny_llama, adapters_dir, lora_slots=1, delta_slots=0)
    engine.add_adapter("extra", adapters_dir / "lora-r16-mlp")
    handles = [engine.submit(greedy("extra", n)) for n in (3, 9)]
    while not handles[0].out:
        engine.step()
    in_thread(engine.remove_adapter, "extra")
    assert engine.adapters.resident_count == 0 and engine.adapters.slots_in_use == 1  # held, no longer listed
    assert_gauges_match_listing(engine)
    while not handles[0].done.is_set():
        engine.step()
    assert engine.adapters.slots_in_use == 1  # the other request still holds it
    while not handles[1].done.is_set():
        engine.step()
    assert engine.adapters.slots_in_use == 0
    for h, n in zip(handles, (3, 9), strict=True):
        assert h.result.token_ids == solo(PROMPT, n, "lora-r16-mlp")


def test_churn_of_load_use_remove_cycles_from_another_thread(tiny_llama, adapters_dir, solo):
    """2 LoRA slots, 20 cycles driven from this (non-engine) thread against the running engine loop; names reused;
    every other cycle removes the adapter while its request still runs."""
    engine = make_engine(tiny_llama, adapters_dir, lora_slots=2, delta_slots=0)
    sources = ["lora-r2-qv", "lora-r8-all", "lora-r4-ko", "delta-r6"]
    engine.start()
    try:
        for i in range(20):
            name, source = f"churn-{i % 3}", sources[i % len(sources)]
            engine.add_adapter(name, adapters_dir / source)
            h = engine.submit(greedy(name, 12 if i % 2 else 4))
            if i % 2:
                while not h.out and not h.done.is_set():
                    time.sleep(0.001)
                engine.remove_adapter(name)
                with pytest.raises(UnknownAdapterError):
                    engine.submit(greedy(name))
                assert h.done.wait(30)
            else:
                assert h.done.wait(30)
                engine.remove_adapter(name)
            assert h.result.token_ids == solo(PROMPT, 12 if i % 2 else 4, source), (i, h.result.error)
            assert_gauges_match_listing(engine)
            assert engine.adapters.resident_count == 0 and engine.adapters.slots_in_use == 0
        assert engine.adapters.names() == sorted(p.name for p in adapters_dir.iterdir())
        assert engine.stats()["running"] == 0 and engine.adapters.stats.misses == 20
    finally:
        engine.shutdown(deadline=1)


@pytest.mark.parametrize("source", ["directory", "in-memory"])
def test_replace_under_load_old_requests_finish_on_old_weights(tiny_llama, adapters_dir, solo, source):
    engine = make_engine(tiny_llama, adapters_dir, max_batch=2)
    engine.add_adapter("swap", adapters_dir / "lora-r8-all")
    engine.adapters.wait_loaded("swap", timeout=30)  # so both old requests are admitted in the first step
    old = [engine.submit(greedy("swap", 10, p)) for p in (PROMPT, [9, 9])]
    waiting = engine.submit(greedy("swap", 4, [1, 2]))  # submitted before the swap, admitted after it
    while not all(h.out for h in old):
        engine.step()
    new_weights = adapters_dir / "lora-r16-mlp"
    in_thread(engine.replace_adapter, "swap",
              new_weights if source == "directory" else load_adapter(new_weights, engine.model.config))
    assert engine.adapters.status("swap") is AdapterState.HOST_MEMORY and engine.adapters.slots_in_use == 1
    new = engine.submit(greedy("swap", 6))
    while not all(h.done.is_set() for h in (*old, waiting, new)):
        engine.step()
    assert old[0].result.token_ids == solo(PROMPT, 10, "lora-r8-all")
    assert old[1].result.token_ids == solo([9, 9], 10, "lora-r8-all")
    assert waiting.result.token_ids == solo([1, 2], 4, "lora-r16-mlp")
    assert new.result.token_ids == solo(PROMPT, 6, "lora-r16-mlp")
    assert engine.adapters.slots_in_use == engine.adapters.resident_count == 1  # the old version's slot is free
    assert_gauges_match_listing(engine)
    row = next(r for r in engine.adapters.listing() if r["name"] == "swap")
    assert row["summary"].startswith("r=16") and (row["path"] is None) == (source == "in-memory")


def test_replace_with_bad_weights_raises_and_keeps_the_old(tiny_llama, adapters_dir, solo, tmp_path):
    engine = make_engine(tiny_llama, adapters_dir)
    with pytest.raises(UnknownAdapterError, match="'nope' not found"):
        engine.replace_adapter("nope", adapters_dir / "lora-r8-all")
    run(engine, [greedy("lora-r8-all")])
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 4}')
    (broken / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    with pytest.raises(AdapterLoadError, match="adapter 'lora-r8-all' failed to load: .*adapter_model.safetensors"):
        engine.replace_adapter("lora-r8-all", broken)
    assert engine.adapters.status("lora-r8-all") is AdapterState.RESIDENT
    assert run(engine, [greedy("lora-r8-all")])[0].token_ids == solo(PROMPT, 5, "lora-r8-all")


@pytest.mark.parametrize("exc", [KeyError("__metadata__"), TypeError("'NoneType' object is not subscriptable")])
def test_any_loader_exception_ends_failed_logged_once_and_fails_waiting_requests(
        tiny_llama, adapters_dir, solo, monkeypatch, caplog, exc):
    engine = make_engine(tiny_llama, adapters_dir)
    real, calls = adapters_module.load_adapter, []

    def loader(path, *args, **kw):
        if path.name == "lora-r4-ko":
            calls.append(path)
            raise exc
        return real(path, *args, **kw)

    monkeypatch.setattr(adapters_module, "load_adapter", loader)
    engine.add_adapter("malformed", adapters_dir / "lora-r4-ko")
    with caplog.at_level(logging.ERROR, logger="deltafleet.serve.engine.adapters"):
        outs = run(engine, [greedy("malformed"), greedy("malformed"), greedy("road1-all")])
        outs += run(engine, [greedy("malformed")])
    for o in (outs[0], outs[1], outs[3]):
        assert o.finish_reason == FinishReason.ERROR
        assert o.error == f"adapter 'malformed' failed to load: {type(exc).__name__}: {exc}"
    assert outs[2].token_ids == solo(PROMPT, 5, "road1-all")
    assert engine.adapters.status("malformed") is AdapterState.FAILED
    row = next(r for r in engine.adapters.listing() if r["name"] == "malformed")
    assert row["state"] is AdapterState.FAILED and row["error"] == outs[0].error
    assert len(calls) == 1  # no silent retry
    assert [r.getMessage() for r in caplog.records if "malformed" in r.getMessage()] == [outs[0].error]
    engine.replace_adapter("malformed", adapters_dir / "lora-r2-qv")  # the way back: new weights, same name
    assert run(engine, [greedy("malformed")])[0].token_ids == solo(PROMPT, 5, "lora-r2-qv")


def test_slot_write_failure_fails_that_adapter_only(tiny_llama, adapters_dir, solo):
    engine = make_engine(tiny_llama, adapters_dir)
    engine.adapters.wait_loaded("lora-r2-qv", timeout=30)
    bad = engine.adapters.host["lora-r2-qv"]
    pool = engine.adapters.pools[0]
    real = pool.write

    def write(slot, form):
        if form is bad:
            raise RuntimeError("copy failed")
        real(slot, form)

    pool.write = write
    outs = run(engine, [greedy("lora-r2-qv"), greedy("lora-r8-all"), greedy(None)])
    assert outs[0].finish_reason == FinishReason.ERROR and "RuntimeError: copy failed" in outs[0].error
    assert engine.adapters.status("lora-r2-qv") is AdapterState.FAILED
    assert outs[1].token_ids == solo(PROMPT, 5, "lora-r8-all") and outs[2].token_ids == solo(PROMPT, 5, None)
    assert engine.adapters.slots_in_use == engine.adapters.resident_count == 1
    assert_gauges_match_listing(engine)


def test_requests_waiting_on_a_load_fail_at_the_deadline(tiny_llama, adapters_dir, solo, monkeypatch):
    engine = make_engine(tiny_llama, adapters_dir, adapter_load_timeout=0.3, lora_slots=1)
    real, gate = adapters_module.load_adapter, threading.Event()

    def slow(path, *args, **kw):
        if path.name == "lora-r4-ko":
            gate.wait(30)
        return real(path, *args, **kw)

    monkeypatch.setattr(adapters_module, "load_adapter", slow)
    engine.add_adapter("stuck", adapters_dir / "lora-r4-ko")
    t0 = time.perf_counter()
    handles = [engine.submit(greedy("stuck")) for _ in range(3)]
    while not all(h.done.is_set() for h in handles):
        if not engine.step():
            time.sleep(0.01)
    assert 0.3 <= time.perf_counter() - t0 < 10
    for h in handles:
        assert h.result.finish_reason == FinishReason.ERROR
        assert h.result.error == ("adapter 'stuck' did not finish loading within 0.3 s "
                                  "(EngineConfig.adapter_load_timeout)")
    assert engine.stats()["waiting"] == 0
    gate.set()
    engine.adapters.wait_loaded("stuck", timeout=30)
    assert run(engine, [greedy("stuck")])[0].token_ids == solo(PROMPT, 5, "lora-r4-ko")


def test_waiting_for_a_busy_slot_is_not_a_load_timeout(tiny_llama, adapters_dir, solo):
    engine = make_engine(tiny_llama, adapters_dir, adapter_load_timeout=0.2, lora_slots=1, delta_slots=0)
    for name in ("lora-r2-qv", "lora-r8-all"):
        engine.adapters.wait_loaded(name, timeout=30)
    long, short = engine.submit(greedy("lora-r2-qv", 40)), engine.submit(greedy("lora-r8-all", 3))
    while not (long.done.is_set() and short.done.is_set()):
        engine.step()
        time.sleep(0.01)  # the long request holds the only LoRA slot for > 0.2 s
    assert short.result.finish_reason == FinishReason.LENGTH and short.result.latency > 0.2
    assert long.result.token_ids == solo(PROMPT, 40, "lora-r2-qv")
    assert short.result.token_ids == solo(PROMPT, 3, "lora-r8-all")


def test_adapter_load_timeout_validation():
    with pytest.raises(ValueError, match=r"adapter_load_timeout=0: must be > 0 \(seconds\)"):
        EngineConfig(adapter_load_timeout=0)
    with pytest.raises(ValueError, match="adapter_load_timeout=nan"):
        EngineConfig(adapter_load_timeout=float("nan"))


def test_the_loader_thread_runs_torch_on_one_thread_and_leaves_other_threads_alone():
    import ctypes
    import os
    from concurrent.futures import ThreadPoolExecutor

    from deltafleet.serve.engine.adapters import loader_thread_init
    from tests.threads import name_this_thread, threads_named

    # The loader thread gets an OS name of its own, which the threads it creates (OpenMP workers) inherit: counting
    # the threads of that name is immune to other threads of the process starting or ending meanwhile.
    name = b"df-loader-test"

    def named() -> int:
        return threads_named(name)

    def init():
        name_this_thread(name)
        loader_thread_init()

    before = torch.get_num_threads()
    torch.ones(1 << 18).sum()  # this thread's OpenMP team exists
    with ThreadPoolExecutor(1, initializer=init) as ex:
        inside = ex.submit(lambda: (torch.ones(1 << 18).sum(), torch.get_num_threads())[1]).result()
        grown = named()
    later = []
    t = threading.Thread(target=lambda: later.append((torch.ones(1 << 18).sum(), torch.get_num_threads())[1]))
    t.start()
    t.join()
    assert torch.get_num_threads() == before and later == [before]
    try:
        ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)
        gomp = True
    except OSError:
        gomp = False
    assert inside == (1 if gomp else before)  # torch's OpenMP runtime here is libgomp; another one: unchanged
    if gomp and os.path.isdir("/proc/self/task"):  # the loader thread alone: no OpenMP workers of its own (they
        assert grown == 1  # would make libgomp's workers sleep between regions, slowing every op of the engine loop)
