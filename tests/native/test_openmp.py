"""`native.openmp`: a thread's idle OpenMP team is freed by `release_team`, and `single_thread` keeps a thread from
ever making one. Threads are counted by an OS name given to the test's own thread, which the OpenMP workers it
creates inherit, so other threads of the process starting or ending meanwhile do not change the count."""

import os
import threading
import time

import pytest
import torch

from deltafleet.native import openmp
from tests.threads import name_this_thread, threads_named

pytestmark = pytest.mark.skipif(
    torch.get_num_threads() < 2 or not os.path.isdir("/proc/self/task") or openmp._gomp() is None,
    reason="needs two OpenMP threads, Linux's /proc and libgomp")


def _settled(name: bytes, want: int, timeout: float = 5.0) -> int:
    """The count of threads named `name`, waiting up to `timeout` for it to reach `want` (workers exit after the
    release returns)."""
    end = time.monotonic() + timeout
    while (n := threads_named(name)) != want and time.monotonic() < end:
        time.sleep(0.01)
    return n


def _in_named_thread(name: bytes, body):
    out = []

    def run():
        name_this_thread(name)
        out.append(body())

    t = threading.Thread(target=run)
    t.start()
    t.join()
    return out[0]


def test_release_team_frees_the_idle_team_and_a_later_op_makes_a_new_one():
    name = b"df-omp-release"
    x = torch.ones(1 << 20)

    def body():
        counts = [threads_named(name)]
        (x * 2).sum()  # a two-thread op: this thread's team exists from now on
        counts.append(_settled(name, torch.get_num_threads()))
        assert openmp.release_team()
        counts.append(_settled(name, 1))
        y = x * 2  # works, on a new team
        counts.append(_settled(name, torch.get_num_threads()))
        return counts, bool((y == 2).all())

    counts, ok = _in_named_thread(name, body)
    n = torch.get_num_threads()
    assert counts == [1, n, 1, n] and ok


def test_single_thread_keeps_a_thread_from_making_a_team_and_leaves_others_alone():
    name = b"df-omp-single"
    x = torch.ones(1 << 20)

    def body():
        assert openmp.single_thread()
        y = x * 2
        return _settled(name, 1, timeout=0.2), torch.get_num_threads(), bool((y == 2).all())

    before = torch.get_num_threads()
    assert _in_named_thread(name, body) == (1, 1, True)
    assert torch.get_num_threads() == before
    assert _in_named_thread(b"df-omp-other", torch.get_num_threads) == before


def test_single_thread_holds_after_torch_set_num_threads():
    # ATen sets a new thread's OpenMP thread count at its first parallel op to what `torch.set_num_threads` chose
    # (another test, or a user, may have called it): `single_thread` must not be undone by that.
    name = b"df-omp-afterset"
    before = torch.get_num_threads()
    x = torch.ones(1 << 20)

    def body():
        assert openmp.single_thread()
        (x * 2).sum()
        return _settled(name, 1, timeout=0.2), torch.get_num_threads()

    torch.set_num_threads(before)
    try:
        assert _in_named_thread(name, body) == (1, 1)
    finally:
        torch.set_num_threads(before)
