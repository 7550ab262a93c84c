"""Counting a test's own threads: the test names a thread (Linux `PR_SET_NAME`, at most 15 bytes), the threads it
creates (OpenMP workers) inherit the name, and `threads_named` counts them, immune to other threads of the process
starting or ending meanwhile. Elsewhere than Linux the count stays 0."""

from __future__ import annotations

import ctypes
import os

TASKS = "/proc/self/task"


def name_this_thread(name: bytes) -> None:
    if len(name) > 15:
        raise ValueError(f"thread name {name!r}: at most 15 bytes (the kernel truncates longer ones)")
    ctypes.CDLL(None).prctl(15, name, 0, 0, 0)  # PR_SET_NAME


def threads_named(name: bytes) -> int:
    if not os.path.isdir(TASKS):
        return 0
    count = 0
    for tid in os.listdir(TASKS):
        try:
            with open(f"{TASKS}/{tid}/comm", "rb") as f:
                count += f.read().strip() == name
        except OSError:  # the thread ended meanwhile
            pass
    return count
