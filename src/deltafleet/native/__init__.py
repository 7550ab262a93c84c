"""Small C kernels for the CPU hot paths, compiled on first use with the system C compiler and called via ctypes.

Why C and not a torch extension: a kernel here is one plain function over raw float pointers; compiling it
takes about a second with `cc` and needs neither torch's headers nor ninja. Each kernel has a pure-torch
reference beside it (the engine's reference backend) and every caller falls back to torch when the kernel is
unavailable: no compiler, a compile error, or `DELTAFLEET_NATIVE=0` in the environment.

The shared object is cached in `$DELTAFLEET_CACHE_DIR/native/`, named by a hash of the source, the compiler
flags and this CPU's feature flags (it is built with `-march=native`, so a cache shared with another CPU
must not reuse it).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

SOURCE_DIR = Path(__file__).parent
CFLAGS = ("-O3", "-march=native", "-ffast-math", "-fopenmp", "-fPIC", "-shared", "-std=c11")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def enabled() -> bool:
    return os.environ.get("DELTAFLEET_NATIVE", "1") not in ("0", "false", "no", "off")


def build(name: str) -> Path:
    """Compile `native/<name>.c` into the cache (once per source, flags and CPU) and return the library's path."""
    from deltafleet.models.embedded import cache_dir

    src = SOURCE_DIR / f"{name}.c"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    key = hashlib.sha256(src.read_bytes() + " ".join(CFLAGS).encode() + _cpu_flags().encode()).hexdigest()[:16]
    out = cache_dir() / "native" / f"{name}-{key}.so"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        tmp_so = Path(tmp) / out.name
        proc = subprocess.run([cc, *CFLAGS, str(src), "-o", str(tmp_so)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {src} failed:\n{proc.stderr[-2000:]}")
        os.replace(tmp_so, out)  # atomic: concurrent builders never see a half-written library
    return out


@cache
def _library(name: str) -> ctypes.CDLL | None:
    if not enabled():
        return None
    try:
        return ctypes.CDLL(str(build(name)))
    except (OSError, RuntimeError) as e:
        warnings.warn(f"native kernel {name!r} unavailable, using the torch path: {e}", RuntimeWarning,
                      stacklevel=3)
        return None


def _function(library: str, name: str, argtypes: list, restype=None):
    lib = _library(library)
    if lib is None:
        return None
    fn = getattr(lib, name)
    fn.argtypes, fn.restype = argtypes, restype
    return fn


_WEIGHT_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16w"}
_BGMV_ARGS = [_I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64]
_ROAD_ARGS = [_I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64]


@cache
def lora_bgmv(weight_dtype: torch.dtype = torch.float32):
    """lora_cpu.c's BGMV for adapter weights of `weight_dtype` (float32 or bfloat16; x and y float32), or None
    when native kernels are unavailable or the dtype has no kernel."""
    suffix = _WEIGHT_SUFFIX.get(weight_dtype)
    return None if suffix is None else _function("lora_cpu", f"lora_bgmv_{suffix}", _BGMV_ARGS)


@cache
def road_apply(weight_dtype: torch.dtype = torch.float32):
    """lora_cpu.c's RoAd element-wise kernel for c, s of `weight_dtype` (float32 or bfloat16; y float32)."""
    suffix = _WEIGHT_SUFFIX.get(weight_dtype)
    return None if suffix is None else _function("lora_cpu", f"road_apply_{suffix}", _ROAD_ARGS)


@cache
def dequant_groups():
    """The `dequant_groups_f32` function of dequant_cpu.c, or None when native kernels are unavailable."""
    return _function("dequant_cpu", "dequant_groups_f32", [_I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR],
                     ctypes.c_int)


DEQUANT_BITS = (2, 3, 4, 8)


def dequant_groups_(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                    out: torch.Tensor) -> bool:
    """out (R, C) fp32 <- (q - zero) * scale of the packed codes (`quant.functional` layout), bit-identical to the
    torch paths. packed uint8 (R*C*bits/8,); scale, zero (R, C / group_size) fp32. Returns False (out untouched)
    when the kernel is unavailable or the shapes are outside its contract (C % group_size, group_size % 8, bits)."""
    fn = dequant_groups()
    if fn is None or out.dim() != 2:
        return False
    R, C = out.shape
    if not (bits in DEQUANT_BITS and group_size > 0 and C % group_size == 0 and group_size % 8 == 0
            and out.dtype == scale.dtype == zero.dtype == torch.float32 and packed.dtype == torch.uint8
            and out.is_contiguous() and packed.is_contiguous() and scale.is_contiguous() and zero.is_contiguous()
            and packed.numel() == R * C * bits // 8 and scale.shape == zero.shape == (R, C // group_size)
            and out.device.type == "cpu"):
        return False
    return fn(R, C, bits, group_size, packed.data_ptr(), scale.data_ptr(), zero.data_ptr(), out.data_ptr()) == 0


def lora_bgmv_(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, index: torch.Tensor,
               r: int, null_row: int) -> bool:
    """y[i] += (x[i] @ A[index[i], :r].T) @ B[index[i], :r] in place for every i with index[i] != null_row.

    x (N, in), y (N, out) float32 with contiguous rows; A (S, R, in), B (S, R, out) float32 or bfloat16 (both
    the same) with contiguous last dimension; index (N,) int64 contiguous. Returns False (and does nothing) when
    the kernel is unavailable or the tensors do not fit its contract; the caller then takes its torch path."""
    if not (x.dtype == y.dtype == torch.float32 and A.dtype == B.dtype and index.dtype == torch.int64
            and x.dim() == y.dim() == 2 and A.dim() == B.dim() == 3 and x.shape[0] == y.shape[0] == index.numel()
            and A.shape[2] == x.shape[1] and B.shape[2] == y.shape[1] and 0 <= r <= min(A.shape[1], B.shape[1])
            and x.stride(1) == y.stride(1) == A.stride(2) == B.stride(2) == 1 and index.is_contiguous()
            and x.device.type == y.device.type == "cpu"):
        return False
    fn = lora_bgmv(A.dtype)
    if fn is None:
        return False
    n, in_f = x.shape
    fn(n, in_f, y.shape[1], r, x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0),
       A.data_ptr(), A.stride(0), A.stride(1), B.data_ptr(), B.stride(0), B.stride(1), index.data_ptr(), null_row)
    return True


def road_apply_(y: torch.Tensor, c: torch.Tensor, s: torch.Tensor, index: torch.Tensor, group: int,
                null_row: int) -> bool:
    """y[i] <- y[i] * c[index[i]] + rotate_half_G(y[i]) * s[index[i]] in place (G = group) for every i with
    index[i] != null_row.

    y (N, out) float32 with contiguous rows, out % group == 0; c, s (S, out) float32 or bfloat16 (both the same)
    with contiguous rows; index (N,) int64 contiguous. Returns False (and does nothing) when the kernel is
    unavailable or the tensors do not fit its contract."""
    if not (y.dtype == torch.float32 and c.dtype == s.dtype and index.dtype == torch.int64 and y.dim() == 2
            and c.dim() == s.dim() == 2 and c.shape == s.shape and c.shape[1] == y.shape[1]
            and y.shape[0] == index.numel() and group > 0 and group % 2 == 0 and y.shape[1] % group == 0
            and y.stride(1) == c.stride(1) == s.stride(1) == 1 and index.is_contiguous()
            and y.device.type == "cpu"):
        return False
    fn = road_apply(c.dtype)
    if fn is None:
        return False
    fn(y.shape[0], y.shape[1], group, y.data_ptr(), y.stride(0), c.data_ptr(), c.stride(0), s.data_ptr(),
       s.stride(0), index.data_ptr(), null_row)
    return True
