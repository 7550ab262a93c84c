"""Delta compression of full fine-tunes: Delta-CoMe, BitDelta, low-rank truncation and DARE.

Importing this package registers the compression methods (`methods`). The adapter kinds the methods produce
(qlowrank, bitdelta, sparse) and the artifact format live in `deltafleet.adapters`.
"""

from deltafleet.adapters.delta_format import FORMAT, load_compressed, load_extras
from deltafleet.compress.artifact import save_compressed
from deltafleet.compress.delta import DeltaSet, extract_deltas
from deltafleet.compress.methods import METHODS, CompressSettings
from deltafleet.compress.pipeline import Compressed, compress_deltas

__all__ = ["FORMAT", "METHODS", "CompressSettings", "Compressed", "DeltaSet", "compress_deltas", "extract_deltas",
           "load_compressed", "load_extras", "save_compressed"]
