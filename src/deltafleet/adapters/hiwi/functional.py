"""HiWi math as pure functions: a tenant is a change of the RMSNorm gains, computed once from an adapter.

HiWi (Liao, Meng & Monz, ACL 2023, "Parameter-Efficient Fine-Tuning without Introducing New Latency", arXiv
2305.16742, Sec. 3.2) applies an adapter to pretrained *parameters* instead of hidden states, then stores the
adapted parameters, so inference costs what the base costs; the paper's 0.03% storage is the bias form. A Llama
has no biases; its vector-shaped parameters are the RMSNorm gains g (H,), two per decoder layer (0.026% of
SmolLM2's parameters). Training (`train.hiwi`) maps each gain through a bottleneck adapter shared by the norms of
one kind, g' = g + U silu(D g + c) + e; a tenant stores only delta = g' - g per norm (fp16).

One norm's parameters:
    delta (H,)        the gain change; norm output y = g * n becomes (g + delta) * n, n = x * rsqrt(mean(x^2) + eps)

    apply(n, y) = y + n * delta     (the model passes n, the normalised input, as the hook's x for norms)

Served in the `norm` family: a pool keeps per-slot delta rows per norm; the base's and other pools' tokens read
the pool's null row (zeros) and are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from deltafleet.adapters.registry import AdapterConfig, AdapterKind, Params
from deltafleet.adapters.serving import NORM, ServingParams
from deltafleet.models.config import NORMS


@dataclass(frozen=True)
class HiwiConfig(AdapterConfig):
    """targets: which of a decoder layer's norms (`NORMS`) the tenant changes."""

    targets: tuple[str, ...] = NORMS
    kind: ClassVar[str] = "hiwi"

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: must name at least one norm")
        unknown = [t for t in self.targets if t not in NORMS]
        if unknown:
            raise ValueError(f"targets: unknown norm {unknown[0]!r}; must be among {NORMS}")

    @property
    def summary(self) -> str:
        return f"{len(self.targets)} norm(s) per layer"


def apply_gain_delta(n: Tensor, y: Tensor, delta: Tensor) -> Tensor:
    """n, y (..., H), delta (H,) -> y + n * delta."""
    return torch.addcmul(y, n, delta.to(y.dtype))


class HiwiKind(AdapterKind):
    name = "hiwi"
    config_cls = HiwiConfig
    param_names = ("delta",)

    def param_shapes(self, cfg, out_features, in_features):
        return {"delta": (out_features,)}

    def init_params(self, cfg, out_features, in_features, *, identity, generator):
        delta = torch.zeros(out_features) if identity else torch.randn(out_features, generator=generator) * 0.05
        return {"delta": delta}

    def apply(self, cfg, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return apply_gain_delta(x, y, params["delta"])

    def delta_weight(self, cfg, params: Params, weight: Tensor) -> Tensor:
        return params["delta"].to(weight.dtype)

    def serving_form(self, cfg, params: Params) -> ServingParams:
        return ServingParams(NORM, 1, {"delta": params["delta"].float()})

    def config_from_dict(self, d: dict[str, Any]) -> HiwiConfig:
        return HiwiConfig(targets=tuple(d["targets"]))
