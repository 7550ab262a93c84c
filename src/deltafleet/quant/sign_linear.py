"""`SignLinear`: OneBit's linear layer over a stored `store.signs.SignMatrix`, called exactly like `nn.Linear`.

    y = LayerNorm_noaffine(((x ⊙ g) S^T) ⊙ h) + bias        (the LayerNorm only with `layernorm=True`)

(Xu et al. 2024, arXiv 2402.11295, eq. 5; the optional non-affine LayerNorm is the released code's `BitLinear`).
The model's projection hook still sees the projection's input x and output y, so adapters act on top unchanged.

How S is applied is a kernel, chosen once when the model is loaded (registry `KERNELS`, the same names as
`QuantLinear`'s so one `DELTAFLEET_QUANT_KERNEL` picks both):
- `reference`: W_hat = h S g from the bit-by-bit unpack (`store.signs.unpack_signs`), then `F.linear`, every call;
- `fast`: every call, S unpacked by a 256-entry byte table (`F.embedding`) into the compute dtype (±1 is exact in
  bf16), then ((x ⊙ g) S^T) ⊙ h;
- `native` (the default): up to `NATIVE_ROWS` tokens, `native.sign_matmul_` (sign-select-add over the packed
  bits: AVX-512 masked adds, AVX2 or a portable loop; no dense S is written), fp32 sums; above that, where the
  select-add loop is compute-bound, `native.sign_unpack_` writes S (exact ±1) in the compute dtype into a
  per-thread scratch matrix reused by every layer of that shape, then ((x ⊙ g) S^T) ⊙ h as `fast` (measured on
  1536 x 576 at 32 rows, bf16: 0.78 ms select-add against 0.25 ms for the matmul over a dense S); falls back to
  `fast` under autograd or off the kernels' contracts;
- `cached`: S materialised once per compute dtype and reused (a dense copy: for speed comparisons only).
They differ only in rounding: `reference` scales the weight, the others scale x and y (tests bound the difference).
g and h are held as int16 bit patterns of their fp16 values, so `Module.to(dtype)` never rounds them.

Shapes: x (..., C) -> y (..., R); packed (R, ceil(C / 8)); g (C,); h (R,).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deltafleet.native import sign_matmul_, sign_unpack_
from deltafleet.quant.linear import scratch_matrix
from deltafleet.registry import Registry
from deltafleet.store.signs import SignMatrix, row_bytes

LAYERNORM_EPS = 1e-5


@functools.cache
def _sign_table() -> Tensor:
    """(256, 8) fp32: the ±1 signs held by each byte value, lowest bit first."""
    return (((torch.arange(256)[:, None] >> torch.arange(8)) & 1) * 2 - 1).float()


def fast_signs(packed: Tensor, columns: int, dtype: torch.dtype) -> Tensor:
    """S (R, C) in `dtype` by byte-table lookup."""
    R = packed.shape[0]
    return F.embedding(packed.long(), _sign_table()).reshape(R, -1)[:, :columns].to(dtype)


def _reference(layer: SignLinear, x: Tensor) -> Tensor:
    return F.linear(x, layer.matrix().dequantize().to(x.dtype))


def _scaled(layer: SignLinear, x: Tensor, signs: Tensor) -> Tensor:
    return F.linear(x * layer.g.to(x.dtype), signs) * layer.h.to(x.dtype)


def _fast(layer: SignLinear, x: Tensor) -> Tensor:
    return _scaled(layer, x, fast_signs(layer.qsigns, layer.in_features, x.dtype))


def _cached(layer: SignLinear, x: Tensor) -> Tensor:
    if layer._cache is None or layer._cache.dtype != x.dtype:
        layer._cache = fast_signs(layer.qsigns, layer.in_features, x.dtype)
    return _scaled(layer, x, layer._cache)


NATIVE_ROWS = 8  # tokens up to which the select-add kernel beats unpack + matmul (bench/kernels.py --sign)
def _native(layer: SignLinear, x: Tensor) -> Tensor:
    if torch.is_grad_enabled() and x.requires_grad:
        return _fast(layer, x)
    rows = x.numel() // layer.in_features
    if rows > NATIVE_ROWS and x.dtype in (torch.float32, torch.bfloat16):
        signs = scratch_matrix(layer.out_features, layer.in_features, x.dtype)
        if sign_unpack_(layer.qsigns, signs):
            return _scaled(layer, x, signs)
    xg = (x.reshape(-1, layer.in_features).float() * layer.g.float()).contiguous()
    out = torch.empty(xg.shape[0], layer.out_features)
    if not sign_matmul_(xg, layer.qsigns, layer.h.float(), out):
        return _fast(layer, x)
    return out.to(x.dtype).reshape(*x.shape[:-1], layer.out_features)


KERNELS: Registry[Callable[[SignLinear, Tensor], Tensor]] = Registry("sign-linear kernel")
for _name, _fn in (("reference", _reference), ("fast", _fast), ("native", _native), ("cached", _cached)):
    KERNELS.register(_name, _fn)
DEFAULT_KERNEL = "native"


class SignLinear(nn.Module):
    """y = [LN](((x ⊙ g) S^T) ⊙ h) + b over a stored `SignMatrix`; the kernel decides how S is applied."""

    def __init__(self, sm: SignMatrix, bias: Tensor | None = None, kernel: str = DEFAULT_KERNEL,
                 layernorm: bool = False):
        super().__init__()
        R, C = sm.shape
        if tuple(sm.packed.shape) != (R, row_bytes(C)):
            raise ValueError(f"packed signs are {tuple(sm.packed.shape)}, {R}x{C} signs need ({R}, {row_bytes(C)})")
        self.shape, self.bits, self.layernorm = (R, C), 1, layernorm
        self.in_features, self.out_features = C, R
        self.register_buffer("qsigns", sm.packed.contiguous())
        self.register_buffer("qin_bits", sm.g.to(torch.float16).contiguous().view(torch.int16))
        self.register_buffer("qout_bits", sm.h.to(torch.float16).contiguous().view(torch.int16))
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)
        self._cache: Tensor | None = None
        self.set_kernel(kernel)

    def set_kernel(self, name: str) -> None:
        if name not in KERNELS:
            raise ValueError(f"kernel={name!r}: must be one of {sorted(KERNELS)}")
        self.kernel, self._fn, self._cache = name, KERNELS[name], None

    @property
    def g(self) -> Tensor:
        """fp16 (C,) input scale."""
        return self.qin_bits.view(torch.float16)

    @property
    def h(self) -> Tensor:
        """fp16 (R,) output scale."""
        return self.qout_bits.view(torch.float16)

    def matrix(self) -> SignMatrix:
        return SignMatrix(self.qsigns, self.g, self.h, self.shape)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """W_hat = h S g (R, C) in `dtype` (without the LayerNorm, which is not linear)."""
        return self.matrix().dequantize().to(dtype)

    @property
    def nbytes(self) -> int:
        """Bytes of the stored weight (signs, g, h), bias excluded."""
        return sum(t.numel() * t.element_size() for t in (self.qsigns, self.qin_bits, self.qout_bits))

    def forward(self, x: Tensor) -> Tensor:
        y = self._fn(self, x)
        if self.layernorm:
            y = F.layer_norm(y, (self.out_features,), eps=LAYERNORM_EPS)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bits=1, "
                f"layernorm={self.layernorm}, bias={self.bias is not None}, kernel={self.kernel}")


class LayerNormedLinear(nn.Linear):
    """A dense `nn.Linear` followed by OneBit's non-affine LayerNorm, then the bias: the transformers-side stand-in
    for a `SignLinear(layernorm=True)` whose weight is its W_hat. It is an `nn.Linear`, so peft wraps it like any
    projection (LoRA then adds after the LayerNorm, as the serving hook does)."""

    def forward(self, x: Tensor) -> Tensor:
        y = F.layer_norm(F.linear(x, self.weight), (self.out_features,), eps=LAYERNORM_EPS)
        return y if self.bias is None else y + self.bias
