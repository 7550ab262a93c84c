from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from deltafleet.adapters.registry import AdapterConfig


@dataclass(frozen=True)
class LowRankConfig(AdapterConfig):
    """rank: number R of singular triplets kept per projection."""

    rank: int = 16
    kind: ClassVar[str] = "lowrank"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.rank, int) or isinstance(self.rank, bool) or self.rank <= 0:
            raise ValueError(f"rank={self.rank!r}: must be a positive integer")

    @property
    def summary(self) -> str:
        return f"rank={self.rank}"
