from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from deltafleet.adapters.registry import AdapterConfig


@dataclass(frozen=True)
class LoraConfig(AdapterConfig):
    """r: rank R; alpha: scale numerator; use_rslora: scale alpha/sqrt(r) instead of alpha/r."""

    r: int = 8
    alpha: float = 16.0
    use_rslora: bool = False
    kind: ClassVar[str] = "lora"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"r={self.r!r}: LoRA rank must be a positive integer")
        if (not isinstance(self.alpha, int | float) or isinstance(self.alpha, bool) or self.alpha <= 0
                or not math.isfinite(self.alpha)):
            raise ValueError(f"alpha={self.alpha!r}: must be a finite number > 0")
        if not isinstance(self.use_rslora, bool):
            raise ValueError(f"use_rslora={self.use_rslora!r}: must be true or false")

    @property
    def summary(self) -> str:
        return f"r={self.r}" + (" rslora" if self.use_rslora else "")

    @property
    def scaling(self) -> float:
        return self.alpha / (math.sqrt(self.r) if self.use_rslora else self.r)
