"""SVD-based delta compression: Delta-CoMe's mixed-precision singular vectors, and plain truncated SVD.

Delta-CoMe (Ping et al., "Delta-CoMe: Training-Free Delta-Compression with Mixed-Precision for Large Language
Models", NeurIPS 2024, arXiv:2406.08903, Sec. 3): Delta = U S V^T; the triplets of the largest singular values
get the most bits (bands of `plan`), the tail is dropped. Per band b, V_b^T (r, in) is quantized with GPTQ on
the Hessian H of the projection input x; then U_b (out, r) with GPTQ on the Hessian of z = x (S_b V_b_hat^T)^T,
i.e. S_b V_b_hat H V_b_hat^T S_b (computed from H, with the already-quantized V). Bands go highest-bit first.
`quantizer=rtn` replaces GPTQ by round-to-nearest (no calibration).

`lowrank` is the truncated SVD at the largest rank whose fp16 factors fit the budget (one 16-bit band).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import replace

import torch
from torch import Tensor

from deltafleet.adapters import Adapter
from deltafleet.adapters.adapter import module_name
from deltafleet.adapters.qlowrank import FP16_BITS, QLowRankConfig, Ranks, shape_key
from deltafleet.adapters.registry import Params, get_kind
from deltafleet.compress.alloc import ALLOC_BITS, ShapeGroup, allocate, allocate_groups, vector_weights
from deltafleet.compress.budget import ALLOC_PLAN, AUTO_PLAN, Band, bands_bytes, plan_ranks, resolve_plan
from deltafleet.compress.delta import DeltaSet
from deltafleet.compress.methods.base import CompressSettings, Context, Method, register_method
from deltafleet.errors import DeltafleetError
from deltafleet.models.config import PROJECTIONS
from deltafleet.quant.functional import gptq_matrix, gptq_quantize_transposed
from deltafleet.store.quantized import QuantizedMatrix


def quantize_factors(delta: Tensor, ranks: Ranks, group_size: int, H: Tensor | None = None,
                     damp: float = 0.01, act_order: bool = True, u_groups: str = "rank",
                     svd: tuple[Tensor, Tensor, Tensor] | None = None) -> Params:
    """delta (out, in), bands ((bits, r), ...) -> stored params of a `qlowrank` module.

    H (in, in): Hessian of the projection input (GPTQ); None: round-to-nearest. u_groups 'out': U stored as
    U^T (r, out) grouped along out (GPTQ then feeds each column's error forward across the rank). svd: the delta's
    thin SVD (U, S, V^T) when already computed.
    """
    # (out, k), (k,), (k, in)
    U, S, Vt = svd if svd is not None else torch.linalg.svd(delta.float(), full_matrices=False)
    params: Params = {}
    start = 0
    for i, (bits, r) in enumerate(ranks):
        Ub, Sb, Vtb = U[:, start:start + r], S[start:start + r], Vt[start:start + r]
        start += r
        S16 = Sb.half()
        params[f"b{i}.S"] = S16
        if bits == FP16_BITS:
            params |= {f"b{i}.V": Vtb.half().contiguous(), f"b{i}.U": Ub.half().contiguous()}
            continue
        gptq = {"damp": damp, "act_order": act_order}
        qV = gptq_matrix(Vtb, H, bits, group_size, **gptq) if H is not None else \
            QuantizedMatrix.quantize(Vtb, bits, group_size)
        Hz = None
        if H is not None:
            P = qV.dequantize() * S16.float()[:, None]  # (r, in): z = x P^T
            Hz = P @ H @ P.t()
        if u_groups == "out":
            qU = QuantizedMatrix.quantize(Ub.t().contiguous(), bits, group_size) if Hz is None else \
                QuantizedMatrix.from_codes(*gptq_quantize_transposed(Ub, Hz, bits, group_size, damp=damp), bits,
                                           group_size)
        else:
            qU = gptq_matrix(Ub, Hz, bits, group_size, **gptq) if Hz is not None else \
                QuantizedMatrix.quantize(Ub, bits, group_size)
        params |= qV.tensors(f"b{i}.V") | qU.tensors(f"b{i}.U")
    return params


def band_plan(ds: DeltaSet, s: CompressSettings, plan: tuple[Band, ...]) -> tuple[tuple[str, Ranks], ...]:
    """The ranks of each band per module shape, filling that shape's budget (tables included)."""
    return tuple((shape_key(o, i), plan_ranks(o, i, b, plan, s.group_size, s.u_groups))
                 for (o, i), b in sorted(ds.shape_budgets(s.ratio).items()))


MEASURE_RANK = 32  # leading triplets of one delta per shape on which q(b) is measured


def measured_errors(svd: tuple[Tensor, Tensor, Tensor], H: Tensor | None, s: CompressSettings) -> dict[int, float]:
    """q(b) for `compress.alloc`: the relative squared error of the leading MEASURE_RANK triplets of a delta (its thin
    SVD U, S, V^T) quantized at b bits as `quantize_factors` quantizes them, in the output space of H (in weight
    space without H)."""
    U, S, Vt = svd
    r = min(MEASURE_RANK, S.numel())
    svd_r = (U[:, :r], S[:r], Vt[:r])
    D = (svd_r[0] * svd_r[1]) @ svd_r[2]
    out = {}
    for bits in ALLOC_BITS:
        if bits == FP16_BITS:
            out[bits] = 0.0
            continue
        cfg = QLowRankConfig(targets=PROJECTIONS, bands=((shape_key(*D.shape), ((bits, r),)),),
                             group_size=s.group_size, u_groups=s.u_groups)
        p = quantize_factors(D, ((bits, r),), s.group_size, H, s.damp, s.act_order, s.u_groups, svd_r)
        E = get_kind("qlowrank").delta_weight(cfg, p, D) - D
        if H is None:
            out[bits] = float((E ** 2).sum() / (D ** 2).sum().clamp(min=1e-30))
        else:
            out[bits] = float(((E @ H) * E).sum() / ((D @ H) * D).sum().clamp(min=1e-30))
    return out


def allocated_plan(ds: DeltaSet, s: CompressSettings, hessians: dict | None,
                   svds: dict[tuple[int, str], tuple[Tensor, Tensor, Tensor]]) -> tuple[tuple[str, Ranks], ...]:
    """`--plan alloc`: bands per module ('OUTxIN@module', `alloc_per='matrix'`) or per module shape ('OUTxIN') from
    `compress.alloc` over the whole delta's budget."""
    if s.u_groups != "out":
        raise DeltafleetError(f"plan='alloc' needs u_groups='out' (its byte model), got {s.u_groups!r}")
    weights: dict[tuple[int, str], Tensor] = {}
    errors: dict[tuple[int, int], dict[int, float]] = {}
    for key, (U, S, Vt) in sorted(svds.items()):
        H = hessians.get(key) if hessians is not None else None
        o, i = U.shape[0], Vt.shape[1]
        scale = {"module": 1.0, "size": o * i / 1e6, "energy": None}[s.alloc_weight]
        weights[key] = vector_weights(S, Vt, H, scale)
        if (o, i) not in errors:  # q(b) measured on the first delta of each shape
            errors[(o, i)] = measured_errors((U, S, Vt), H, s)
    budget = sum(ds.budgets(s.ratio).values())
    if s.alloc_per == "matrix":
        keys = sorted(weights)
        shapes = [(svds[k][0].shape[0], svds[k][2].shape[1]) for k in keys]
        groups = [ShapeGroup(o, i, 1, weights[k], errors[(o, i)]) for k, (o, i) in zip(keys, shapes, strict=True)]
        plans = allocate_groups(groups, budget, s.group_size)
        return tuple((shape_key(o, i, module_name(*k)), ranks)
                     for k, (o, i), ranks in zip(keys, shapes, plans, strict=True))
    by_shape: dict[tuple[int, int], list[Tensor]] = {}
    for k, w in weights.items():
        by_shape.setdefault((svds[k][0].shape[0], svds[k][2].shape[1]), []).append(w)
    groups = [ShapeGroup(o, i, len(ws), torch.stack(ws).sum(0), errors[(o, i)])
              for (o, i), ws in sorted(by_shape.items())]
    plan = allocate(groups, budget, s.group_size)
    return tuple((shape_key(o, i), ranks) for (o, i), ranks in sorted(plan.items()))


class _SVDMethod(Method):
    @abstractmethod
    def plan(self, s: CompressSettings) -> tuple[Band, ...]:
        """The bands, highest bits first."""

    def compress(self, ds: DeltaSet, s: CompressSettings, ctx: Context) -> Adapter:
        svds = {}
        if s.plan == ALLOC_PLAN:  # every SVD first: the allocation reads all spectra
            svds = {k: torch.linalg.svd(d.float(), full_matrices=False) for k, d in ds.deltas.items()}
            bands = allocated_plan(ds, s, ctx.hessians, svds)
        else:
            bands = band_plan(ds, s, self.plan(s))
        cfg = QLowRankConfig(targets=PROJECTIONS, bands=bands, group_size=s.group_size, u_groups=s.u_groups)
        params = {}
        for (layer, proj), delta in ds.deltas.items():
            H = ctx.hessians.get((layer, proj)) if ctx.hessians is not None else None  # None: RTN (the embedding)
            ranks = cfg.ranks(*delta.shape, module_name(layer, proj))
            if ranks:  # else not even one vector fits the budget: the module is left out (delta dropped)
                params[(layer, proj)] = quantize_factors(delta, ranks, s.group_size, H, s.damp, s.act_order,
                                                         s.u_groups, svds.pop((layer, proj), None))
            ctx.tick()
        return Adapter(cfg, params)

    def module_budgets(self, ds: DeltaSet, s: CompressSettings, adapter: Adapter) -> dict[tuple[int, str], int]:
        """With `--plan alloc` a module's budget is what the allocation gave it (or its shape; the total is the whole
        delta's budget); else `DeltaSet.budgets`."""
        if s.plan != ALLOC_PLAN:
            return super().module_budgets(ds, s, adapter)
        cfg = adapter.config
        return {k: bands_bytes(*d.shape, cfg.ranks(*d.shape, module_name(*k)), s.group_size, s.u_groups)
                for k, d in ds.deltas.items()}


class DeltaCoMe(_SVDMethod):
    name = "delta-come"
    needs_calibration = staticmethod(lambda s: s.quantizer == "gptq")
    needs_hessians = staticmethod(lambda s: s.quantizer == "gptq")

    def plan(self, s: CompressSettings) -> tuple[Band, ...]:
        return resolve_plan(s.plan, s.ratio)


class LowRank(_SVDMethod):
    name = "lowrank"

    def plan(self, s: CompressSettings) -> tuple[Band, ...]:
        return (Band(FP16_BITS, None),)

    def compress(self, ds: DeltaSet, s: CompressSettings, ctx: Context) -> Adapter:
        # one fp16 band, whatever the plan (`alloc` and band plans are delta-come's)
        return super().compress(ds, replace(s, plan=AUTO_PLAN), ctx)


register_method(DeltaCoMe())
register_method(LowRank())
