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
import shutil
import subprocess
import tempfile
import warnings
from functools import cache
from pathlib import Path

import torch

from deltafleet.dtypes import cpu_flags
from deltafleet.store.cache import cache_dir

SOURCE_DIR = Path(__file__).parent
# The float reassociation the kernels' vector loops need, without -ffast-math itself: with -ffast-math (or -Ofast,
# -funsafe-math-optimizations) gcc links crtfastmath.o into the library, whose constructor turns on flush-to-zero
# for the whole process when the library loads (subnormal floats then read as 0 everywhere: sampling, hypothesis).
CFLAGS = ("-O3", "-march=native", "-fno-math-errno", "-fno-trapping-math", "-fno-signed-zeros", "-fassociative-math",
          "-freciprocal-math", "-ffp-contract=fast", "-fopenmp", "-fPIC", "-shared", "-std=c11")
_I64, _PTR = ctypes.c_int64, ctypes.c_void_p


def enabled() -> bool:
    return os.environ.get("DELTAFLEET_NATIVE", "1") not in ("0", "false", "no", "off")


def build(name: str) -> Path:
    """Compile `native/<name>.c` into the cache (once per source, flags and CPU) and return the library's path."""

    src = SOURCE_DIR / f"{name}.c"
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (cc, gcc or $CC)")
    headers = b"".join(h.read_bytes() for h in sorted(SOURCE_DIR.glob("*.h")))  # included by the sources
    identity = src.read_bytes() + headers + " ".join(CFLAGS).encode() + " ".join(sorted(cpu_flags())).encode()
    key = hashlib.sha256(identity).hexdigest()[:16]
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


# (activation dtype, weight dtype) -> the kernel's name suffix
_SUFFIX = {(torch.float32, torch.float32): "f32", (torch.float32, torch.bfloat16): "bf16w",
           (torch.bfloat16, torch.float32): "bf16x_f32w", (torch.bfloat16, torch.bfloat16): "bf16x_bf16w"}
ACTIVATION_DTYPES = (torch.float32, torch.bfloat16)
_BGMV_ARGS = [_I64, _I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _I64]
_ROAD_ARGS = [_I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64]


@cache
def lora_bgmv(weight_dtype: torch.dtype = torch.float32, act_dtype: torch.dtype = torch.float32):
    """lora_cpu.c's BGMV for adapter weights of `weight_dtype` and activations x, y of `act_dtype` (each float32
    or bfloat16), or None when native kernels are unavailable or the pair has no kernel."""
    suffix = _SUFFIX.get((act_dtype, weight_dtype))
    return None if suffix is None else _function("lora_cpu", f"lora_bgmv_{suffix}", _BGMV_ARGS)


@cache
def road_apply(weight_dtype: torch.dtype = torch.float32, act_dtype: torch.dtype = torch.float32):
    """lora_cpu.c's RoAd element-wise kernel for c, s of `weight_dtype` and y of `act_dtype` (each float32 or
    bfloat16), or None when native kernels are unavailable or the pair has no kernel."""
    suffix = _SUFFIX.get((act_dtype, weight_dtype))
    return None if suffix is None else _function("lora_cpu", f"road_apply_{suffix}", _ROAD_ARGS)


_PACKED_ARGS = [_PTR]  # the array's address (an int: the cheapest argument ctypes converts)


@cache
def _packed(unpacked_name: str, library: str):
    """The one-pointer entry (`<name>_packed(const int64_t *args)`) of a kernel: its arguments in order in an int64
    array, pointers as integers. A bound caller keeps the array and rewrites only the per-call slots."""
    return _function(library, f"{unpacked_name}_packed", _PACKED_ARGS)


def _args(values) -> tuple[ctypes.Array, int]:
    """(an int64 array holding `values`, its address)."""
    a = (_I64 * len(values))(*values)
    return a, ctypes.addressof(a)


@cache
def dequant_groups():
    """The `dequant_groups_f32` function of dequant_cpu.c, or None when native kernels are unavailable."""
    return _function("dequant_cpu", "dequant_groups_f32", [_I64, _I64, _I64, _I64, _PTR, _PTR, _PTR, _PTR],
                     ctypes.c_int)


_GEMV_ARGS = [_I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64]
_GEMV_SUFFIX = {torch.float32: "f32", torch.bfloat16: "bf16"}


@cache
def gemv(dtype: torch.dtype):
    """gemv_cpu.c's dense few-row matmul for x, W, y of `dtype` (float32 or bfloat16), or None."""
    suffix = _GEMV_SUFFIX.get(dtype)
    return None if suffix is None else _function("gemv_cpu", f"gemv_{suffix}", _GEMV_ARGS)


@cache
def gemv_bf16_path() -> str | None:
    """Which bf16 path this CPU's build of gemv_cpu.c took: 'avx512_bf16', 'avx2' or 'portable' (None: no
    kernel)."""
    fn = _function("gemv_cpu", "gemv_bf16_path", [], ctypes.c_int)
    return None if fn is None else {2: "avx512_bf16", 1: "avx2", 0: "portable"}[fn()]


