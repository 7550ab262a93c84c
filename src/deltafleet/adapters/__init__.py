"""Adapter kinds (one package each, registered in `registry.KINDS`), the `Adapter` container, and I/O.

Importing this package registers every built-in kind.
"""

from deltafleet.adapters import lora, lowrank, road  # noqa: F401  (registers the kinds)
from deltafleet.adapters.adapter import Adapter, merge_adapter, random_adapter, unmerge_adapter
from deltafleet.adapters.io import load_adapter, save_adapter
from deltafleet.adapters.lora import LoraConfig
from deltafleet.adapters.lowrank import LowRankConfig
from deltafleet.adapters.registry import KINDS, AdapterConfig, AdapterKind, get_kind
from deltafleet.adapters.road import RoadConfig

__all__ = [
    "KINDS", "Adapter", "AdapterConfig", "AdapterKind", "LoraConfig", "LowRankConfig", "RoadConfig",
    "get_kind", "load_adapter", "merge_adapter", "random_adapter", "save_adapter", "unmerge_adapter",
]
