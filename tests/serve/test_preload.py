"""Preloading the host tier (`EngineConfig.preload_adapters`, `AdapterManager.preload`): every scanned adapter read
into host memory in the background, never evicting, stopping when the host cache is full; a request's own load is
not stuck behind the whole preload; answers equal the solo references; a bad adapter fails alone."""

from __future__ import annotations

import time

from deltafleet.serve.engine.adapters import AdapterState
from tests.serve.conftest import ADAPTER_CONFIGS
from tests.serve.test_adapter_lifecycle import PROMPT, greedy
from tests.serve.test_engine_correctness import make_engine
from tests.serve.test_isolation import run


def wait_preloaded(engine, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while engine.adapters.preloading:
        assert time.monotonic() < end, "preload did not finish"
        time.sleep(0.01)


def states(engine) -> dict[str, AdapterState]:
    return {r["name"]: r["state"] for r in engine.adapters.listing()}


def test_preload_reads_every_scanned_adapter_into_host_memory(tiny_llama, adapters_dir, solo):
    engine = make_engine(tiny_llama, adapters_dir, preload_adapters=True)
    wait_preloaded(engine)
    assert set(states(engine).values()) == {AdapterState.HOST_MEMORY}
    assert set(states(engine)) == set(ADAPTER_CONFIGS)
    stats = engine.adapters.stats
    assert stats.preloads == stats.loads == len(ADAPTER_CONFIGS) and stats.host_evictions == 0
    names = ["lora-r8-all", "road1-all", "delta-r6", "hiwi-both"]
    outs = run(engine, [greedy(n) for n in names])
    assert [o.token_ids for o in outs] == [solo(PROMPT, 5, n) for n in names]
    assert engine.adapters.stats.loads == len(ADAPTER_CONFIGS)  # nothing read again
    assert not engine.adapters.timings.to_host  # no request waited for a read


def test_without_the_option_nothing_is_read_until_requested(tiny_llama, adapters_dir):
    engine = make_engine(tiny_llama, adapters_dir)
    time.sleep(0.2)
    assert set(states(engine).values()) == {AdapterState.ON_DISK} and engine.adapters.stats.loads == 0


def test_preload_stops_when_the_host_cache_is_full_and_never_evicts(tiny_llama, adapters_dir):
    sized = make_engine(tiny_llama, adapters_dir, preload_adapters=True)
    wait_preloaded(sized)
    size = {r["name"]: r["bytes"] for r in sized.adapters.listing()}
    order = ["lora-r8-all", "lora-r2-qv", "road1-all", "delta-r40", "road2-qkv"]
    fits = order[:3]
    engine = make_engine(tiny_llama, adapters_dir,
                         host_cache_bytes=sum(size[n] for n in fits) + size["delta-r40"] // 2)
    engine.adapters.preload(order)
    wait_preloaded(engine)
    held = sorted(n for n, s in states(engine).items() if s is AdapterState.HOST_MEMORY)
    assert held == sorted(fits)  # delta-r40 would not fit: preloading stopped there, road2-qkv was not read
    assert engine.adapters.stats.host_evictions == 0 and engine.adapters.stats.preloads == 3
    assert states(engine)["road2-qkv"] is AdapterState.ON_DISK


def test_a_request_during_preload_is_served_and_its_wait_is_timed(tiny_llama, adapters_dir, solo):
    engine = make_engine(tiny_llama, adapters_dir, preload_adapters=True)
    last = sorted(ADAPTER_CONFIGS)[-1]  # preloaded last: the request's own load runs ahead of the queue
    out = run(engine, [greedy(last)])[0]
    assert out.token_ids == solo(PROMPT, 5, last)
    wait_preloaded(engine)
    assert engine.adapters.stats.loads == len(ADAPTER_CONFIGS)  # each read once
    assert len(engine.adapters.timings.to_host) <= 1


def test_a_broken_adapter_fails_alone_during_preload(tiny_llama, adapters_dir, tmp_path, solo):
    import shutil

    d = tmp_path / "adapters"
    shutil.copytree(adapters_dir, d)
    (d / "broken").mkdir()
    (d / "broken" / "adapter_config.json").write_text("{not json")
    engine = make_engine(tiny_llama, d, preload_adapters=True)
    wait_preloaded(engine)
    st = states(engine)
    assert st["broken"] is AdapterState.FAILED
    assert {s for n, s in st.items() if n != "broken"} == {AdapterState.HOST_MEMORY}
    assert "broken" in engine.adapters.error("broken")
    out = run(engine, [greedy("broken"), greedy("road2-qkv")])
    assert out[0].error is not None and out[1].token_ids == solo(PROMPT, 5, "road2-qkv")


def test_a_finished_preload_freezes_the_tenants_out_of_the_cyclic_collector(tiny_llama, adapters_dir):
    """The host tier is long-lived: once a preload ends, its objects are frozen (`gc.freeze`), so a full collection
    no longer scans them (at 1000 density tenants, 1.4M objects and 0.7 s of a stalled engine each time)."""
    import gc

    gc.unfreeze()
    engine = make_engine(tiny_llama, adapters_dir, preload_adapters=True)
    wait_preloaded(engine)
    assert gc.get_freeze_count() > 0
    host = engine.adapters.host
    scanned = {id(o) for o in gc.get_objects()}  # what a collection scans (frozen objects are not listed)
    assert host and all(gc.is_tracked(form) and id(form) not in scanned for form in host.values())
