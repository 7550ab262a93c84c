"""The registry of base-model quantizers (one entry per method: rtn, gptq, loftq, apiq).

A quantizer maps a full-precision `Transformer` (fp32, eval mode), a `QuantConfig` and calibration token windows
(N, T) (None for methods that need none) to the quantized matrix of every projection and, for methods that
initialise LoRA (LoftQ, ApiQ), the LoRA factors A (r, C), B (R, r) of every targeted projection, to be applied as
y += (alpha / r) x A^T B^T (peft's convention).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import Tensor

from deltafleet.registry import Registry
from deltafleet.store.quantized import QuantizedMatrix
from deltafleet.store.signs import SignMatrix

if TYPE_CHECKING:
    from deltafleet.models.llama import Transformer
    from deltafleet.quant.config import QuantConfig

ModuleKey = tuple[int, str]  # (layer, projection)


@dataclass
class QuantResult:
    matrices: dict[ModuleKey, QuantizedMatrix | SignMatrix]
    lora: dict[ModuleKey, tuple[Tensor, Tensor]] | None = None  # (A (r, C), B (R, r)) fp32
    stats: dict[str, Any] = field(default_factory=dict)  # method diagnostics written to the manifest


@dataclass(frozen=True)
class RunContext:
    """Where a long quantizer run may keep its checkpoints (`workdir`, None: nowhere), whether it resumes from
    them, and whether it draws a progress bar."""

    workdir: Path | None = None
    resume: bool = False
    show_progress: bool = True


@dataclass(frozen=True)
class Quantizer:
    """`bits`: the widths it accepts (the first is the default); `codec`: the stored matrix form it writes,
    'affine' (`store.quantized.QuantizedMatrix`) or 'sign' (`store.signs.SignMatrix`)."""

    name: str
    needs_calibration: bool
    makes_lora: bool
    run: Callable[[Transformer, QuantConfig, Tensor | None, Callable[[str], None], RunContext], QuantResult]
    description: str = ""
    bits: tuple[int, ...] = (4, 2, 3, 8)
    codec: str = "affine"


QUANTIZERS: Registry[Quantizer] = Registry("quantizer")


def register_quantizer(q: Quantizer) -> None:
    QUANTIZERS.register(q.name, q)
