"""Bit allocation across singular vectors, module shapes and parts, under one byte budget (`--plan alloc`).

Delta-CoMe's fixed band plan (`budget.resolve_plan`) gives every module the same bits per singular-vector index
(Ping et al. 2024, arXiv:2406.08903, Sec. 3.2). Allocation instead chooses, for each module (or each module shape:
a projection type, or a table), how many singular vectors to keep at which bit width, moving bytes between modules,
shapes and parts
(projections and tables) to minimise a measured error under the whole delta's budget, the idea of the
mixed-precision allocations of DeltaDQ, ImPart and DeltaMix (greedy marginal analysis, as in classical bit
allocation: Gersho & Gray, "Vector Quantization and Signal Compression", Sec. 8.3).

Objective: the sum over modules of the relative squared error of the reconstruction,
    sum_m sum_k w_mk q(b_mk),   w_mk = s_mk^2 h_mk / sum_j s_mj^2 h_mj,
where s_mk is the k-th singular value of module m's delta, h_mk = v_k^T H v_k its input energy along the right
singular vector v_k (H: the calibration Hessian of the module's input; 1 without calibration, i.e. weight space),
and q(b) the relative squared error of a triplet whose U and V are quantized to b bits: measured per module shape
on the leading triplets of one of its deltas, quantized as compression will quantize them (GPTQ with the module's
Hessian, error in its output space; or round-to-nearest, error in weight space), by the method
(`methods.svd.measured_errors`); without that, `quant_error` (Gaussian vectors). q(0) = 1 (a dropped vector),
q(16) = 0. Per matrix (`CompressSettings.alloc_per='matrix'`, the default), every module is its own group and gets
its own plan (`qlowrank` keys it 'OUTxIN@module'); per shape, a shape's modules share one plan, and the shape's
weight per index is the sum over its modules. Each module's weights are scaled by `ALLOC_WEIGHTS` (default: its
parameter count); q(b) is measured once per shape either way.

Greedy: every vector's options form a lower convex hull of (bytes, error) points, the same for all vectors of a
shape up to the weight; all hull steps of all vectors are taken in order of error reduction per byte while they
fit, keeping bits non-increasing along the index (bands). Bytes are exact (`budget.band_bytes`, U grouped along
out); the result never exceeds the budget.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor

from deltafleet.adapters.qlowrank import FP16_BITS, Ranks
from deltafleet.compress.budget import band_bytes, bands_bytes
from deltafleet.store.quantized import dequantize, rtn_quantize

ALLOC_BITS = (2, 3, 4, 8, FP16_BITS)  # the bit widths allocation chooses from (0: dropped)
# How a module's relative error counts in the objective: "module" every module alike, "size" in proportion to its
# parameters (a table counts as 49152 x 576 weights, not as one module), "energy" in proportion to its delta's
# (activation-weighted) energy, i.e. the absolute error.
ALLOC_WEIGHTS = ("module", "size", "energy")
ALLOC_PER = ("matrix", "shape")  # one plan per module, or one per module shape


@dataclass(frozen=True)
class ShapeGroup:
    """The modules of one shape (or one module: count 1): out, in, how many, and weights (K,): the summed relative
    energy per singular-vector index, K = min(out, in); errors: q(b) per bit width measured on this shape's own
    vectors (`measured_errors`), else the Gaussian model (`quant_error`)."""

    out_f: int
    in_f: int
    count: int
    weights: Tensor
    errors: dict[int, float] | None = None

    def q(self, bits: int, group_size: int) -> float:
        if bits == 0:
            return 1.0
        if self.errors is not None and bits in self.errors:
            return self.errors[bits]
        return quant_error(bits, self.out_f, self.in_f, group_size)


def vector_weights(S: Tensor, Vt: Tensor, H: Tensor | None = None, scale: float | None = 1.0) -> Tensor:
    """S (K,), Vt (K, in), H (in, in) or None -> w (K,): scale * s_k^2 h_k / sum_j s_j^2 h_j (h_k = v_k^T H v_k /
    tr(H) * in, or 1); scale None: the energies unnormalised (`ALLOC_WEIGHTS` "energy")."""
    e = S.float() ** 2
    if H is not None:
        Hn = H.float() * (H.shape[0] / H.diagonal().sum().clamp(min=1e-30))
        e = e * ((Vt.float() @ Hn) * Vt.float()).sum(1).clamp(min=0)
    return e if scale is None else scale * e / e.sum().clamp(min=1e-30)


@functools.lru_cache(maxsize=64)
def _vector_error(bits: int, n: int, group_size: int) -> float:
    """Relative squared error of one length-n vector (Gaussian entries) quantized round-to-nearest in groups."""
    if bits == FP16_BITS:
        return 0.0
    g = torch.Generator().manual_seed(bits * 7919 + n)
    x = torch.randn(64, n, generator=g)
    codes, scale, zero = rtn_quantize(x, bits, group_size)
    err = dequantize(codes, scale, zero, group_size) - x
    return float((err ** 2).sum() / (x ** 2).sum())


def quant_error(bits: int, out_f: int, in_f: int, group_size: int) -> float:
    """q(b): relative squared error of a rank-1 term u s v^T with v (length in) and u (length out) quantized to b bits
    (grouped along their length); 1 for a dropped vector (b = 0)."""
    if bits == 0:
        return 1.0
    return _vector_error(bits, in_f, group_size) + _vector_error(bits, out_f, group_size)


def _hull(g: ShapeGroup, group_size: int) -> list[tuple[int, float, int]]:
    """The lower convex hull of a vector's options from 'dropped': [(bits, error q, bytes)], bytes increasing."""
    pts = [(0, 1.0, 0)] + [(b, g.q(b, group_size), band_bytes(g.out_f, g.in_f, b, 1, group_size, "out"))
                           for b in ALLOC_BITS]
    pts.sort(key=lambda p: (p[2], p[1]))
    hull = [pts[0]]
    for p in pts[1:]:
        if p[1] >= hull[-1][1]:
            continue  # costs more, no less error
        while len(hull) >= 2:
            (_, e0, c0), (_, e1, c1) = hull[-2], hull[-1]
            if (e0 - e1) / (c1 - c0) <= (e0 - p[1]) / (p[2] - c0):  # hull[-1] lies above the chord
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def allocate(groups: list[ShapeGroup], budget: int, group_size: int) -> dict[tuple[int, int], Ranks]:
    """(out, in) -> bands ((bits, rank), ...) of each group (one group per shape), highest bits first, with
    sum_g count_g * bands_bytes(g) <= budget, chosen greedily (module docstring)."""
    plans = allocate_groups(groups, budget, group_size)
    return {(g.out_f, g.in_f): ranks for g, ranks in zip(groups, plans, strict=True)}