def gemv_(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, out: torch.Tensor) -> bool:
    """out (M, N) <- x (M, K) @ weight (N, K)^T + bias (N,), all of one dtype (float32 or bfloat16), on the CPU,
    each with contiguous rows (row strides free). Products summed in fp32, out rounded once. Returns False (out
    untouched) when the kernel is unavailable or the tensors do not fit its contract."""
    fn = gemv(x.dtype)
    if fn is None or x.dim() != 2 or weight.dim() != 2 or out.dim() != 2:
        return False
    M, K = x.shape
    N = weight.shape[0]
    if not (weight.dtype is x.dtype and out.dtype is x.dtype and weight.shape[1] == K and out.shape == (M, N)
            and x.stride(1) == 1 and weight.stride(1) == 1 and out.stride(1) == 1
            and x.is_cpu and weight.is_cpu and out.is_cpu
            and (bias is None or (bias.dtype is x.dtype and bias.shape == (N,) and bias.stride(0) == 1
                                  and bias.is_cpu))):
        return False
    fn(M, K, N, x.data_ptr(), x.stride(0), weight.data_ptr(), weight.stride(0),
       None if bias is None else bias.data_ptr(), out.data_ptr(), out.stride(0))
    return True


_NORM_ARGS = [_I64, _I64, _PTR, _I64, _PTR, ctypes.c_float, _PTR, _I64]


@cache
def rms_norm(dtype: torch.dtype):
    """norm_cpu.c's RMSNorm for x, w, y of `dtype` (float32 or bfloat16), or None."""
    suffix = _GEMV_SUFFIX.get(dtype)
    return None if suffix is None else _function("norm_cpu", f"rms_norm_{suffix}", _NORM_ARGS)


def rms_norm_(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor) -> bool:
    """out (n, d) <- RMSNorm of x (n, d) with weight (d,) and eps, Hugging Face's Llama semantics (norm_cpu.c), all
    of one dtype (float32 or bfloat16) on the CPU with contiguous rows. Returns False (out untouched) when the
    kernel is unavailable or the tensors do not fit its contract."""
    fn = rms_norm(x.dtype)
    if fn is None or x.dim() != 2 or out.dim() != 2 or weight.dim() != 1:
        return False
    n, d = x.shape
    if not (weight.dtype is x.dtype and out.dtype is x.dtype and weight.shape[0] == d and out.shape == (n, d)
            and x.stride(1) == 1 and out.stride(1) == 1 and weight.stride(0) == 1
            and x.is_cpu and weight.is_cpu and out.is_cpu):
        return False
    fn(n, d, x.data_ptr(), x.stride(0), weight.data_ptr(), eps, out.data_ptr(), out.stride(0))
    return True


_GAIN_ARGS = [_I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I64]


@cache
def norm_gain(dtype: torch.dtype):
    """norm_cpu.c's per-token gain delta for u, y, delta of `dtype` (float32 or bfloat16), or None."""
    suffix = _GEMV_SUFFIX.get(dtype)
    return None if suffix is None else _function("norm_cpu", f"norm_gain_{suffix}", _GAIN_ARGS)


def norm_gain_(u: torch.Tensor, y: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, null_row: int) -> bool:
    """y[i] += u[i] * delta[index[i]] in place for every i with index[i] != null_row (norm_cpu.c). u, y (n, d) and
    delta (S, d) of one dtype (float32 or bfloat16) with contiguous rows, index (n,) int64 contiguous (an id outside
    [0, S) is read as the null row), all on the CPU. Returns False (y untouched) when the kernel is unavailable or
    the tensors do not fit."""
    fn = norm_gain(y.dtype)
    if fn is None or u.dim() != 2 or y.dim() != 2 or delta.dim() != 2 or index.dim() != 1:
        return False
    n, d = y.shape
    if not (u.dtype is y.dtype and delta.dtype is y.dtype and index.dtype is _I64T and u.shape == (n, d)
            and delta.shape[1] == d and index.shape[0] == n and u.stride(1) == y.stride(1) == delta.stride(1) == 1
            and index.is_contiguous() and u.is_cpu and y.is_cpu and delta.is_cpu and index.is_cpu):
        return False
    fn(n, d, u.data_ptr(), u.stride(0), y.data_ptr(), y.stride(0), delta.data_ptr(), delta.stride(0),
       delta.shape[0], index.data_ptr(), null_row)
    return True


_NORM_GAIN_ARGS = [_I64, _I64, _PTR, _I64, _PTR, ctypes.c_float, _PTR, _I64, _PTR, _I64, _I64, _PTR, _I64]


@cache
def rms_norm_gain():
    """norm_cpu.c's RMSNorm with a per-token gain delta in one pass (bfloat16), or None."""
    return _function("norm_cpu", "rms_norm_gain_bf16", _NORM_GAIN_ARGS)


