"""Low-rank delta: dW = U diag(S) V^T. The serving form of compressed full fine-tunes (truncated SVD of the
delta, e.g. Delta-CoMe, Ping et al. 2024, arXiv:2406.08903, Sec. 3, with quantized singular vectors)."""

from deltafleet.adapters.lowrank.config import LowRankConfig
from deltafleet.adapters.lowrank.functional import LowRankKind
from deltafleet.adapters.registry import register_kind

register_kind(LowRankKind())

__all__ = ["LowRankConfig", "LowRankKind"]
