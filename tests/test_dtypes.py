"""`dtypes.native_bf16` (what `--dtype auto` and training's `precision auto` follow): bf16 exactly where the CPU has
bf16 instructions (avx512_bf16 or AMX) and oneDNN computes bf16; AVX-512 alone (oneDNN would emulate) is not
enough; without a flags line, oneDNN's own test decides."""

from __future__ import annotations

import platform

import pytest
import torch

from deltafleet import dtypes


@pytest.mark.parametrize("flags,onednn,want", [
    ({"avx2", "avx512f", "avx512_bf16"}, True, True),  # AMD Zen 4, Intel Cooper Lake
    ({"avx2", "avx512f", "amx_bf16", "amx_tile"}, True, True),  # Intel Sapphire Rapids+
    ({"avx2", "avx512f", "avx512bw"}, True, False),  # AVX-512 without bf16: oneDNN emulates, fp32 is faster
    ({"avx2", "fma"}, False, False),  # AVX2 only
    ({"avx512_bf16"}, False, False),  # oneDNN says no: never bf16
    (set(), True, True),  # no /proc/cpuinfo flags (not Linux): oneDNN's test decides
])
def test_native_bf16_rule(monkeypatch, flags, onednn, want):
    monkeypatch.setattr(dtypes, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: onednn)
    assert dtypes.native_bf16() is want


def test_cpu_flags_here():
    flags = dtypes.cpu_flags()
    assert isinstance(flags, frozenset)
    if flags and platform.machine() == "x86_64":
        assert "sse2" in flags  # every x86-64 CPU has it: the line was parsed into single flags
