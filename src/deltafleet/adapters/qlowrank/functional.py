"""qlowrank math: dW = sum over bands of U_b diag(S_b) V_b^T, with V_b^T (r_b, in) and U_b (out, r_b) quantized to
the band's bit width (group-wise, `store.quantized`), or kept in fp16 for 16-bit bands; S_b (r_b,) fp16.
Applied to activations right to left, y' = y + U (S * (V^T x)), so it is served without a dense matrix: additive,
slot A = diag(S) V^T (R, in), B = U^T (R, out) over all bands, dequantized only when written into a slot (compact);
or, with U stored grouped along out, quantized as stored (`quantized_form`, the qadditive family: each band's codes
are the slot's rows, S folded into A's group scales).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

from deltafleet.adapters.qadditive import QADDITIVE, QBITS, QRows, pack_module
from deltafleet.adapters.qlowrank.config import FP16_BITS, QLowRankConfig, Ranks, key_shape, shape_key
from deltafleet.adapters.registry import AdapterKind, Params
from deltafleet.adapters.serving import ADDITIVE, ServingParams
from deltafleet.store.quantized import QuantizedMatrix, num_groups, packed_nbytes


def _band_shapes(out_f: int, in_f: int, bits: int, r: int, G: int, i: int,
                 u_shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    if bits == FP16_BITS:
        return {f"b{i}.V": (r, in_f), f"b{i}.U": (out_f, r), f"b{i}.S": (r,)}
    shapes = {f"b{i}.S": (r,)}
    for name, (R, C) in (("V", (r, in_f)), ("U", u_shape)):
        shapes |= {f"b{i}.{name}.qcodes": (packed_nbytes(R * C, bits),), f"b{i}.{name}.qscale": (R, num_groups(C, G)),
                   f"b{i}.{name}.qzero": (R, num_groups(C, G))}
    return shapes


def qlowrank_shape(cfg: QLowRankConfig, params: Params) -> tuple[int, int]:
    """(out, in) of a module: the one shape in `cfg.bands` whose parameter shapes are exactly those of `params`."""
    return qlowrank_plan(cfg, params)[:2]


def qlowrank_plan(cfg: QLowRankConfig, params: Params) -> tuple[int, int, Ranks]:
    """(out, in, bands) of a module: the one plan of `cfg.bands` (a shape's, or a module's own) whose parameter
    shapes are exactly those of `params` (the parameters determine the plan: ranks are the S lengths, bits the code
    sizes)."""
    got = tuple(sorted((n, tuple(t.shape)) for n, t in params.items()))
    hits = _plans_by_signature(cfg).get(got, ())
    if len(hits) != 1:
        raise ValueError(f"qlowrank parameters {sorted(n for n, _ in got)} match {len(hits)} projection shapes of the "
                         f"band plan; expected exactly one")
    return next(iter(hits))


@lru_cache(maxsize=256)
def _param_shapes(cfg: QLowRankConfig, out_f: int, in_f: int,
                  module: str | None = None) -> tuple[tuple[str, tuple[int, ...]], ...]:
    return _plan_shapes(cfg, out_f, in_f, cfg.ranks(out_f, in_f, module))


def _plan_shapes(cfg: QLowRankConfig, out_f: int, in_f: int, ranks: Ranks) -> tuple[tuple[str, tuple[int, ...]], ...]:
    shapes: dict[str, tuple[int, ...]] = {}
    for i, (bits, r) in enumerate(ranks):
        shapes |= _band_shapes(out_f, in_f, bits, r, cfg.group_size, i, cfg.stored_u_shape(out_f, r))
    return tuple(shapes.items())


@lru_cache(maxsize=64)
def _plans_by_signature(cfg: QLowRankConfig) -> dict[tuple, frozenset[tuple[int, int, Ranks]]]:
    """Each band plan's parameter shapes (sorted) -> the (out, in, bands) that have them (a load asks per module;
    computed once per config)."""
    out: dict[tuple, set] = {}
    for key, ranks in cfg.bands:
        out_f, in_f = key_shape(key)
        out.setdefault(tuple(sorted(_plan_shapes(cfg, out_f, in_f, ranks))), set()).add((out_f, in_f, ranks))
    return {k: frozenset(v) for k, v in out.items()}


def _stored(params: Params, prefix: str) -> Params:
    """The quantized tensors in their stored dtypes (`Adapter.to(dtype)` casts every tensor; integer codes and
    zero points below 256 survive any float dtype exactly)."""
    dtypes = {"qcodes": torch.uint8, "qscale": torch.float16, "qzero": torch.uint8}
    return {f"{prefix}.{n}": params[f"{prefix}.{n}"].to(dt) for n, dt in dtypes.items() if f"{prefix}.{n}" in params}


def qlowrank_factors(cfg: QLowRankConfig, params: Params, out_f: int,
                     in_f: int) -> tuple[Tensor, Tensor, Tensor]:
    """Dequantized U (out, R), S (R,), V^T (R, in) in fp32, bands concatenated (R = total rank)."""
    Us, Ss, Vts = [], [], []
    for i, (bits, r) in enumerate(_ranks(cfg, params, out_f, in_f)):
        if bits == FP16_BITS:
            Vt, U = params[f"b{i}.V"].float(), params[f"b{i}.U"].float()
        else:
            Vt = QuantizedMatrix.from_tensors(_stored(params, f"b{i}.V"), f"b{i}.V", (r, in_f), bits,
                                              cfg.group_size).dequantize()
            U = QuantizedMatrix.from_tensors(_stored(params, f"b{i}.U"), f"b{i}.U", cfg.stored_u_shape(out_f, r),
                                             bits, cfg.group_size).dequantize()
            U = U if cfg.u_groups == "rank" else U.t()
        Us.append(U)
        Ss.append(params[f"b{i}.S"].float())
        Vts.append(Vt)
    return torch.cat(Us, 1), torch.cat(Ss), torch.cat(Vts, 0)


def _rows(params: Params, prefix: str, bits: int, r: int, columns: int, group: int, row_scale: Tensor) -> QRows:
    """One band of A (V^T, rows scaled by S) or of B (U^T) as qadditive rows."""
    if bits == FP16_BITS:
        data = params[prefix].to(torch.float16).contiguous().view(torch.uint8).reshape(-1)
        scale = row_scale[:, None].expand(r, -(-columns // group)).contiguous()
        return QRows(bits, data, scale, torch.zeros_like(scale))
    t = _stored(params, prefix)
    scale = t[f"{prefix}.qscale"].float() * row_scale[:, None]
    return QRows(bits, t[f"{prefix}.qcodes"], scale, -t[f"{prefix}.qzero"].float() * scale)


def qlowrank_quantized(cfg: QLowRankConfig, params: Params, out_f: int, in_f: int,
                       ranks: Ranks | None = None) -> dict[str, Tensor] | None:
    """The qadditive slot tensors of one module (`adapters.qadditive`), or None when the layout does not allow it:
    U grouped along the rank, or a row that is not a whole number of bytes. `ranks`: the module's bands when the
    caller has them (`qlowrank_plan`), else found from `params`."""
    bands = _ranks(cfg, params, out_f, in_f) if ranks is None else ranks
    if cfg.u_groups != "out" or any(b not in QBITS or (in_f * b) % 8 or (out_f * b) % 8 for b, _ in bands):
        return None
    a, b = [], []
    for i, (bits, r) in enumerate(bands):
        S = params[f"b{i}.S"].float()
        if bits == FP16_BITS:  # U (out, r) stored as is: its rows are U^T's
            params = {**params, f"b{i}.Ut": params[f"b{i}.U"].t()}
        a.append(_rows(params, f"b{i}.V", bits, r, in_f, cfg.group_size, S))
        b.append(_rows(params, f"b{i}.Ut" if bits == FP16_BITS else f"b{i}.U", bits, r, out_f, cfg.group_size,
                       torch.ones(r)))
    return pack_module(a, b, in_f, out_f)


def _ranks(cfg: QLowRankConfig, params: Params, out_f: int, in_f: int) -> Ranks:
    """The bands of a module of shape (out, in) with these parameters (its own plan, or its shape's)."""
    o, i, ranks = qlowrank_plan(cfg, params)
    if (o, i) != (out_f, in_f):
        raise ValueError(f"qlowrank parameters of a {shape_key(o, i)} projection given for a "
                         f"{shape_key(out_f, in_f)} one")
    return ranks


def qlowrank_apply(x: Tensor, y: Tensor, U: Tensor, S: Tensor, Vt: Tensor) -> Tensor:
    """x (..., in), y (..., out) -> y + ((x Vt^T) * S) U^T = y + U (S * (Vt x)), never forming (out, in)."""
    return y + ((x @ Vt.t().to(x.dtype)) * S.to(x.dtype)) @ U.t().to(x.dtype)


class QLowRankKind(AdapterKind):
    name = "qlowrank"
    config_cls = QLowRankConfig
    param_names = ("S", "U", "V")  # per band b{i}.{name}[.qcodes|.qscale|.qzero]; see param_shapes
    compact = True

    def param_shapes(self, cfg: QLowRankConfig, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return dict(_param_shapes(cfg, out_features, in_features))

    def module_param_shapes(self, cfg: QLowRankConfig, out_features: int, in_features: int,
                            module: str) -> dict[str, tuple[int, ...]]:
        return dict(_param_shapes(cfg, out_features, in_features, module))

    def init_params(self, cfg: QLowRankConfig, out_features: int, in_features: int, *, identity: bool,
                    generator: torch.Generator) -> Params:
        params: Params = {}
        for i, (bits, r) in enumerate(cfg.ranks(out_features, in_features)):
            Vt = torch.linalg.qr(torch.randn(in_features, r, generator=generator))[0].t()
            U = torch.linalg.qr(torch.randn(out_features, r, generator=generator))[0]
            S = torch.zeros(r) if identity else torch.rand(r, generator=generator) * 0.5
            params[f"b{i}.S"] = S.half()
            if bits == FP16_BITS:
                params |= {f"b{i}.V": Vt.half(), f"b{i}.U": U.half()}
            else:
                params |= QuantizedMatrix.quantize(Vt, bits, cfg.group_size).tensors(f"b{i}.V")
                Us = U if cfg.u_groups == "rank" else U.t().contiguous()
                params |= QuantizedMatrix.quantize(Us, bits, cfg.group_size).tensors(f"b{i}.U")
        return params

    def apply(self, cfg: QLowRankConfig, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return qlowrank_apply(x, y, *qlowrank_factors(cfg, params, y.shape[-1], x.shape[-1]))

    def delta_weight(self, cfg: QLowRankConfig, params: Params, weight: Tensor) -> Tensor:
        U, S, Vt = qlowrank_factors(cfg, params, *weight.shape)
        return (U * S) @ Vt

    def serving_form(self, cfg: QLowRankConfig, params: Params) -> ServingParams:
        U, S, Vt = qlowrank_factors(cfg, params, *qlowrank_shape(cfg, params))
        return ServingParams(ADDITIVE, S.numel(), {"A": Vt * S[:, None], "B": U.t()})

    def quantized_form(self, cfg: QLowRankConfig, params: Params) -> ServingParams | None:
        out_f, in_f, ranks = qlowrank_plan(cfg, params)
        tensors = qlowrank_quantized(cfg, params, out_f, in_f, ranks)
        if tensors is None:
            return None
        return ServingParams(QADDITIVE, int(tensors["bits"].numel()), tensors, group=cfg.group_size)

    def check_serving(self, cfg: QLowRankConfig, params: Params) -> None:
        """The stored tensors rebuild (shapes, dtypes, zero points in range: `QuantizedMatrix.from_tensors`); once
        they do, dequantizing them cannot fail, so the factors are not built here (a third of a load's time)."""
        out_f, in_f, ranks = qlowrank_plan(cfg, params)
        for i, (bits, r) in enumerate(ranks):
            if bits != FP16_BITS:
                QuantizedMatrix.from_tensors(_stored(params, f"b{i}.V"), f"b{i}.V", (r, in_f), bits, cfg.group_size)
                QuantizedMatrix.from_tensors(_stored(params, f"b{i}.U"), f"b{i}.U", cfg.stored_u_shape(out_f, r),
                                             bits, cfg.group_size)

    def config_from_dict(self, d: dict[str, Any]) -> QLowRankConfig:
        bands = tuple((str(k), tuple((int(b), int(r)) for b, r in v)) for k, v in dict(d["bands"]).items())
        return QLowRankConfig(targets=tuple(d["targets"]), group_size=int(d["group_size"]), bands=bands,
                              u_groups=str(d.get("u_groups", "rank")))
