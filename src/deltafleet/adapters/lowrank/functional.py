"""Low-rank delta math: y' = y + U (S * (V^T x)), dW = U diag(S) V^T; U (out, R), S (R,), V (in, R).
Served additive: slot A = (V diag(S))^T (R, in), B = U^T (R, out)."""

from __future__ import annotations

import torch
from torch import Tensor

from deltafleet.adapters.lowrank.config import LowRankConfig
from deltafleet.adapters.registry import AdapterKind, Params
from deltafleet.adapters.serving import ADDITIVE, ServingParams


def lowrank_apply(x: Tensor, y: Tensor, U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """x (..., in), y (..., out) -> y + ((x V) * S) U^T."""
    return y + ((x @ V.to(x.dtype)) * S.to(x.dtype)) @ U.t().to(x.dtype)


def lowrank_delta_weight(U: Tensor, S: Tensor, V: Tensor) -> Tensor:
    """(out, in) in fp32."""
    return (U.float() * S.float()) @ V.float().t()


class LowRankKind(AdapterKind):
    name = "lowrank"
    config_cls = LowRankConfig
    param_names = ("U", "S", "V")

    def param_shapes(self, cfg: LowRankConfig, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return {"U": (out_features, cfg.rank), "S": (cfg.rank,), "V": (in_features, cfg.rank)}

    def init_params(self, cfg: LowRankConfig, out_features: int, in_features: int, *, identity: bool,
                    generator: torch.Generator) -> Params:
        U, _ = torch.linalg.qr(torch.randn(out_features, cfg.rank, generator=generator))
        V, _ = torch.linalg.qr(torch.randn(in_features, cfg.rank, generator=generator))
        S = torch.zeros(cfg.rank) if identity else torch.rand(cfg.rank, generator=generator).sort(
            descending=True).values * 0.5
        return {"U": U, "S": S, "V": V}

    def apply(self, cfg: LowRankConfig, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return lowrank_apply(x, y, params["U"], params["S"], params["V"])

    def delta_weight(self, cfg: LowRankConfig, params: Params, weight: Tensor) -> Tensor:
        return lowrank_delta_weight(params["U"], params["S"], params["V"])

    def serving_form(self, cfg: LowRankConfig, params: Params) -> ServingParams:
        return ServingParams(ADDITIVE, cfg.rank, {"A": (params["V"].float() * params["S"].float()).t(),
                                                  "B": params["U"].float().t()})
