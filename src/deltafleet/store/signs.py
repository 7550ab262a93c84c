"""The stored form of a OneBit matrix (Xu et al. 2024, "OneBit: Towards Extremely Low-bit Large Language Models",
arXiv 2402.11295, section 3.2): a ±1 sign matrix packed 8 signs per byte and two fp16 vectors (pure functions; no
model knowledge). The quantizer (`deltafleet.quant.onebit`) writes it; `quant.sign_linear.SignLinear` computes with
it.

Shapes: W (R, C) of R output rows and C input columns, approximated as

    W_hat = diag(h) · S · diag(g)      S in {-1, +1}^(R, C),  g (C,) the input scale,  h (R,) the output scale

so that x W_hat^T = ((x ⊙ g) S^T) ⊙ h. Packing is row-aligned: row r of S takes ceil(C / 8) bytes, sign (r, c) is
bit c % 8 (lowest bit first) of byte c // 8 of that row, 1 for +1 and 0 for -1; the unused high bits of a row's
last byte are 0. Bits per weight: 1 + 16 (R + C) / (R C), about 1.03 for SmolLM2's 576 x 1536 projections.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deltafleet.store.quantized import take_tensors

_BIT_WEIGHTS = 1 << torch.arange(8, dtype=torch.int32)


def row_bytes(columns: int) -> int:
    return -(-columns // 8)


def pack_signs(signs: Tensor) -> Tensor:
    """signs (R, C): bool (True = +1) or real (>= 0 reads as +1, < 0 as -1) -> uint8 (R, ceil(C / 8))."""
    if signs.dim() != 2:
        raise ValueError(f"signs must be 2-d (R, C), got shape {tuple(signs.shape)}")
    R, C = signs.shape
    plus = (signs if signs.dtype == torch.bool else signs >= 0).to(torch.int32)
    pad = row_bytes(C) * 8 - C
    if pad:
        plus = torch.nn.functional.pad(plus, (0, pad))
    return (plus.reshape(R, -1, 8) * _BIT_WEIGHTS).sum(-1).to(torch.uint8)


def unpack_signs(packed: Tensor, columns: int) -> Tensor:
    """Inverse of `pack_signs`: uint8 (R, ceil(C / 8)) -> fp32 (R, C) of -1.0 and +1.0 (bit by bit)."""
    if packed.dtype != torch.uint8 or packed.dim() != 2 or packed.shape[1] != row_bytes(columns):
        raise ValueError(f"packed signs: expected uint8 (R, {row_bytes(columns)}) for {columns} columns, got "
                         f"{packed.dtype} {tuple(packed.shape)}")
    bits = (packed.to(torch.int32)[..., None] >> torch.arange(8, dtype=torch.int32)) & 1  # (R, Cb, 8)
    return (bits.reshape(packed.shape[0], -1)[:, :columns] * 2 - 1).float()


@dataclass
class SignMatrix:
    """A OneBit (R, C) matrix as stored: packed signs, fp16 input scale g (C,) and output scale h (R,)."""

    packed: Tensor  # uint8 (R, ceil(C / 8))
    g: Tensor  # fp16 (C,)
    h: Tensor  # fp16 (R,)
    shape: tuple[int, int]
    bits = 1

    @classmethod
    def from_factors(cls, signs: Tensor, g: Tensor, h: Tensor) -> SignMatrix:
        """signs (R, C) as in `pack_signs`, g (C,), h (R,) real -> the stored matrix (g, h rounded to fp16)."""
        R, C = signs.shape
        if tuple(g.shape) != (C,) or tuple(h.shape) != (R,):
            raise ValueError(f"g {tuple(g.shape)} and h {tuple(h.shape)} must be ({C},) and ({R},)")
        return cls(pack_signs(signs), g.detach().to(torch.float16), h.detach().to(torch.float16), (R, C))

    def signs(self) -> Tensor:
        """S (R, C) fp32 of ±1."""
        return unpack_signs(self.packed, self.shape[1])

    def dequantize(self) -> Tensor:
        """W_hat = h[:, None] * S * g[None, :] (R, C) fp32."""
        return self.h.float()[:, None] * self.signs() * self.g.float()[None, :]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.g, self.h))

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        """The tensors to store under `prefix` (the shape follows from the model's config)."""
        return {f"{prefix}.qsigns": self.packed, f"{prefix}.qin": self.g, f"{prefix}.qout": self.h}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, shape: tuple[int, int]) -> SignMatrix:
        """Rebuild from stored tensors; raises ValueError naming the tensor whose shape, dtype or values are wrong
        (non-finite scales; set padding bits, which a writer of this format never produces)."""
        R, C = shape
        want = {"qsigns": ((R, row_bytes(C)), torch.uint8), "qin": ((C,), torch.float16),
                "qout": ((R,), torch.float16)}
        got = take_tensors(tensors, prefix, want)
        for name in ("qin", "qout"):
            if not bool(torch.isfinite(got[name]).all()):
                raise ValueError(f"tensor {prefix}.{name!s} holds non-finite scales")
        if C % 8 and R and int((got["qsigns"][:, -1].to(torch.int32) >> (C % 8)).max()) != 0:
            raise ValueError(f"tensor {prefix}.qsigns has bits set beyond column {C} (padding must be 0)")
        return cls(got["qsigns"], got["qin"], got["qout"], (R, C))
