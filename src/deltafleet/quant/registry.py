"""The registry of base-model quantizers (one entry per method: rtn, gptq, loftq, apiq).

A quantizer maps a full-precision `Transformer` (fp32, eval mode), a `QuantConfig` and calibration token windows
(N, T) (None for methods that need none) to the quantized matrix of every projection and, for methods that
initialise LoRA (LoftQ, ApiQ), the LoRA factors A (r, C), B (R, r) of every targeted projection, to be applied as
y += (alpha / r) x A^T B^T (peft's convention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import Tensor

from deltafleet.registry import Registry
from deltafleet.store.quantized import QuantizedMatrix

if TYPE_CHECKING:
    from deltafleet.models.llama import Transformer
    from deltafleet.quant.config import QuantConfig

ModuleKey = tuple[int, str]  # (layer, projection)


@dataclass
class QuantResult:
    matrices: dict[ModuleKey, QuantizedMatrix]
    lora: dict[ModuleKey, tuple[Tensor, Tensor]] | None = None  # (A (r, C), B (R, r)) fp32
    stats: dict[str, Any] = field(default_factory=dict)  # method diagnostics written to the manifest


@dataclass(frozen=True)
class Quantizer:
    name: str
    needs_calibration: bool
    makes_lora: bool
    run: Callable[[Transformer, QuantConfig, Tensor | None, Callable[[str], None]], QuantResult]
    description: str = ""


QUANTIZERS: Registry[Quantizer] = Registry("quantizer")


def register_quantizer(q: Quantizer) -> None:
    QUANTIZERS.register(q.name, q)