def allocate_groups(groups: list[ShapeGroup], budget: int, group_size: int) -> list[Ranks]:
    """The bands of each group, in order (groups may share a shape: per-matrix allocation gives each module its
    own group of count 1)."""
    steps = []  # (efficiency, group index, vector index, hull step)
    hulls = [_hull(g, group_size) for g in groups]
    for gi, g in enumerate(groups):
        w = torch.cummin(g.weights.float(), 0).values.tolist()  # non-increasing: bands stay contiguous
        hull = hulls[gi]
        for k, wk in enumerate(w):
            for j in range(1, len(hull)):
                (_, e0, c0), (_, e1, c1) = hull[j - 1], hull[j]
                steps.append((wk * (e0 - e1) / ((c1 - c0) * g.count), gi, k, j))
    steps.sort(key=lambda s: -s[0])
    level = [[0] * len(g.weights) for g in groups]  # hull index reached by each vector
    left = budget
    for eff, gi, k, j in steps:
        if eff <= 0:
            break
        g, lv = groups[gi], level[gi]
        if lv[k] != j - 1 or (k > 0 and lv[k - 1] < j):  # not the vector's next step, or bits would rise along k
            continue
        cost = (hulls[gi][j][2] - hulls[gi][j - 1][2]) * g.count
        if cost <= left:
            lv[k], left = j, left - cost
    plans = []
    for gi in range(len(groups)):
        bits = [hulls[gi][j][0] for j in level[gi] if j > 0]
        ranks: list[tuple[int, int]] = []
        for b in bits:
            if ranks and ranks[-1][0] == b:
                ranks[-1] = (b, ranks[-1][1] + 1)
            else:
                ranks.append((b, 1))
        plans.append(tuple(ranks))
    return _trim(groups, plans, budget, group_size)


def _trim(groups: list[ShapeGroup], plans: list[Ranks], budget: int, group_size: int) -> list[Ranks]:
    """Drop last vectors until the exact bytes (packing rounds up per band) fit the budget."""
    def total() -> int:
        return sum(g.count * bands_bytes(g.out_f, g.in_f, p, group_size, "out")
                   for g, p in zip(groups, plans, strict=True))

    while total() > budget:
        # the last vector of the group whose last vector weighs least
        gi = min((i for i, p in enumerate(plans) if p),
                 key=lambda i: float(groups[i].weights[sum(r for _, r in plans[i]) - 1]))
        ranks = list(plans[gi])
        b, r = ranks[-1]
        ranks[-1:] = [(b, r - 1)] if r > 1 else []
        plans[gi] = tuple(ranks)
    return plans
