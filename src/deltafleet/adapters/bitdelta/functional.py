"""BitDelta: dW = alpha * sign(Delta) (Liu et al. 2024, arXiv:2402.10193, Sec. 3.1), signs packed 8 per byte
(bit 1: +1, bit 0: -1), one fp16 alpha per matrix."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from deltafleet.adapters.registry import AdapterConfig, AdapterKind
from deltafleet.store.quantized import pack_codes, packed_nbytes, unpack_codes


@dataclass(frozen=True)
class BitDeltaConfig(AdapterConfig):
    kind: ClassVar[str] = "bitdelta"


def bitdelta_signs(packed: Tensor, out_f: int, in_f: int) -> Tensor:
    """uint8 packed bits -> signs (out, in) in {-1, +1} fp32."""
    return unpack_codes(packed.to(torch.uint8), 1, out_f * in_f).reshape(out_f, in_f).float() * 2 - 1


def pack_signs(delta: Tensor) -> Tensor:
    """delta (out, in) -> uint8 (ceil(out * in / 8),): bit 1 where delta >= 0."""
    return pack_codes((delta >= 0).to(torch.uint8), 1)


class BitDeltaKind(AdapterKind):
    name = "bitdelta"
    config_cls = BitDeltaConfig
    param_names = ("signs", "scale")

    def param_shapes(self, cfg, out_features, in_features):
        return {"signs": (packed_nbytes(out_features * in_features, 1),), "scale": (1,)}

    def init_params(self, cfg, out_features, in_features, *, identity, generator):
        d = torch.randn(out_features, in_features, generator=generator)
        return {"signs": pack_signs(d), "scale": torch.tensor([0.0 if identity else 0.01]).half()}

    def apply(self, cfg, params, x, y):  # reference only: bitdelta is not served (dense signs)
        dW = self.delta_weight(cfg, params, torch.empty(y.shape[-1], x.shape[-1]))
        return y + x @ dW.t().to(x.dtype)

    def delta_weight(self, cfg, params, weight):
        return bitdelta_signs(params["signs"], *weight.shape) * params["scale"].float()
