"""Delta compression of full fine-tunes: Delta-CoMe, BitDelta, low-rank truncation and DARE.

Importing this package registers the adapter kinds of compressed deltas (`kinds`), the methods (`methods`) and
the artifact loader (`artifact`, the `deltafleet-delta` format of `adapters.io`).
"""

from deltafleet.compress import kinds  # noqa: F401  (registers the adapter kinds)
from deltafleet.compress.artifact import FORMAT, load_compressed, load_extras, save_compressed
from deltafleet.compress.delta import DeltaSet, extract_deltas
from deltafleet.compress.methods import METHODS, CompressSettings
from deltafleet.compress.pipeline import Compressed, compress_deltas

__all__ = ["FORMAT", "METHODS", "CompressSettings", "Compressed", "DeltaSet", "compress_deltas", "extract_deltas",
           "load_compressed", "load_extras", "save_compressed"]