def rms_norm_gain_(x: torch.Tensor, weight: torch.Tensor, eps: float, out: torch.Tensor, delta: torch.Tensor,
                   index: torch.Tensor, null_row: int) -> bool:
    """out (n, d) <- `rms_norm_`(x, weight, eps), then out[i] += unit[i] * delta[index[i]] for every i with index[i]
    != null_row (unit = x's normalised rows rounded to bf16, `norm_gain_`'s u): bit-identical to the three calls, in
    one pass. x, weight, out, delta bfloat16 with contiguous rows, index (n,) int64 contiguous (an id outside [0, S)
    is read as the null row), all on the CPU. Returns False (out untouched) when the kernel is unavailable or the
    tensors do not fit."""
    fn = rms_norm_gain()
    if fn is None or x.dim() != 2 or out.dim() != 2 or weight.dim() != 1 or delta.dim() != 2 or index.dim() != 1:
        return False
    n, d = x.shape
    bf16 = torch.bfloat16
    if not (x.dtype is bf16 and weight.dtype is bf16 and out.dtype is bf16 and delta.dtype is bf16
            and index.dtype is _I64T and weight.shape[0] == d and out.shape == (n, d) and delta.shape[1] == d
            and index.shape[0] == n and x.stride(1) == out.stride(1) == delta.stride(1) == weight.stride(0) == 1
            and index.is_contiguous() and x.is_cpu and weight.is_cpu and out.is_cpu and delta.is_cpu
            and index.is_cpu):
        return False
    fn(n, d, x.data_ptr(), x.stride(0), weight.data_ptr(), eps, out.data_ptr(), out.stride(0), delta.data_ptr(),
       delta.stride(0), delta.shape[0], index.data_ptr(), null_row)
    return True


DEQUANT_BITS = (2, 3, 4, 8)


def dequant_groups_(packed: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int, group_size: int,
                    out: torch.Tensor) -> bool:
    """out (R, C) fp32 <- (q - zero) * scale of the packed codes (`store.quantized` layout), bit-identical to the
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


class BoundBgmv:
    """lora_cpu.c's BGMV bound to one pool's A (S, R, in) and B (S, R, out): the pool side of the contract is
    checked once here, so a call (one projection of one decode step) checks only the batch side. Pools are
    allocated once and written in place, so a binding stays valid as long as its pool lives. A binding keeps its
    kernel's argument array and rewrites it on each call (`_packed`): call it from one thread at a time (the
    engine's loop; `BoundRoad` and `BoundQBgmv` alike)."""

    __slots__ = ("fns", "A", "B", "in_f", "out_f", "R", "args", "argp")
    # where a call's n, x, y, index, null row and rank go in the kernel's argument array (lora_cpu.c's order)
    N, X, Y, INDEX, NULL, RANK = 0, 4, 6, 14, 15, 3

    def __init__(self, fns: dict, A: torch.Tensor, B: torch.Tensor):
        self.fns, self.A, self.B = fns, A, B  # activation dtype -> kernel (its one-pointer entry)
        self.in_f, self.out_f, self.R = A.shape[2], B.shape[2], min(A.shape[1], B.shape[1])
        # the kernel's arguments; a call rewrites the slots named above
        self.args, self.argp = _args((0, self.in_f, self.out_f, 0, 0, self.in_f, 0, self.out_f, A.data_ptr(),
                                      A.stride(0), A.stride(1), B.data_ptr(), B.stride(0), B.stride(1), 0, 0))

    @classmethod
    def bind(cls, A: torch.Tensor, B: torch.Tensor) -> BoundBgmv | None:
        """None when the kernel is unavailable or A, B do not fit its contract (same dtype, float32 or bfloat16,
        3-d, contiguous last dimension, on the CPU)."""
        if not (A.dtype == B.dtype and A.dim() == B.dim() == 3 and A.shape[0] == B.shape[0]
                and A.stride(2) == B.stride(2) == 1 and A.device.type == B.device.type == "cpu"):
            return None
        fns = _kernels(lora_bgmv, A.dtype, packed=True)
        return cls(fns, A, B) if fns else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, r: int, null_row: int) -> bool:
        """y[i] += (x[i] @ A[index[i], :r].T) @ B[index[i], :r] in place for every i with index[i] in [0, null_row)
        (the null row is the pool's last; any other id is read as it).
        x (..., in), y (..., out) both float32 or both bfloat16, contiguous, on the CPU, with N = prod(...) rows;
        index (N,) int64 contiguous; r <= R. Returns False (and does nothing) when the batch does not fit the
        contract."""
        n = index.shape[0]
        fn = self.fns.get(x.dtype)
        if not (fn is not None and y.dtype is x.dtype and index.dtype is _I64T and x.shape[-1] == self.in_f
                and y.shape[-1] == self.out_f and x.numel() == n * self.in_f and y.numel() == n * self.out_f
                and 0 <= r <= self.R and x.is_contiguous() and y.is_contiguous() and index.is_contiguous()
                and x.is_cpu and y.is_cpu and index.is_cpu):
            return False
        a = self.args
        a[self.N], a[self.RANK], a[self.X], a[self.Y], a[self.INDEX], a[self.NULL] = (
            n, r, x.data_ptr(), y.data_ptr(), index.data_ptr(), null_row)
        fn(self.argp)
        return True

    def link(self, dtype: torch.dtype, in_f: int, out_f: int, record: PoolRecord) -> tuple[int, ...] | None:
        """This kernel as a `Chain` link for activations of `dtype`, (n, in_f) -> (n, out_f), reading its pool's
        step (index, null row, rank) from `record`; None when they do not fit the contract."""
        fn = self.fns.get(dtype)
        if not (fn is not None and in_f == self.in_f and out_f == self.out_f and record.max_width <= self.R):
            return None
        return (_address(fn), self.argp, self.N, self.X, self.Y, self.INDEX, self.NULL, self.RANK, -1, 0,
                record.address)


