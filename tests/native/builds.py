"""Build a native kernel's source with other flags than this machine's (`-march=native`), to test the portable
(plain-loop) path, or an AVX2-only one, on this CPU."""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
from pathlib import Path

import pytest

from deltafleet import native

PORTABLE = ("-march=x86-64", "-mno-avx2", "-mno-fma")  # no AVX-512, AVX2, FMA (nor F16C): the plain loops


def build_with(source: str, tmp_path: Path, arch: tuple[str, ...] = PORTABLE) -> ctypes.CDLL:
    """`native/<source>.c` compiled with the project's flags, `-march=native` replaced by `arch`, and loaded;
    skips the test off x86-64 (the flags are x86-64's)."""
    if platform.machine() != "x86_64":
        pytest.skip("the build flags below are x86-64's")
    cc = shutil.which("cc") or shutil.which("gcc")
    flags = [f for f in native.CFLAGS if f != "-march=native"] + list(arch)
    so = tmp_path / f"{source}-build.so"
    subprocess.run([cc, *flags, str(native.SOURCE_DIR / f"{source}.c"), "-o", str(so)], check=True)
    return ctypes.CDLL(str(so))
