"""LoRA math: y' = y + s * B (A x), dW = s * B A, with A (R, in), B (out, R), s = alpha/R (or alpha/sqrt R).
Served additive: slot A = A, B = s * B^T (R, out)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from deltafleet.adapters.lora.config import LoraConfig
from deltafleet.adapters.registry import AdapterKind, Params
from deltafleet.adapters.serving import ADDITIVE, ServingParams


def lora_apply(x: Tensor, y: Tensor, A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """x (..., in), y (..., out), A (R, in), B (out, R) -> y + s * (x A^T) B^T."""
    return y + (x @ A.t().to(x.dtype)) @ B.t().to(x.dtype) * scaling


def lora_delta_weight(A: Tensor, B: Tensor, scaling: float) -> Tensor:
    """(out, in) = s * B A, computed in fp32."""
    return (B.float() @ A.float()) * scaling


class LoraKind(AdapterKind):
    name = "lora"
    config_cls = LoraConfig
    param_names = ("A", "B")

    def param_shapes(self, cfg: LoraConfig, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        return {"A": (cfg.r, in_features), "B": (out_features, cfg.r)}

    def init_params(self, cfg: LoraConfig, out_features: int, in_features: int, *, identity: bool,
                    generator: torch.Generator) -> Params:
        A = torch.randn(cfg.r, in_features, generator=generator) / math.sqrt(in_features)
        B = (torch.zeros(out_features, cfg.r) if identity
             else torch.randn(out_features, cfg.r, generator=generator) / math.sqrt(cfg.r))
        return {"A": A, "B": B}

    def apply(self, cfg: LoraConfig, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return lora_apply(x, y, params["A"], params["B"], cfg.scaling)

    def delta_weight(self, cfg: LoraConfig, params: Params, weight: Tensor) -> Tensor:
        return lora_delta_weight(params["A"], params["B"], cfg.scaling)

    def serving_form(self, cfg: LoraConfig, params: Params) -> ServingParams:
        return ServingParams(ADDITIVE, cfg.r, {"A": params["A"].float(), "B": (params["B"].float() * cfg.scaling).t()})