class BoundRoad:
    """lora_cpu.c's RoAd kernel bound to one pool's c, s (S, out) and group size G, checked once (see
    BoundBgmv)."""

    __slots__ = ("fns", "c", "s", "out_f", "group", "args", "argp")
    N, Y, INDEX, NULL = 0, 3, 9, 10  # where a call's arguments go (lora_cpu.c's order); it takes no x

    def __init__(self, fns: dict, c: torch.Tensor, s: torch.Tensor, group: int):
        self.fns, self.c, self.s, self.out_f, self.group = fns, c, s, c.shape[1], group
        # the kernel's arguments; a call rewrites the slots named above
        self.args, self.argp = _args((0, self.out_f, group, 0, self.out_f, c.data_ptr(), c.stride(0), s.data_ptr(),
                                      s.stride(0), 0, 0))

    @classmethod
    def bind(cls, c: torch.Tensor, s: torch.Tensor, group: int) -> BoundRoad | None:
        """None when the kernel is unavailable or c, s, G do not fit its contract (same dtype and shape, float32
        or bfloat16, 2-d with contiguous rows, on the CPU; G even and dividing out)."""
        if not (c.dtype == s.dtype and c.dim() == s.dim() == 2 and c.shape == s.shape and group > 0
                and group % 2 == 0 and c.shape[1] % group == 0 and c.stride(1) == s.stride(1) == 1
                and c.device.type == s.device.type == "cpu"):
            return None
        fns = _kernels(road_apply, c.dtype, packed=True)
        return cls(fns, c, s, group) if fns else None

    def __call__(self, y: torch.Tensor, index: torch.Tensor, null_row: int) -> bool:
        """y[i] <- y[i] * c[index[i]] + rotate_half_G(y[i]) * s[index[i]] in place for every i with
        index[i] != null_row. y (..., out) float32 or bfloat16, contiguous, on the CPU, with N = prod(...) rows;
        index (N,) int64 contiguous. Returns False (and does nothing) when the batch does not fit the contract."""
        n = index.shape[0]
        fn = self.fns.get(y.dtype)
        if not (fn is not None and index.dtype is _I64T and y.shape[-1] == self.out_f
                and y.numel() == n * self.out_f and y.is_contiguous() and index.is_contiguous()
                and y.is_cpu and index.is_cpu):
            return False
        a = self.args
        a[self.N], a[self.Y], a[self.INDEX], a[self.NULL] = n, y.data_ptr(), index.data_ptr(), null_row
        fn(self.argp)
        return True

    def link(self, dtype: torch.dtype, in_f: int, out_f: int, record: PoolRecord) -> tuple[int, ...] | None:
        """This kernel as a `Chain` link (it reads no x: `in_f` is not checked); None when it does not fit."""
        fn = self.fns.get(dtype)
        if not (fn is not None and out_f == self.out_f):
            return None
        return (_address(fn), self.argp, self.N, -1, self.Y, self.INDEX, self.NULL, -1, -1, 0, record.address)


_I64T = torch.int64


def _address(fn) -> int:
    """A ctypes function's address, for a `Chain` link."""
    return ctypes.cast(fn, ctypes.c_void_p).value


class PoolRecord:
    """One pool's share of the current batch as the `Chain` links of its kernels read it: the index tensor's address,
    the null row, the rank and the token count (int64[4]), written once per forward (`set`) for all of the pool's
    projections. `max_width`: the widest rank `set` may write (a link checks it against its pool's rows once)."""

    __slots__ = ("values", "address", "index", "max_width")

    def __init__(self, max_width: int):
        self.values, self.address = _args((0, 0, 0, -1))
        self.index, self.max_width = None, max_width

    def set(self, index: torch.Tensor, null_row: int, width: int) -> bool:
        """Point the record at a batch: index (n,) int64 contiguous on the CPU, 0 <= width <= max_width. False (and
        the record then matches no batch: every chain over it declines) when they do not fit."""
        v = self.values
        if not (index.dtype is _I64T and index.dim() == 1 and index.is_contiguous() and index.is_cpu
                and 0 <= width <= self.max_width):
            self.index, v[3] = None, -1
            return False
        self.index = index  # kept alive while the record points at it
        v[0], v[1], v[2], v[3] = index.data_ptr(), null_row, width, index.shape[0]
        return True


