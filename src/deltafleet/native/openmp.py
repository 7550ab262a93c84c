"""Per-thread control of the OpenMP runtime torch loaded (libgomp on Linux), for a process whose hot loop runs on
one thread and whose other threads must not slow it down.

Why it matters: libgomp spins between parallel regions (a few hundred microseconds) only while the process's
OpenMP threads, idle teams of other threads included, number at most the cores; beyond that it spins about a
hundred iterations and then sleeps on a futex, and every parallel region of the hot loop then waits for its workers
to be woken. A team is kept by the thread that first ran a multi-threaded op, for as long as that thread lives.
On a 2-core AMD EPYC, once the main thread had run one two-thread op, a 200k-element multiply on another thread
took 88-90 us instead of 15-21, and an engine stepped
on its own thread decoded at 203-250 tokens/s instead of 359-374 (SmolLM2 bf16, batch 32).

- `single_thread()`: this thread runs its torch ops on one OpenMP thread from now on, so it never gets a team
  (other threads keep their own setting, unlike `torch.set_num_threads`, which also changes the default of every
  thread created later). For helper threads (the adapter loader).
- `release_team()`: free this thread's idle team now (OpenMP 5.0 `omp_pause_resource_all(omp_pause_hard)`, which
  libgomp applies to the calling thread's pool). For a thread that hands the hot loop to another (`Engine.spawn`,
  `Engine.start`); a later multi-threaded op on it builds a new team.

With another OpenMP runtime, or none loaded, both do nothing and return False.
"""

from __future__ import annotations

import ctypes
import os
from functools import cache

import torch

OMP_PAUSE_HARD = 2  # omp_pause_resource_t: free the runtime's resources (the thread pool)


@cache
def _gomp() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD)  # only if already loaded (by torch)
    except (OSError, AttributeError):
        return None


def single_thread() -> bool:
    """Run this thread's OpenMP regions on one thread from now on (set before its first parallel op, the thread
    never gets a team). False when libgomp is not loaded."""
    gomp = _gomp()
    if gomp is None:
        return False
    # ATen sets a thread's OpenMP thread count at the thread's first parallel op (to the count `torch.set_num_threads`
    # chose, if anything called it); `get_num_threads` runs that step now, so it cannot undo the setting below.
    torch.get_num_threads()
    gomp.omp_set_num_threads(1)
    return True


def release_team() -> bool:
    """Free the idle OpenMP team this thread keeps from its earlier parallel ops. False when libgomp is not loaded
    or refused (called inside a parallel region)."""
    gomp = _gomp()
    if gomp is None or not hasattr(gomp, "omp_pause_resource_all"):
        return False
    return gomp.omp_pause_resource_all(OMP_PAUSE_HARD) == 0
