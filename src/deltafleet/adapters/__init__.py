"""Adapter kinds (one package each, registered in `registry.KINDS`), the `Adapter` container, and I/O.

Importing this package registers every built-in kind (LoRA, RoAd, low-rank, and the compressed full-fine-tune
kinds qlowrank, bitdelta, sparse; PaFi, HiWi) and the `deltafleet-delta`, `-pafi` and `-hiwi` formats.
"""

from deltafleet.adapters import bitdelta, hiwi, lora, lowrank, pafi, qlowrank, road, sparse  # noqa: F401  (kinds)
from deltafleet.adapters.adapter import Adapter, merge_adapter, random_adapter, unmerge_adapter
from deltafleet.adapters.delta_format import FORMAT as DELTA_FORMAT
from deltafleet.adapters.delta_format import load_compressed, save_adapter_artifact
from deltafleet.adapters.hiwi.io import FORMAT as HIWI_FORMAT
from deltafleet.adapters.hiwi.io import load_hiwi, save_hiwi
from deltafleet.adapters.io import load_adapter, register_format, save_adapter
from deltafleet.adapters.lora import LoraConfig
from deltafleet.adapters.lowrank import LowRankConfig
from deltafleet.adapters.pafi.io import FORMAT as PAFI_FORMAT
from deltafleet.adapters.pafi.io import load_pafi, save_pafi
from deltafleet.adapters.registry import KINDS, AdapterConfig, AdapterKind, get_kind
from deltafleet.adapters.road import RoadConfig

register_format(DELTA_FORMAT, load_compressed, kinds=("qlowrank", "bitdelta", "sparse"), saver=save_adapter_artifact)
register_format(PAFI_FORMAT, load_pafi, kinds=("pafi",), saver=save_pafi)
register_format(HIWI_FORMAT, load_hiwi, kinds=("hiwi",), saver=save_hiwi)

__all__ = [
    "KINDS", "Adapter", "AdapterConfig", "AdapterKind", "LoraConfig", "LowRankConfig", "RoadConfig",
    "get_kind", "load_adapter", "merge_adapter", "random_adapter", "save_adapter", "unmerge_adapter",
]
