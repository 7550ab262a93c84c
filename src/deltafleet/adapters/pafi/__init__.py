"""PaFi: sparse fine-tuning on a data-free magnitude mask shared by every tenant (Liao et al., ACL 2023,
arXiv 2305.16742); one kind (`pafi`), its shared mask (`mask`) and its tenant format (`io`)."""

from deltafleet.adapters.pafi.functional import (
    PafiConfig,
    PafiKind,
    magnitude_mask,
    mask_nnz,
    sparse_apply,
)
from deltafleet.adapters.registry import register_kind

register_kind(PafiKind())

__all__ = ["PafiConfig", "PafiKind", "magnitude_mask", "mask_nnz", "sparse_apply"]
