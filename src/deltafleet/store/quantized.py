"""The stored form of a group-quantized matrix: bit packing, the group-wise affine codec, round-to-nearest and
`QuantizedMatrix` (pure functions; no model knowledge). Quantizers (`deltafleet.quant`) and the compressed-delta
adapter kinds (`deltafleet.adapters.qlowrank`, `bitdelta`) write and read this form.

Shapes: a matrix W (R, C) of R rows and C columns, where C is the input dimension of the linear y = W x (or of
whatever the matrix multiplies). Each row's columns are cut into groups of G consecutive columns
(ngroups = ceil(C / G); the last group may be shorter); a group has one scale and one zero point. With b bits:

    xmin = min(W_g, 0), xmax = max(W_g, 0)        (optionally times learned clipping factors in (0, 1])
    scale = (xmax - xmin) / (2^b - 1)              stored in fp16 (the quantizer uses the fp16 value)
    zero  = round(-xmin / scale)                   an integer in [0, 2^b - 1], stored as uint8
    q     = clamp(round(W / scale) + zero, 0, 2^b - 1)
    W_hat = (q - zero) * scale

Packing is a little-endian bit stream over the flattened codes: exactly ceil(numel * b / 8) bytes for any b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r}: must be one of {SUPPORTED_BITS}")


def num_groups(columns: int, group_size: int) -> int:
    if group_size <= 0:
        raise ValueError(f"group_size={group_size!r}: must be a positive integer")
    return math.ceil(columns / group_size)


# ------------------------------------------------------------------------------------------ packing
def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """codes (...,) integers in [0, 2^bits) -> uint8 (ceil(numel * bits / 8),), a little-endian bit stream."""
    check_bits(bits)
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= 1 << bits):
        raise ValueError(f"codes must lie in [0, {(1 << bits) - 1}] for {bits}-bit packing")
    if bits == 8:
        return flat.to(torch.uint8)
    shifts = torch.arange(bits, dtype=torch.int32)
    stream = ((flat[:, None] >> shifts) & 1).reshape(-1)  # (numel * bits,) bits, LSB first
    pad = (-stream.numel()) % 8
    if pad:
        stream = torch.cat([stream, stream.new_zeros(pad)])
    weights = (1 << torch.arange(8, dtype=torch.int32))
    return (stream.reshape(-1, 8) * weights).sum(-1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Inverse of `pack_codes`: uint8 (ceil(numel * bits / 8),) -> uint8 codes (numel,)."""
    check_bits(bits)
    need = math.ceil(numel * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"packed codes: expected uint8 of shape ({need},) for {numel} {bits}-bit codes, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    if bits == 8:
        return packed.clone()
    stream = ((packed.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)
    stream = stream[: numel * bits].reshape(numel, bits)
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(-1).to(torch.uint8)


def fast_unpack(packed: Tensor, bits: int, numel: int) -> Tensor:
    """Vectorised `unpack_codes` (its reference): uint8 (ceil(numel*b/8),) -> uint8 codes (numel,).

    Every run of 8 codes occupies exactly b bytes of the little-endian stream, so each b-byte chunk is read as an
    integer word and code k of the chunk is (word >> (k*b)) & (2^b - 1).
    """
    check_bits(bits)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != math.ceil(numel * bits / 8):
        raise ValueError(f"packed codes: expected uint8 of shape ({math.ceil(numel * bits / 8)},) for {numel} "
                         f"{bits}-bit codes, got {packed.dtype} {tuple(packed.shape)}")
    chunks = -(-numel // 8)
    need = chunks * bits
    p = packed if packed.numel() == need else F.pad(packed, (0, need - packed.numel()))
    wide = torch.int32 if bits <= 3 else torch.int64  # a word of 8*b bits must fit with its sign bit clear
    bytes_ = p.reshape(chunks, bits).to(wide)  # (chunks, b)
    word = (bytes_ << (8 * torch.arange(bits, dtype=wide))).sum(-1, keepdim=True)  # (chunks, 1)
    codes = (word >> (bits * torch.arange(8, dtype=wide))) & ((1 << bits) - 1)  # (chunks, 8)
    return codes.reshape(-1)[:numel].to(torch.uint8)


def packed_nbytes(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


# ------------------------------------------------------------------------------------------ quantizer
def group_params(w: Tensor, bits: int, clip_max: Tensor | float = 1.0,
                 clip_min: Tensor | float = 1.0) -> tuple[Tensor, Tensor]:
    """w (R, g) one group of columns per row -> scale (R,) (fp16-representable fp32), zero (R,) (integer fp32).

    clip_max, clip_min scale the range's ends (learned weight clipping, OmniQuant/ApiQ); 1.0 is plain min/max.
    """
    maxq = (1 << bits) - 1
    xmax = torch.clamp(w.max(dim=1).values, min=0) * clip_max
    xmin = torch.clamp(w.min(dim=1).values, max=0) * clip_min
    scale = (xmax - xmin) / maxq
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero group: any scale, zero code
    scale = scale.half().float().clamp(min=torch.finfo(torch.float16).tiny)
    zero = torch.clamp(torch.round(-xmin / scale), 0, maxq)
    return scale, zero


def quantize_with(w: Tensor, scale: Tensor, zero: Tensor, bits: int) -> Tensor:
    """w (R, c) with per-row scale, zero (R,) or (R, c) -> codes (R, c) as fp32 integers."""
    maxq = (1 << bits) - 1
    if scale.dim() == 1:
        scale, zero = scale[:, None], zero[:, None]
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def expand_groups(t: Tensor, columns: int, group_size: int) -> Tensor:
    """Per-group values (R, ngroups) -> per-column (R, C)."""
    return t.repeat_interleave(group_size, dim=1)[:, :columns]


def dequantize(codes: Tensor, scale: Tensor, zero: Tensor, group_size: int) -> Tensor:
    """codes (R, C), scale (R, ngroups), zero (R, ngroups) -> W_hat (R, C) fp32."""
    C = codes.shape[1]
    s = expand_groups(scale.float(), C, group_size)
    z = expand_groups(zero.float(), C, group_size)
    return (codes.float() - z) * s


def rtn_quantize(w: Tensor, bits: int, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """Round to nearest. w (R, C) -> codes (R, C) uint8, scale (R, ngroups) fp16, zero (R, ngroups) uint8."""
    check_bits(bits)
    W = w.float()
    R, C = W.shape
    G = num_groups(C, group_size)
    pad = G * group_size - C
    Wp = torch.nn.functional.pad(W, (0, pad)) if pad else W
    if pad:  # padded columns must not widen the last group's range: repeat its first column
        Wp[:, C:] = W[:, (G - 1) * group_size: (G - 1) * group_size + 1]
    grouped = Wp.reshape(R * G, group_size)
    scale, zero = group_params(grouped, bits)
    codes = quantize_with(grouped, scale, zero, bits).reshape(R, G * group_size)[:, :C]
    return codes.to(torch.uint8), scale.reshape(R, G).half(), zero.reshape(R, G).to(torch.uint8)


# ------------------------------------------------------------------------------------------ container
def take_tensors(tensors: dict[str, Tensor], prefix: str,
                 want: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> dict[str, Tensor]:
    """{name: tensors[f"{prefix}.{name}"]} for every name of `want` (name -> (shape, dtype)); raises ValueError
    naming the first tensor that is missing or of another shape or dtype."""
    got = {}
    for name, (shape, dtype) in want.items():
        key = f"{prefix}.{name}"
        if key not in tensors:
            raise ValueError(f"tensor {key!r} is missing")
        t = tensors[key]
        if tuple(t.shape) != shape or t.dtype != dtype:
            raise ValueError(f"tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected {dtype} {shape}")
        got[name] = t
    return got



@dataclass
class QuantizedMatrix:
    """A quantized (R, C) matrix as stored: packed codes, fp16 scales, uint8 zero points."""

    packed: Tensor  # uint8 (ceil(R * C * bits / 8),)
    scale: Tensor  # fp16 (R, ngroups)
    zero: Tensor  # uint8 (R, ngroups)
    shape: tuple[int, int]
    bits: int
    group_size: int

    @classmethod
    def from_codes(cls, codes: Tensor, scale: Tensor, zero: Tensor, bits: int, group_size: int) -> QuantizedMatrix:
        return cls(pack_codes(codes, bits), scale.half(), zero.to(torch.uint8), tuple(codes.shape), bits, group_size)

    @classmethod
    def quantize(cls, w: Tensor, bits: int, group_size: int) -> QuantizedMatrix:
        """Round to nearest (GPTQ: `deltafleet.quant.functional.gptq_matrix`)."""
        return cls.from_codes(*rtn_quantize(w, bits, group_size), bits, group_size)

    def codes(self) -> Tensor:
        R, C = self.shape
        return fast_unpack(self.packed, self.bits, R * C).reshape(R, C)

    def dequantize(self) -> Tensor:
        """(R, C) fp32."""
        return dequantize(self.codes(), self.scale, self.zero, self.group_size)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.zero))

    def tensors(self, prefix: str) -> dict[str, Tensor]:
        """The tensors to store under `prefix` (shape, bits and group size go in the manifest)."""
        return {f"{prefix}.qcodes": self.packed, f"{prefix}.qscale": self.scale, f"{prefix}.qzero": self.zero}

    @classmethod
    def from_tensors(cls, tensors: dict[str, Tensor], prefix: str, shape: tuple[int, int], bits: int,
                     group_size: int) -> QuantizedMatrix:
        """Rebuild from stored tensors; raises ValueError naming the tensor whose shape or dtype is wrong."""
        check_bits(bits)
        R, C = shape
        G = num_groups(C, group_size)
        want = {"qcodes": ((packed_nbytes(R * C, bits),), torch.uint8), "qscale": ((R, G), torch.float16),
                "qzero": ((R, G), torch.uint8)}
        got = take_tensors(tensors, prefix, want)
        if got["qzero"].numel() and int(got["qzero"].max()) >= 1 << bits:
            raise ValueError(f"tensor {prefix}.qzero holds zero points outside [0, {(1 << bits) - 1}]")
        return cls(got["qcodes"], got["qscale"], got["qzero"], (R, C), bits, group_size)
