"""Sparse (CSR) full-fine-tune deltas, as DARE produces them; merge-only."""

from deltafleet.adapters.registry import register_kind
from deltafleet.adapters.sparse.functional import SparseConfig, SparseKind, index_bytes, index_dtype, sparse_dense

register_kind(SparseKind())

__all__ = ["SparseConfig", "SparseKind", "index_bytes", "index_dtype", "sparse_dense"]
