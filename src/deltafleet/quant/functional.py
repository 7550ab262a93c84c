"""GPTQ (pure functions) over the group-wise affine codec of `deltafleet.store.quantized`.

GPTQ follows Frantar et al. 2023 ("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv:2210.17323), Algorithm 1 (the lazy-batch, Cholesky form): columns are quantized one at a
time and each column's rounding error, divided by the inverse Hessian's diagonal, is spread over the columns
not yet quantized; H = X^T X summed over calibration inputs X (N, C), dampened by `damp` times its mean
diagonal. With `act_order`, columns go in order of decreasing H diagonal and group parameters are fixed from
the unquantized matrix first ("static groups"), so a stored group is always C-contiguous.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltafleet.store.quantized import (
    QuantizedMatrix,
    check_bits,
    dequantize,
    group_params,
    num_groups,
    quantize_with,
    rtn_quantize,
)


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
    check_bits(bits)
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
    check_bits(bits)
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


def gptq_matrix(w: Tensor, H: Tensor, bits: int, group_size: int, **gptq) -> QuantizedMatrix:
    """GPTQ with Hessian H, as a stored `QuantizedMatrix`."""
    return QuantizedMatrix.from_codes(*gptq_quantize(w, H, bits, group_size, **gptq), bits, group_size)