class Chain:
    """Bound kernels (`BoundBgmv`, `BoundRoad`, `BoundQBgmv` `.link`s) applied to one projection in a single C call
    (lora_cpu.c's `chain_packed`). Each link reads its pool's step from a `PoolRecord`, so a chain built once serves
    every step, and a call passes only x and y. A decode step adapts 210 projections, each over up to three pools;
    the Python of a bound call (checks, the ctypes crossing) costs a few microseconds, paid here once per projection
    instead of once per pool. Semantics: the links' kernels in order, on the same x and y. Like the bound kernels, a
    chain rewrites their argument arrays: call it from one thread at a time."""

    __slots__ = ("fn", "args", "argp", "in_f", "out_f", "dtype", "keep")

    def __init__(self, fn, links: list[tuple[int, ...]], in_f: int, out_f: int, dtype: torch.dtype, keep):
        self.fn, self.in_f, self.out_f, self.dtype, self.keep = fn, in_f, out_f, dtype, keep
        # count, n, x, y (a call rewrites n (1), x (2) and y (3)), then the links
        self.args, self.argp = _args((len(links), 0, 0, 0, *(v for link in links for v in link)))

    @classmethod
    def build(cls, links: list[tuple[int, ...] | None], in_f: int, out_f: int, dtype: torch.dtype,
              keep=()) -> Chain | None:
        """None when the chain entry is unavailable or a link is None (some kernel did not fit). `keep`: what the
        links point into (bound kernels, records), held as long as the chain."""
        fn = _chain_entry()
        if fn is None or not links or any(link is None or len(link) != CHAIN_LINK for link in links):
            return None
        return cls(fn, links, in_f, out_f, dtype, tuple(keep))

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> bool:
        """Every link's kernel on x (..., in), y (..., out) in place (both of the chain's dtype, contiguous, on the
        CPU, with as many rows as each link's record holds tokens). Returns False (and does nothing) when they do not
        fit."""
        n = y.numel() // self.out_f
        if not (x.dtype is self.dtype and y.dtype is self.dtype and x.numel() == n * self.in_f
                and x.shape[-1] == self.in_f and y.shape[-1] == self.out_f and x.is_contiguous()
                and y.is_contiguous() and x.is_cpu and y.is_cpu):
            return False
        a = self.args
        a[1], a[2], a[3] = n, x.data_ptr(), y.data_ptr()
        return self.fn(self.argp) == 0


@cache
def _chain_entry():
    return _function("lora_cpu", "chain_packed", _PACKED_ARGS, ctypes.c_int)


CHAIN_LINK = 11  # int64s a link (lora_cpu.c)


def _kernels(lookup, weight_dtype: torch.dtype, packed: bool = False) -> dict:
    """activation dtype -> `lookup(weight_dtype, activation dtype)` (with `packed`, that kernel's one-pointer
    entry), for the pairs that have a kernel."""
    fns = {act: lookup(weight_dtype, act) for act in ACTIVATION_DTYPES}
    if packed:
        fns = {act: fn and _packed(fn.__name__, "lora_cpu") for act, fn in fns.items()}
    return {act: fn for act, fn in fns.items() if fn is not None}


def lora_bgmv_(x: torch.Tensor, y: torch.Tensor, A: torch.Tensor, B: torch.Tensor, index: torch.Tensor,
               r: int, null_row: int) -> bool:
    """y[i] += (x[i] @ A[index[i], :r].T) @ B[index[i], :r] in place for every i with index[i] in [0, null_row)
    (the null row is the pool's last; any other id is read as it).

    x (N, in), y (N, out) both float32 or both bfloat16, with contiguous rows; A (S, R, in), B (S, R, out) float32
    or bfloat16 (both the same) with contiguous last dimension; index (N,) int64 contiguous. Returns False (and does
    nothing) when the kernel is unavailable or the tensors do not fit its contract; the caller then takes its torch
    path.
    A one-off call; a hot loop binds the pool once (`BoundBgmv.bind`)."""
    bound = BoundBgmv.bind(A, B)
    return bound is not None and bound(x, y, index, r, null_row)


def road_apply_(y: torch.Tensor, c: torch.Tensor, s: torch.Tensor, index: torch.Tensor, group: int,
                null_row: int) -> bool:
    """y[i] <- y[i] * c[index[i]] + rotate_half_G(y[i]) * s[index[i]] in place (G = group) for every i with
    index[i] != null_row.

    y (N, out) float32 or bfloat16 with contiguous rows, out % group == 0; c, s (S, out) float32 or bfloat16 (both
    the same) with contiguous rows; index (N,) int64 contiguous. Returns False (and does nothing) when the kernel is
    unavailable or the tensors do not fit its contract. A one-off call; a hot loop binds (`BoundRoad.bind`)."""
    bound = BoundRoad.bind(c, s, group)
    return bound is not None and bound(y, index, null_row)


# sparse_cpu.c: (n, in_f, out_f, x, sx, y, sy, values, sv, cols, row_ptr, idx, null_row)
_SPARSE_ARGS = [_I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _PTR, _I64]
_I32T = torch.int32


