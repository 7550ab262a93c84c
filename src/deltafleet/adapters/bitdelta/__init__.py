"""BitDelta (Liu et al. 2024, arXiv:2402.10193): a 1-bit full-fine-tune delta, merge-only."""

from deltafleet.adapters.bitdelta.functional import BitDeltaConfig, BitDeltaKind, bitdelta_signs, pack_signs
from deltafleet.adapters.registry import register_kind

register_kind(BitDeltaKind())

__all__ = ["BitDeltaConfig", "BitDeltaKind", "bitdelta_signs", "pack_signs"]
