"""`Engine.spawn`: the engine is built on the thread that then runs its step loop; requests from other threads get
the same greedy answers as an engine stepped in the caller's thread; a failing build raises on the caller's
thread and leaves no loop behind; the caller's idle OpenMP team is freed."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

from deltafleet.native import openmp
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from tests.threads import name_this_thread, threads_named


def _requests():
    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    return [Request(prompt_ids=[3 + i, 17, 42, 9 + 2 * i], params=params) for i in range(3)]


def test_spawned_engine_runs_on_its_builder_thread(tiny_llama):
    cfg = EngineConfig(dtype="float32", max_batch=4, max_model_len=64)
    builders = []

    def build():
        builders.append(threading.current_thread())
        return Engine.from_pretrained(tiny_llama, config=cfg)

    engine = Engine.spawn(build)
    try:
        assert engine._thread is builders[0] and engine._thread is not threading.current_thread()
        assert engine._thread.is_alive()
        got = [o.token_ids for o in engine.generate(_requests())]  # waits on the loop thread's work
    finally:
        engine.shutdown()
    assert not builders[0].is_alive()
    want = [o.token_ids for o in Engine.from_pretrained(tiny_llama, config=cfg).generate(_requests())]
    assert got == want


def test_spawn_raises_the_build_error_here():
    def build():
        raise ValueError("no such base")

    before = set(threading.enumerate())
    with pytest.raises(ValueError, match="no such base"):
        Engine.spawn(build)
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - before and time.monotonic() < deadline:
        time.sleep(0.01)  # the builder thread returns right after handing over the error
    assert not set(threading.enumerate()) - before


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or openmp._gomp() is None or torch.get_num_threads() < 2,
                    reason="needs Linux's /proc, libgomp and two OpenMP threads")
def test_spawn_frees_the_callers_idle_openmp_team(tiny_llama):
    # The caller's idle team would leave more OpenMP threads than cores, and libgomp would then stop spinning
    # between the loop's parallel regions (`native.openmp`). Threads are counted by OS names, which OpenMP workers
    # inherit from the thread that creates them.
    caller, loop = b"df-spawn-caller", b"df-spawn-loop"
    cfg = EngineConfig(dtype="float32", max_batch=4, max_model_len=64)
    seen = []

    def build():
        name_this_thread(loop)  # before this thread's first parallel op
        return Engine.from_pretrained(tiny_llama, config=cfg)

    def body():
        name_this_thread(caller)
        torch.ones(1 << 20).mul(2).sum()  # a two-thread op: the caller's team exists
        seen.append(threads_named(caller))
        engine = Engine.spawn(build)
        try:
            deadline = time.monotonic() + 5
            while threads_named(caller) != 1 and time.monotonic() < deadline:
                time.sleep(0.01)
            seen.append(threads_named(caller))
            seen.append(len(engine.generate(_requests())))
        finally:
            engine.shutdown()

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert seen == [torch.get_num_threads(), 1, 3]

