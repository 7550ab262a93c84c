"""Group-wise uniform affine quantization: round-to-nearest, GPTQ, and dense bit packing (pure functions).

Shapes: a matrix W (R, C) of R rows and C columns, where C is the input dimension of the linear y = W x (or of
whatever the matrix multiplies). Each row's columns are cut into groups of G consecutive columns
(ngroups = ceil(C / G); the last group may be shorter); a group has one scale and one zero point. With b bits:

    xmin = min(W_g, 0), xmax = max(W_g, 0)        (optionally times learned clipping factors in (0, 1])
    scale = (xmax - xmin) / (2^b - 1)              stored in fp16 (the quantizer uses the fp16 value)
    zero  = round(-xmin / scale)                   an integer in [0, 2^b - 1], stored as uint8
    q     = clamp(round(W / scale) + zero, 0, 2^b - 1)
    W_hat = (q - zero) * scale

GPTQ follows Frantar et al. 2023 ("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323), Algorithm 1 (the lazy-batch, Cholesky form): columns are quantized one at a
time and each column's rounding error, divided by the inverse Hessian's diagonal, is spread over the columns
not yet quantized; H = X^T X summed over calibration inputs X (N, C), dampened by `damp` times its mean
diagonal. With `act_order`, columns go in order of decreasing H diagonal and group parameters are fixed from
the unquantized matrix first ("static groups"), so a stored group is always C-contiguous.

Packing is a little-endian bit stream over the flattened codes: exactly ceil(numel * b / 8) bytes for any b.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

SUPPORTED_BITS = (1, 2, 3, 4, 5, 6, 7, 8)


def _check_bits(bits: int) -> None:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits={bits!r}: must be one of {SUPPORTED_BITS}")


def num_groups(columns: int, group_size: int) -> int:
    if group_size <= 0:
        raise ValueError(f"group_size={group_size!r}: must be a positive integer")
    return math.ceil(columns / group_size)


# ------------------------------------------------------------------------------------------ packing
def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """codes (...,) integers in [0, 2^bits) -> uint8 (ceil(numel * bits / 8),), a little-endian bit stream."""
    _check_bits(bits)
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
    _check_bits(bits)
    need = math.ceil(numel * bits / 8)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != need:
        raise ValueError(f"packed codes: expected uint8 of shape ({need},) for {numel} {bits}-bit codes, "
                         f"got {packed.dtype} {tuple(packed.shape)}")
    if bits == 8:
        return packed.clone()
    stream = ((packed.to(torch.int32)[:, None] >> torch.arange(8, dtype=torch.int32)) & 1).reshape(-1)
    stream = stream[: numel * bits].reshape(numel, bits)
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(-1).to(torch.uint8)


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
    _check_bits(bits)
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


def _gptq_inputs(w: Tensor, H: Tensor) -> tuple[Tensor, Tensor]:
    """fp32 copies of w (R, C) and H (C, C), checked; columns whose H diagonal is zero (inputs that never fire)
    are zeroed in w and given a unit diagonal in H."""
    W = w.float().clone()
    C = W.shape[1]
    if H.shape != (C, C):
        raise ValueError(f"H has shape {tuple(H.shape)}, expected ({C}, {C}) for a matrix of {C} columns")
    H = H.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    return W, H


def _damped_inverse_factor(H: Tensor, damp: float) -> Tensor:
    """The upper Cholesky factor of (H + damp * mean(diag H) * I)^-1 (C, C)."""
    H = H + damp * torch.mean(torch.diag(H)) * torch.eye(H.shape[0])
    return torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)


def gptq_quantize(w: Tensor, H: Tensor, bits: int, group_size: int, *, damp: float = 0.01,
                  act_order: bool = False, block_size: int = 128) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ. w (R, C), H (C, C) = sum of x x^T over calibration inputs -> codes, scale, zero as `rtn_quantize`.

    Columns whose H diagonal is zero (inputs that never fire) are set to zero before quantizing.
    """
    _check_bits(bits)
    W, H = _gptq_inputs(w, H)
    R, C = W.shape
    G = num_groups(C, group_size)
    scale = torch.zeros(R, G)
    zero = torch.zeros(R, G)
    if act_order:
        for g in range(G):  # static groups, from the matrix before any error feedback
            scale[:, g], zero[:, g] = group_params(W[:, g * group_size:(g + 1) * group_size], bits)
        perm = torch.argsort(torch.diag(H), descending=True)
    else:
        perm = torch.arange(C)
        block_size = group_size  # a group then always starts a block, so its range sees all earlier feedback
    W = W[:, perm]
    Hinv = _damped_inverse_factor(H[perm][:, perm], damp)
    codes = torch.zeros(R, C)
    for i1 in range(0, C, block_size):
        i2 = min(i1 + block_size, C)
        W1 = W[:, i1:i2].clone()
        E1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        if not act_order:
            g = i1 // group_size
            scale[:, g], zero[:, g] = group_params(W1, bits)
        for i in range(i2 - i1):
            g = int(perm[i1 + i]) // group_size
            s, z = scale[:, g], zero[:, g]
            q = quantize_with(W1[:, i:i + 1], s, z, bits)[:, 0]
            codes[:, i1 + i] = q
            err = (W1[:, i] - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            E1[:, i] = err
        W[:, i2:] -= E1 @ Hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    codes = codes[:, inv]
    return codes.to(torch.uint8), scale.half(), zero.to(torch.uint8)


def gptq_quantize_transposed(w: Tensor, H: Tensor, bits: int, group_size: int, *,
                             damp: float = 0.01) -> tuple[Tensor, Tensor, Tensor]:
    """GPTQ of w (R, C) whose quantization groups run down each column: column j is quantized as one row of
    w^T, in groups of G consecutive rows of w, right before its error is fed forward into columns j+1.. through
    the inverse Hessian H (C, C). Returns codes, scale, zero of w^T (C, R), as `rtn_quantize(w.t())` lays them
    out. Used for Delta-CoMe's U (out, r), whose input dimension r is often below one group."""
    _check_bits(bits)
    W, H = _gptq_inputs(w, H)
    R, C = W.shape
    Hinv = _damped_inverse_factor(H, damp)
    G = num_groups(R, group_size)
    codes, scale, zero = torch.zeros(C, R, dtype=torch.uint8), torch.zeros(C, G), torch.zeros(C, G)
    for j in range(C):
        q, s, z = rtn_quantize(W[:, j][None], bits, group_size)  # (1, R), (1, G), (1, G)
        codes[j], scale[j], zero[j] = q[0], s[0].float(), z[0].float()
        err = (W[:, j] - dequantize(q, s, z, group_size)[0]) / Hinv[j, j]
        W[:, j + 1:] -= err[:, None] * Hinv[j, j + 1:][None, :]
    return codes, scale.half(), zero.to(torch.uint8)


def hessian(x: Tensor) -> Tensor:
    """Calibration inputs x (..., C) -> H (C, C) = sum over rows of x x^T, in fp32 (feed to `gptq_quantize`)."""
    x = x.reshape(-1, x.shape[-1]).float()
    return x.t() @ x


# ------------------------------------------------------------------------------------------ container
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
    def quantize(cls, w: Tensor, bits: int, group_size: int, H: Tensor | None = None, **gptq) -> QuantizedMatrix:
        """RTN when H is None, else GPTQ with Hessian H."""
        codes, scale, zero = rtn_quantize(w, bits, group_size) if H is None else gptq_quantize(
            w, H, bits, group_size, **gptq)
        return cls.from_codes(codes, scale, zero, bits, group_size)

    def codes(self) -> Tensor:
        R, C = self.shape
        return unpack_codes(self.packed, self.bits, R * C).reshape(R, C)

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
        _check_bits(bits)
        R, C = shape
        G = num_groups(C, group_size)
        want = {"qcodes": ((packed_nbytes(R * C, bits),), torch.uint8), "qscale": ((R, G), torch.float16),
                "qzero": ((R, G), torch.uint8)}
        got = {}
        for name, (s, dt) in want.items():
            key = f"{prefix}.{name}"
            if key not in tensors:
                raise ValueError(f"tensor {key!r} is missing")
            t = tensors[key]
            if tuple(t.shape) != s or t.dtype != dt:
                raise ValueError(f"tensor {key!r} is {t.dtype} {tuple(t.shape)}, expected {dt} {s}")
            got[name] = t
        if got["qzero"].numel() and int(got["qzero"].max()) >= 1 << bits:
            raise ValueError(f"tensor {prefix}.qzero holds zero points outside [0, {(1 << bits) - 1}]")
        return cls(got["qcodes"], got["qscale"], got["qzero"], (R, C), bits, group_size)
