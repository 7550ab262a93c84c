"""`QuantLinear`: a linear layer over group-wise quantized weights, called exactly like `nn.Linear`.

It holds what a quantized base stores for one projection (`store.quantized.QuantizedMatrix`): the densely packed
b-bit codes (R*C*b/8 bytes), fp16 scales and uint8 zero points per group of G input columns, and the optional
bias. `forward(x)` computes y = x W_hat^T + bias with W_hat = (q - zero) * scale, so the model's projection hook
still sees the projection's input x and output y and adapters work on top unchanged.

How W_hat is produced is a *kernel*, chosen once when the model is loaded (registry `KERNELS`):
- `reference`: `functional.unpack_codes` (a bit-by-bit stream decode) then `functional.dequantize`, every call;
- `fast`: every call, a vectorised unpack straight to fp32 codes (for b in 2, 4, 8: a 256-entry table from a
  byte to its 8/b codes, gathered with `F.embedding`; otherwise 8 codes = b bytes read as one little-endian word,
  shifted and masked), then W_hat = q * scale - zero * scale in one broadcast `addcmul` per group (no per-column
  expansion of scales); memory stays at the packed size;
- `native` (the default): the C kernel `deltafleet.native.dequant_groups_` unpacks and dequantizes in one pass
  over the packed codes (OpenMP over rows) into a per-thread scratch matrix reused by every layer of that shape
  when no gradient is recorded (a fresh matrix under autograd, which keeps W_hat for the backward pass); falls
  back to `fast` where the kernel is unavailable or the shape is outside its contract;
- `cached`: W_hat materialised once per compute dtype and reused; fastest, but holds a dense copy of the weight
  (the memory of an unquantized base), so it is for throughput comparisons, not for saving memory.
All four produce bit-identical W_hat, computed in fp32 and then cast to the input's dtype: q * scale and
zero * scale are exact in fp32 (8-bit integers times fp16 scales), so q * scale - zero * scale rounds the same real
number once, as (q - zero) * scale does.

Measured (one thread on a loaded, shared 2-core CPU; a 1536 x 576 matrix, x of 8 tokens): fast 15-28 ms per call
at 2-4 bits (reference 53-128 ms), cached 1.8-2.9 ms, nn.Linear fp32 1.8-3.0 ms. At decode sizes the matmul is
tiny, so dequantizing on every call costs about ten dense matmuls: `fast` saves memory, `cached` is the speed
of the dense base.

The fp16 scales are held as their int16 bit pattern: `Module.to(dtype)` casts floating-point buffers, and a cast
to bf16 would lose scale bits; an integer buffer is left exact.

Shapes: x (..., C) -> y (..., R); codes (R, C); scale, zero (R, ngroups).
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltafleet.native import dequant_groups_
from deltafleet.registry import Registry
from deltafleet.store.quantized import QuantizedMatrix, dequantize, fast_unpack, packed_nbytes, unpack_codes


@functools.cache
def _byte_table(bits: int) -> Tensor:
    """(256, 8 // bits) fp32: the codes held by each byte value, lowest bits first."""
    shifts = bits * torch.arange(8 // bits)
    return ((torch.arange(256)[:, None] >> shifts) & ((1 << bits) - 1)).float()


def fast_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """The codes of `packed` as fp32 (numel,), by table lookup where a byte holds whole codes."""
    if 8 % bits == 0:
        return F.embedding(packed.long(), _byte_table(bits)).reshape(-1)[:numel]
    return fast_unpack(packed, bits, numel).float()


def _reference_weight(layer: QuantLinear, dtype: torch.dtype) -> Tensor:
    R, C = layer.shape
    codes = unpack_codes(layer.qcodes, layer.bits, R * C).reshape(R, C)
    return dequantize(codes, layer.scale, layer.qzero, layer.group_size).to(dtype)


def _fast_weight(layer: QuantLinear, dtype: torch.dtype) -> Tensor:
    R, C = layer.shape
    gs = layer.group_size
    codes = fast_codes(layer.qcodes, layer.bits, R * C)
    if C % gs:  # a short last group: per-column expansion
        return dequantize(codes.reshape(R, C), layer.scale, layer.qzero, gs).to(dtype)
    s = layer.scale.float()[..., None]  # (R, G, 1)
    zs = layer.qzero.float()[..., None] * s
    return torch.addcmul(-zs, codes.reshape(R, C // gs, gs), s).reshape(R, C).to(dtype)


def _cached_weight(layer: QuantLinear, dtype: torch.dtype) -> Tensor:
    cached = layer._cache
    if cached is None or cached.dtype != dtype:
        cached = layer._cache = _fast_weight(layer, dtype)
    return cached


_scratch = threading.local()


def scratch_matrix(R: int, C: int, dtype: torch.dtype = torch.float32) -> Tensor:
    """A per-thread (R, C) buffer of `dtype`, reused by every call of that shape and dtype on this thread (the
    native kernels of `QuantLinear` and `SignLinear` write their dense weight into it)."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get((R, C, dtype))
    if buf is None:
        buf = bufs[(R, C, dtype)] = torch.empty(R, C, dtype=dtype)
    return buf


def _native_weight(layer: QuantLinear, dtype: torch.dtype) -> Tensor:

    R, C = layer.shape
    out = scratch_matrix(R, C) if not torch.is_grad_enabled() else torch.empty(R, C)
    if dequant_groups_(layer.qcodes, layer.scale.float(), layer.qzero.float(), layer.bits, layer.group_size, out):
        return out.to(dtype)
    return _fast_weight(layer, dtype)


KERNELS: Registry[Callable[[QuantLinear, torch.dtype], Tensor]] = Registry("quantized-linear kernel")


def register_kernel(name: str, weight_fn: Callable[[QuantLinear, torch.dtype], Tensor]) -> None:
    KERNELS.register(name, weight_fn)


register_kernel("reference", _reference_weight)
register_kernel("fast", _fast_weight)
register_kernel("cached", _cached_weight)
register_kernel("native", _native_weight)
DEFAULT_KERNEL = "native"


class QuantLinear(nn.Module):
    """y = x W_hat^T + b over a stored `QuantizedMatrix`; the kernel decides how W_hat is produced."""

    def __init__(self, qm: QuantizedMatrix, bias: Tensor | None = None, kernel: str = DEFAULT_KERNEL):
        super().__init__()
        R, C = qm.shape
        if qm.packed.numel() != packed_nbytes(R * C, qm.bits):
            raise ValueError(f"packed codes hold {qm.packed.numel()} bytes, {R}x{C} {qm.bits}-bit codes need "
                             f"{packed_nbytes(R * C, qm.bits)}")
        self.shape, self.bits, self.group_size = (R, C), qm.bits, qm.group_size
        self.in_features, self.out_features = C, R
        self.register_buffer("qcodes", qm.packed)
        self.register_buffer("qscale_bits", qm.scale.to(torch.float16).contiguous().view(torch.int16))
        self.register_buffer("qzero", qm.zero)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._cache: Tensor | None = None
        self.set_kernel(kernel)

    def set_kernel(self, name: str) -> None:
        if name not in KERNELS:
            raise ValueError(f"kernel={name!r}: must be one of {sorted(KERNELS)}")
        self.kernel = name
        self._weight_fn = KERNELS[name]
        self._cache = None

    @property
    def scale(self) -> Tensor:
        """fp16 (R, ngroups)."""
        return self.qscale_bits.view(torch.float16)

    def matrix(self) -> QuantizedMatrix:
        return QuantizedMatrix(self.qcodes, self.scale, self.qzero, self.shape, self.bits, self.group_size)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W_hat (R, C) in `dtype` through the reference path."""
        return _reference_weight(self, dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight (codes, scales, zeros), bias excluded."""
        return sum(t.numel() * t.element_size() for t in (self.qcodes, self.qscale_bits, self.qzero))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self._weight_fn(self, x.dtype), self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
                f"group_size={self.group_size}, bias={self.bias is not None}, kernel={self.kernel}")


class QuantEmbedding(nn.Module):
    """An embedding table over a stored `QuantizedMatrix` (vocab, hidden), called like `nn.Embedding`.

    forward(ids (...)) -> (..., hidden) in the compute dtype: only the rows of the distinct ids are unpacked and
    dequantized (each row's codes are a contiguous byte run when hidden * bits is a multiple of 8; otherwise the
    whole table is dequantized, `fast` kernel). `table` is a `QuantLinear` over the same buffers, so a tied LM head
    (`lm_head = emb.table`) shares them instead of holding a second copy. The compute dtype follows `Module.to`
    through the empty floating buffer `dtype_probe`.
    """

    def __init__(self, qm: QuantizedMatrix, dtype: torch.dtype = torch.float32, kernel: str = DEFAULT_KERNEL):
        super().__init__()
        self.table = QuantLinear(qm, None, kernel)
        self.num_embeddings, self.embedding_dim = qm.shape
        self.register_buffer("dtype_probe", torch.zeros(0, dtype=dtype))

    def rows(self, index: Tensor) -> Tensor:
        """W_hat[index] (n, hidden) fp32 for a 1-D long tensor of row indices."""
        t = self.table
        R, C = t.shape
        if (C * t.bits) % 8:
            return _fast_weight(t, torch.float32)[index]
        row_bytes = C * t.bits // 8
        packed = t.qcodes[: R * row_bytes].view(R, row_bytes)[index].reshape(-1)
        codes = fast_codes(packed, t.bits, index.numel() * C).reshape(-1, C)
        return dequantize(codes, t.scale[index], t.qzero[index], t.group_size)

    def forward(self, ids: Tensor) -> Tensor:
        uniq, inverse = torch.unique(ids.reshape(-1), return_inverse=True)
        out = self.rows(uniq).to(self.dtype_probe.dtype)[inverse]
        return out.reshape(*ids.shape, self.embedding_dim)

    def extra_repr(self) -> str:
        t = self.table
        return f"{self.num_embeddings}, {self.embedding_dim}, bits={t.bits}, group_size={t.group_size}"