@cache
def sparse_add(weight_dtype: torch.dtype = torch.float32, act_dtype: torch.dtype = torch.float32):
    """sparse_cpu.c's sparse-additive kernel for values of `weight_dtype` and activations x, y of `act_dtype` (each
    float32 or bfloat16), or None when native kernels are unavailable or the pair has no kernel."""
    suffix = _SUFFIX.get((act_dtype, weight_dtype))
    return None if suffix is None else _function("sparse_cpu", f"sparse_add_{suffix}", _SPARSE_ARGS)


class BoundSparse:
    """sparse_cpu.c's kernel bound to one pool's values (S, nnz) and the sparsity pattern every slot shares, CSR
    cols (nnz,) and row_ptr (out + 1,): the pattern is validated once here (O(nnz); the kernel reads x[cols[j]]
    unchecked), so a call checks only the batch side. The binding stays valid while the pool lives and the pattern
    is not rewritten (slots' values may be, in place)."""

    __slots__ = ("fns", "values", "cols", "row_ptr", "out_f", "min_in", "static")

    def __init__(self, fns: dict, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor, min_in: int):
        self.fns, self.values, self.cols, self.row_ptr = fns, values, cols, row_ptr  # activation dtype -> kernel
        self.out_f, self.min_in = row_ptr.shape[0] - 1, min_in
        self.static = (values.data_ptr(), values.stride(0), cols.data_ptr(), row_ptr.data_ptr())

    @classmethod
    def bind(cls, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor) -> BoundSparse | None:
        """None when the kernel is unavailable or values, cols, row_ptr do not fit its contract: values float32 or
        bfloat16, 2-d with contiguous rows; cols, row_ptr 1-d int32 contiguous; row_ptr non-decreasing from 0 to
        at most nnz = values.shape[1]; cols non-negative; all on the CPU."""
        if not (values.dim() == 2 and values.stride(1) == 1 and cols.dim() == row_ptr.dim() == 1
                and cols.dtype is _I32T and row_ptr.dtype is _I32T and row_ptr.shape[0] >= 1
                and cols.is_contiguous() and row_ptr.is_contiguous()
                and values.device.type == cols.device.type == row_ptr.device.type == "cpu"):
            return None
        nnz = int(row_ptr[-1])
        if not (int(row_ptr[0]) == 0 and nnz <= min(values.shape[1], cols.shape[0])
                and bool((row_ptr[1:] >= row_ptr[:-1]).all())
                and (nnz == 0 or int(cols[:nnz].min()) >= 0)):
            return None
        fns = _kernels(sparse_add, values.dtype)
        min_in = int(cols[:nnz].max()) + 1 if nnz else 0
        return cls(fns, values, cols, row_ptr, min_in) if fns else None

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, null_row: int) -> bool:
        """y[i, r] += sum_{j in row r} values[index[i], j] * x[i, cols[j]] in place for every i with
        index[i] != null_row. x (..., in), y (..., out) both float32 or both bfloat16, contiguous, on the CPU, with
        N = prod(...) rows and in above every column of the pattern; index (N,) int64 contiguous, in [0, S).
        Returns False (and does nothing) when the batch does not fit the contract."""
        n, in_f = index.shape[0], x.shape[-1]
        fn = self.fns.get(x.dtype)
        if not (fn is not None and y.dtype is x.dtype and index.dtype is _I64T and in_f >= self.min_in
                and y.shape[-1] == self.out_f and x.numel() == n * in_f and y.numel() == n * self.out_f
                and x.is_contiguous() and y.is_contiguous() and index.is_contiguous()
                and x.is_cpu and y.is_cpu and index.is_cpu):
            return False
        fn(n, in_f, self.out_f, x.data_ptr(), in_f, y.data_ptr(), self.out_f, *self.static, index.data_ptr(),
           null_row)
        return True


def sparse_add_(x: torch.Tensor, y: torch.Tensor, values: torch.Tensor, cols: torch.Tensor, row_ptr: torch.Tensor,
                index: torch.Tensor, null_row: int) -> bool:
    """y[i, r] += sum_{j = row_ptr[r]}^{row_ptr[r+1]-1} values[index[i], j] * x[i, cols[j]] in place for every i
    with index[i] != null_row (PaFi's sparse-additive deltas: one CSR pattern shared by every slot).

    x (N, in), y (N, out) both float32 or both bfloat16, contiguous; values (S, nnz) float32 or bfloat16 with
    contiguous rows; cols (nnz,), row_ptr (out + 1,) int32 contiguous; index (N,) int64 contiguous. Returns False
    (and does nothing) when the kernel is unavailable or the tensors do not fit its contract; the caller then
    takes its torch path. A one-off call (it validates the pattern, O(nnz)); a hot loop binds the pool once
    (`BoundSparse.bind`)."""
    bound = BoundSparse.bind(values, cols, row_ptr)
    return bound is not None and bound(x, y, index, null_row)


# sign_cpu.c: (N, C, R, xg, sx, packed, Cb, h, y, sy)
_SIGN_ARGS = [_I64, _I64, _I64, _PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64]


@cache
def sign_matmul():
    """sign_cpu.c's packed sign matmul (fp32), or None when native kernels are unavailable."""
    return _function("sign_cpu", "sign_matmul_f32", _SIGN_ARGS, ctypes.c_int)


