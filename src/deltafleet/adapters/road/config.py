from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltafleet.adapters.registry import AdapterConfig

ROAD_VARIANTS = ("road_1", "road_2", "road_4")


@dataclass(frozen=True)
class RoadConfig(AdapterConfig):
    """variant: parameter sharing in each 2x2 block (road_1: one (alpha, theta) per pair; road_2: per row;
    road_4: independent). group_size: output dims are split into groups of G; element j pairs with j + G/2."""

    variant: str = "road_1"
    group_size: int = 64
    kind: ClassVar[str] = "road"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.variant not in ROAD_VARIANTS:
            raise ValueError(f"variant={self.variant!r}: must be one of {ROAD_VARIANTS}")
        if (not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size <= 0
                or self.group_size % 2):
            raise ValueError(f"group_size={self.group_size!r}: must be a positive even integer")

    @property
    def summary(self) -> str:
        return f"{self.variant} g={self.group_size}"

    def num_params(self, out_features: int) -> int:
        if out_features % self.group_size:
            raise ValueError(
                f"RoAd needs out_features % group_size == 0; got out_features={out_features}, "
                f"group_size={self.group_size}"
            )
        return {"road_1": out_features // 2, "road_2": out_features, "road_4": 2 * out_features}[self.variant]
