"""RoAd math as pure functions.

For output y (..., out) split into groups of G, with h = G/2, element j of a group pairs with j + h:

    y'_j     = c_j     * y_j     - s_j     * y_{j+h}
    y'_{j+h} = c_{j+h} * y_{j+h} + s_{j+h} * y_j

i.e. y' = y * c + rotate_half(y) * s with c = alpha cos(theta), s = alpha sin(theta) expanded to (out,) per
variant. A batch mixing many RoAd adapters therefore needs only a gather of each row's (c, s) and element-wise
work. Merged: W' = R W, b' = R b with R the block-rotation (out, out), applied column-wise without forming R.
Unmerge applies R^-1, which is again of this form: each 2x2 block [[c_j, -s_j], [s_k, c_k]] (k = j + h)
inverts in closed form (R is not orthogonal when alpha != 1, so this is an inverse, not a transpose).
Served element-wise: a slot holds (c, s), width G.
"""

from __future__ import annotations

import torch
from torch import Tensor

from deltafleet.adapters.registry import AdapterKind, Params
from deltafleet.adapters.road.config import RoadConfig
from deltafleet.adapters.serving import ELEMENTWISE, ServingParams


def road_cols(variant: str, group_size: int, theta: Tensor, alpha: Tensor) -> tuple[Tensor, Tensor]:
    """(theta, alpha) as stored -> (c, s), each (out,)."""
    h = group_size // 2
    if variant == "road_1":  # one angle per pair: the h parameters of a group serve both halves
        theta = theta.reshape(-1, 1, h).expand(-1, 2, h).reshape(-1)
        alpha = alpha.reshape(-1, 1, h).expand(-1, 2, h).reshape(-1)
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_2":
        return alpha * theta.cos(), alpha * theta.sin()
    if variant == "road_4":  # per group: G params for the cos column, then G for the sin column
        theta = theta.reshape(-1, 2, group_size)
        alpha = alpha.reshape(-1, 2, group_size)
        return (alpha[:, 0] * theta[:, 0].cos()).reshape(-1), (alpha[:, 1] * theta[:, 1].sin()).reshape(-1)
    raise ValueError(f"variant={variant!r}: must be road_1, road_2 or road_4")


def rotate_half_grouped(y: Tensor, group_size: int) -> Tensor:
    """y (..., out) -> per group [-y[h:], y[:h]]."""
    g = y.unflatten(-1, (-1, 2, group_size // 2))
    return torch.stack((-g[..., 1, :], g[..., 0, :]), dim=-2).flatten(-3)


def road_apply(y: Tensor, c: Tensor, s: Tensor, group_size: int) -> Tensor:
    """y (..., out), c and s broadcastable to y -> R y."""
    return y * c + rotate_half_grouped(y, group_size) * s


def swap_halves(v: Tensor, group_size: int) -> Tensor:
    """v (out,) -> per group [v[h:], v[:h]]: each element's partner."""
    return v.unflatten(-1, (-1, 2, group_size // 2)).flip(-2).flatten(-3)


def road_inverse_cols(c: Tensor, s: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(c, s) of R^-1: for block [[c_j, -s_j], [s_k, c_k]], det = c_j c_k + s_j s_k."""
    det = c * swap_halves(c, group_size) + s * swap_halves(s, group_size)
    return swap_halves(c, group_size) / det, -s / det


def road_left_multiply(W: Tensor, c: Tensor, s: Tensor, group_size: int) -> Tensor:
    """R W for W (out, ...) in fp32, without forming R (out, out)."""
    Wt = W.float().movedim(0, -1)
    return road_apply(Wt, c, s, group_size).movedim(-1, 0)


def road_matrix(variant: str, group_size: int, theta: Tensor, alpha: Tensor) -> Tensor:
    """R (out, out) in fp32 such that road_apply(y) == y @ R^T (for tests and inspection)."""
    c, s = road_cols(variant, group_size, theta.float(), alpha.float())
    return road_left_multiply(torch.eye(c.shape[0]), c, s, group_size)


class RoadKind(AdapterKind):
    name = "road"
    config_cls = RoadConfig
    param_names = ("theta", "alpha")

    def param_shapes(self, cfg: RoadConfig, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        n = cfg.num_params(out_features)
        return {"theta": (n,), "alpha": (n,)}

    def init_params(self, cfg: RoadConfig, out_features: int, in_features: int, *, identity: bool,
                    generator: torch.Generator) -> Params:
        n = cfg.num_params(out_features)
        if identity:
            return {"theta": torch.zeros(n), "alpha": torch.ones(n)}
        # Angles of ~0.2 rad and scales near 1 keep every 2x2 block well-conditioned (unmerge inverts them);
        # wider draws (peft's init_weights=False) can make a block nearly singular.
        return {"theta": torch.randn(n, generator=generator) * 0.2,
                "alpha": 1.0 + torch.randn(n, generator=generator) * 0.1}

    def apply(self, cfg: RoadConfig, params: Params, x: Tensor, y: Tensor) -> Tensor:
        c, s = road_cols(cfg.variant, cfg.group_size, params["theta"], params["alpha"])
        return road_apply(y, c.to(y.dtype), s.to(y.dtype), cfg.group_size)

    def _cols(self, cfg: RoadConfig, params: Params) -> tuple[Tensor, Tensor]:
        return road_cols(cfg.variant, cfg.group_size, params["theta"].float(), params["alpha"].float())

    def delta_weight(self, cfg: RoadConfig, params: Params, weight: Tensor) -> Tensor:
        return road_left_multiply(weight, *self._cols(cfg, params), cfg.group_size) - weight.float()

    def merge(self, cfg: RoadConfig, params: Params, weight: Tensor,
              bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return self._left_multiply(weight, bias, *self._cols(cfg, params), cfg.group_size)

    def unmerge(self, cfg: RoadConfig, params: Params, weight: Tensor,
                bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        c, s = road_inverse_cols(*self._cols(cfg, params), cfg.group_size)
        return self._left_multiply(weight, bias, c, s, cfg.group_size)

    def serving_form(self, cfg: RoadConfig, params: Params) -> ServingParams:
        c, s = self._cols(cfg, params)
        return ServingParams(ELEMENTWISE, cfg.group_size, {"c": c, "s": s})

    @staticmethod
    def _left_multiply(weight, bias, c, s, group_size):
        new_w = road_left_multiply(weight, c, s, group_size).to(weight.dtype)
        new_b = None if bias is None else road_left_multiply(bias, c, s, group_size).to(bias.dtype)
        return new_w, new_b
