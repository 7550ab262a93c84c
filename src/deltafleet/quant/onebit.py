"""OneBit (Xu et al. 2024, "OneBit: Towards Extremely Low-bit Large Language Models", arXiv 2402.11295): every
projection becomes a ±1 sign matrix and two vectors (`store.signs.SignMatrix`), initialised by
Sign-Value-Independent Decomposition (section 3.3, eq. 7-9) and then trained by quantization-aware knowledge
distillation from the full-precision model (section 3.4; `quant.onebit_kd`).

SVID: W ≈ Sign(W) ⊙ (a b^T) with a b^T a rank-1 approximation of |W| (a, b >= 0); then h = a, g = b, so that
W_hat = diag(h) Sign(W) diag(g). Two ways to get the rank-1 factor, both here and tested:
- `svd` (the default): the top singular triplet of |W|. For a non-negative matrix the top singular vectors can be
  taken non-negative (Perron-Frobenius), so this is the exact minimiser of ||(|W| - a b^T)||_F over all rank-1
  a b^T, non-negative ones included; one LAPACK call per matrix.
- `nmf`: rank-1 non-negative matrix factorisation by alternating least squares (the released code calls
  scikit-learn's NMF with one component; for one component the coordinate-descent update is this closed form).
  It minimises the same Frobenius objective over the same set, so it converges to the same a b^T
  (tested: within 1e-5 relative); it is kept to reproduce the released recipe, at 50 alternations (two matrix-vector
  products each) per matrix.

Shapes: W (R, C) -> a (R,), b (C,).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from deltafleet.errors import DeltafleetError
from deltafleet.models.config import PROJECTIONS
from deltafleet.models.llama import Transformer
from deltafleet.quant.base import read_quantized_base
from deltafleet.quant.config import QuantConfig
from deltafleet.quant.onebit_kd import distill
from deltafleet.quant.registry import Quantizer, QuantResult, RunContext, register_quantizer
from deltafleet.registry import Registry
from deltafleet.store.signs import SignMatrix


def rank1_svd(m: Tensor) -> tuple[Tensor, Tensor]:
    """Best rank-1 approximation a b^T of a non-negative m (R, C) -> a (R,), b (C,), both >= 0."""
    U, S, Vh = torch.linalg.svd(m.double(), full_matrices=False)
    u, v = U[:, 0], Vh[0]
    if float(u.sum()) < 0:  # a non-negative matrix's top singular pair is sign-consistent: take the + one
        u, v = -u, -v
    s = S[0].sqrt()
    return (u.clamp(min=0) * s).float(), (v.clamp(min=0) * s).float()


def rank1_nmf(m: Tensor, iters: int = 50) -> tuple[Tensor, Tensor]:
    """Rank-1 NMF of a non-negative m (R, C) by alternating least squares -> a (R,), b (C,), both >= 0, balanced
    (equal norms, as `rank1_svd`)."""
    M = m.double()
    b = M.mean(0).clamp(min=1e-12)
    a = M @ b / (b @ b)
    for _ in range(iters):
        a = (M @ b / (b @ b)).clamp(min=0)
        b = (M.T @ a / (a @ a).clamp(min=1e-300)).clamp(min=0)
    scale = (a.norm() / b.norm().clamp(min=1e-300)).sqrt()
    return (a / scale).float(), (b * scale).float()


SVID: Registry[Callable[[Tensor], tuple[Tensor, Tensor]]] = Registry("SVID factorisation")
SVID.register("svd", rank1_svd)
SVID.register("nmf", rank1_nmf)


def svid(w: Tensor, method: str = "svd") -> tuple[Tensor, Tensor, Tensor]:
    """W (R, C) -> (signs (R, C) fp32 ±1 with Sign(0) = +1, g (C,), h (R,)) with W ≈ h[:, None] * signs * g."""
    a, b = SVID[method](w.float().abs())
    return torch.where(w >= 0, 1.0, -1.0), b, a


def svid_matrices(model: Transformer, method: str) -> dict[tuple[int, str], tuple[Tensor, Tensor, Tensor]]:
    """(signs, g, h) of every projection of `model`."""
    return {(layer, proj): svid(model.linear(layer, proj).weight.detach(), method)
            for layer in range(model.config.num_layers) for proj in PROJECTIONS}


def stored_factors(model: Transformer, path: str) -> dict[tuple[int, str], tuple[Tensor, Tensor, Tensor]]:
    """(signs, g, h) of every projection of the OneBit base at `path`, checked against `model`'s shapes: the start
    of a continued distillation (`kd_init`)."""
    qb = read_quantized_base(path)
    if qb.manifest.get("codec") != "sign":
        raise DeltafleetError(f"kd_init={path}: not a OneBit base (codec {qb.manifest.get('codec', 'affine')!r})")
    out = {}
    for layer in range(model.config.num_layers):
        for proj in PROJECTIONS:
            sm = qb.matrices.get((layer, proj))
            want = tuple(model.linear(layer, proj).weight.shape)
            if sm is None or tuple(sm.shape) != want:
                raise DeltafleetError(f"kd_init={path}: layer {layer} {proj} is not {want}: a OneBit base of "
                                      f"another model")
            out[(layer, proj)] = (sm.signs(), sm.g.float(), sm.h.float())
    return out


def _onebit(model: Transformer, cfg: QuantConfig, calib: Tensor | None, progress: Callable[[str], None],
            ctx: RunContext | None = None) -> QuantResult:
    stats: dict = {"svid": cfg.onebit_svid, "layernorm": cfg.onebit_layernorm}
    if cfg.kd_init:
        factors = stored_factors(model, cfg.kd_init)
        progress(f"onebit: starting from the OneBit base {cfg.kd_init}")
        stats["init"] = cfg.kd_init
    else:
        factors = svid_matrices(model, cfg.onebit_svid)
        progress(f"onebit: SVID ({cfg.onebit_svid}) of {len(factors)} projections")
    if cfg.kd_steps > 0:
        if calib is None:
            raise ValueError("onebit: knowledge distillation needs text windows")
        factors, kd_stats = distill(model, factors, cfg, calib, progress, ctx or RunContext())
        stats["kd"] = kd_stats
    matrices = {key: SignMatrix.from_factors(s, g, h) for key, (s, g, h) in factors.items()}
    return QuantResult(matrices, stats=stats)


register_quantizer(Quantizer("onebit", True, False, _onebit,
                             "OneBit: 1-bit signs + two fp16 vectors, SVID init, knowledge distillation",
                             bits=(1,), codec="sign"))