@cache
def sign_matmul_path() -> str | None:
    """Which path this CPU's build of sign_cpu.c took: 'avx512', 'avx2' or 'portable' (None: no kernel)."""
    fn = _function("sign_cpu", "sign_matmul_path", [], ctypes.c_int)
    return None if fn is None else {2: "avx512", 1: "avx2", 0: "portable"}[fn()]


def sign_matmul_(xg: torch.Tensor, packed: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> bool:
    """out (N, R) <- (xg (N, C) @ S^T) * h (R,), S (R, C) the ±1 matrix of `packed` (uint8 (R, ceil(C / 8)), the
    row-aligned layout of `store.signs`), all fp32 on the CPU with contiguous rows (row strides free). Sums in fp32,
    reassociated. Returns False (out untouched) when the kernel is unavailable or the tensors do not fit its
    contract."""
    fn = sign_matmul()
    if fn is None or xg.dim() != 2 or packed.dim() != 2 or out.dim() != 2 or h.dim() != 1:
        return False
    N, C = xg.shape
    R = packed.shape[0]
    if not (xg.dtype is out.dtype is h.dtype is torch.float32 and packed.dtype is torch.uint8
            and packed.shape[1] == (C + 7) // 8 and h.shape[0] == R and out.shape == (N, R)
            and xg.stride(1) == 1 and out.stride(1) == 1 and packed.is_contiguous() and h.stride(0) == 1
            and xg.is_cpu and packed.is_cpu and h.is_cpu and out.is_cpu):
        return False
    return fn(N, C, R, xg.data_ptr(), xg.stride(0), packed.data_ptr(), packed.shape[1], h.data_ptr(),
              out.data_ptr(), out.stride(0)) == 0


@cache
def sign_unpack():
    """sign_cpu.c's dense writer of the ±1 matrix, or None when native kernels are unavailable."""
    return _function("sign_cpu", "sign_unpack", [_I64, _I64, _PTR, _I64, _I64, _PTR])


def sign_unpack_(packed: torch.Tensor, out: torch.Tensor) -> bool:
    """out (R, C) float32 or bfloat16 <- the ±1 matrix of `packed` (uint8 (R, ceil(C / 8)), `store.signs` layout),
    exactly. Both contiguous, on the CPU. Returns False (out untouched) when the kernel is unavailable or the
    tensors do not fit its contract."""
    fn = sign_unpack()
    if fn is None or packed.dim() != 2 or out.dim() != 2:
        return False
    R, C = out.shape
    if not (packed.dtype is torch.uint8 and out.dtype in (torch.float32, torch.bfloat16)
            and tuple(packed.shape) == (R, (C + 7) // 8) and packed.is_contiguous() and out.is_contiguous()
            and packed.is_cpu and out.is_cpu):
        return False
    fn(R, C, packed.data_ptr(), packed.shape[1], int(out.dtype is torch.bfloat16), out.data_ptr())
    return True


# qlora_cpu.c: quantized BGMV and embedding lookup over a qadditive pool (`adapters.qadditive`)
_QPOOL_ARGS = [_PTR, _PTR, _PTR, _PTR, _I64, _PTR, _PTR, _PTR, _PTR, _PTR, _I64]  # bits .. bbias, idx, null_row
_QLORA_ARGS = {"qlora_bgmv": [_I64] * 5 + [_PTR, _I64, _PTR, _I64, _I64] + _QPOOL_ARGS,  # n in out R G, x sx y sy bf16
               "qlora_embed": [_I64] * 5 + [_PTR, _PTR, _I64, _I64] + _QPOOL_ARGS}  # n H V R G, ids y sy bf16
QLORA_ALIGN = 64  # in, out and the group size must be multiples of this (the widest vector block: 3-bit, 64 codes)
_QPOOL = {"bits": torch.uint8, "aoff": torch.int64, "boff": torch.int64, "data": torch.uint8,
          "ascale": torch.float32, "abias": torch.float32, "bscale": torch.float32, "bbias": torch.float32}


@cache
def qlora(name: str):
    """qlora_cpu.c's `qlora_bgmv` or `qlora_embed`, or None when native kernels are unavailable."""
    return _function("qlora_cpu", name, _QLORA_ARGS[name])


@cache
def qlora_path() -> str | None:
    """Which path this CPU's build of qlora_cpu.c took: 'avx512_bf16' (AVX2 rows, and AVX512-BF16 rows of 2 and 4
    bits for bfloat16 activations), 'avx2' or 'portable' (None: no kernel)."""
    fn = _function("qlora_cpu", "qlora_path", [], ctypes.c_int)
    return None if fn is None else {3: "avx512_bf16", 2: "avx2", 0: "portable"}[fn()]


class BoundQBgmv:
    """qlora_cpu.c bound to one qadditive pool module's tensors (S slots; shapes in `adapters.qadditive`, with a
    slot dimension first and at least `DATA_PAD` bytes of data after a slot's rows): `in_f`, `out_f` the module's
    (for a table: H, V), `group` the pool's group size. The pool side is checked once here."""

    __slots__ = ("bgmv", "embed", "t", "in_f", "out_f", "R", "group", "static", "args", "argp")
    N, X, Y, BF16, INDEX, NULL = 0, 5, 7, 9, 19, 20  # where a call's arguments go (qlora_bgmv's order)

    def __init__(self, t: dict[str, torch.Tensor], in_f: int, out_f: int, group: int):
        self.bgmv, self.embed, self.t = _packed("qlora_bgmv", "qlora_cpu"), qlora("qlora_embed"), t
        self.in_f, self.out_f, self.R, self.group = in_f, out_f, t["bits"].shape[1], group
        self.static = (t["bits"].data_ptr(), t["aoff"].data_ptr(), t["boff"].data_ptr(), t["data"].data_ptr(),
                       t["data"].stride(0), t["ascale"].data_ptr(), t["abias"].data_ptr(), t["bscale"].data_ptr(),
                       t["bbias"].data_ptr())
        # qlora_bgmv's arguments; a call rewrites the slots named above
        self.args, self.argp = _args((0, in_f, out_f, self.R, group, 0, in_f, 0, out_f, 0, *self.static, 0, 0))

    @classmethod
    def bind(cls, t: dict[str, torch.Tensor], in_f: int, out_f: int, group: int) -> BoundQBgmv | None:
        """None when the kernel is unavailable or the tensors do not fit its contract (dtypes, contiguous, on the
        CPU; in, out and group multiples of `QLORA_ALIGN`)."""
        if _packed("qlora_bgmv", "qlora_cpu") is None or any(
                t[n].dtype is not dt or not t[n].is_contiguous() or not t[n].is_cpu for n, dt in _QPOOL.items()):
            return None
        S, R = t["bits"].shape
        gi, go = -(-in_f // max(group, 1)), -(-out_f // max(group, 1))
        if not (group > 0 and in_f % QLORA_ALIGN == 0 and out_f % QLORA_ALIGN == 0 and group % QLORA_ALIGN == 0
                and t["aoff"].shape == t["boff"].shape == (S, R) and t["data"].shape[0] == S
                and t["ascale"].shape == t["abias"].shape == (S, R, gi)
                and t["bscale"].shape == t["bbias"].shape == (S, R, go)):
            return None
        return cls(t, in_f, out_f, group)

    def _fits(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, n: int, in_f: int, out_f: int) -> bool:
        return (y.dtype in ACTIVATION_DTYPES and index.dtype is _I64T and y.shape[-1] == out_f
                and y.numel() == n * out_f and x.numel() == n * in_f and y.is_contiguous() and x.is_contiguous()
                and index.is_contiguous() and x.is_cpu and y.is_cpu and index.is_cpu)

    def __call__(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, null_row: int) -> bool:
        """y[i] += (x[i] @ A_k.T) @ B_k in place, k = index[i] != null_row, A_k, B_k the slot's dequantized rows.
        x (..., in), y (..., out) of one dtype (float32 or bfloat16), contiguous; index (N,) int64. Returns False
        (and does nothing) when the batch does not fit the contract."""
        n = index.shape[0]
        if not (x.dtype is y.dtype and x.shape[-1] == self.in_f and self._fits(x, y, index, n, self.in_f, self.out_f)):
            return False
        a = self.args
        a[self.N], a[self.X], a[self.Y], a[self.BF16], a[self.INDEX], a[self.NULL] = (
            n, x.data_ptr(), y.data_ptr(), int(y.dtype is torch.bfloat16), index.data_ptr(), null_row)
        self.bgmv(self.argp)
        return True

    def link(self, dtype: torch.dtype, in_f: int, out_f: int, record: PoolRecord) -> tuple[int, ...] | None:
        """This kernel as a `Chain` link; None when it does not fit the contract."""
        if not (dtype in ACTIVATION_DTYPES and in_f == self.in_f and out_f == self.out_f):
            return None
        return (_address(self.bgmv), self.argp, self.N, self.X, self.Y, self.INDEX, self.NULL, -1, self.BF16,
                int(dtype is torch.bfloat16), record.address)

    def embedding(self, ids: torch.Tensor, y: torch.Tensor, index: torch.Tensor, null_row: int) -> bool:
        """A table (A (R, H), B (R, V): in_f = H, out_f = V): y[i] += B_k[:, ids[i]] @ A_k in place for every i with
        k = index[i] != null_row. ids (N,) int64 token ids in [0, V); y (..., H) float32 or bfloat16, contiguous.
        Returns False (and does nothing) when the batch does not fit the contract."""
        n = index.shape[0]
        if not (ids.dtype is _I64T and ids.numel() == n and ids.is_contiguous() and ids.is_cpu
                and self._fits(ids, y, index, n, 1, self.in_f)):
            return False
        if n and not (int(ids.min()) >= 0 and int(ids.max()) < self.out_f):
            return False
        self.embed(n, self.in_f, self.out_f, self.R, self.group, ids.data_ptr(), y.data_ptr(), self.in_f,
                   int(y.dtype is torch.bfloat16), *self.static, index.data_ptr(), null_row)
        return True
