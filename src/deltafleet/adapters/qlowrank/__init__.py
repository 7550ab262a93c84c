"""qlowrank: a compressed full-fine-tune delta as bands of quantized singular vectors. Delta-CoMe (Ping et al.
2024, arXiv:2406.08903, Sec. 3) and plain truncated SVD (`deltafleet compress --method lowrank`) both produce it.

Per-projection band ranks depend on the projection's shape, so the config keys them by `OUTxIN`, and a module may
have its own plan (`OUTxIN@layers.3.q_proj`, per-matrix allocation); parameter shapes therefore depend on the
config, and `param_names` lists the base names only.
"""

from deltafleet.adapters.qlowrank.config import (
           BAND_BITS,
           FP16_BITS,
           U_GROUPS,
           QLowRankConfig,
           Ranks,
           key_shape,
           shape_key,
)
from deltafleet.adapters.qlowrank.functional import QLowRankKind, qlowrank_apply, qlowrank_factors, qlowrank_shape
from deltafleet.adapters.registry import register_kind

register_kind(QLowRankKind())

__all__ = ["BAND_BITS", "FP16_BITS", "U_GROUPS", "QLowRankConfig", "QLowRankKind", "Ranks", "qlowrank_apply",
           "qlowrank_factors", "qlowrank_shape", "key_shape", "shape_key"]
