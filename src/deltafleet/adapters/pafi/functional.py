"""PaFi math as pure functions: a sparse additive delta whose pattern is a function of the base alone.

PaFi (Liao, Meng & Monz, ACL 2023, "Parameter-Efficient Fine-Tuning without Introducing New Latency",
arXiv 2305.16742, Sec. 3.1): one task-agnostic mask, chosen without data from the smallest-magnitude pretrained
parameters, shared by every task. Here the mask is chosen per target projection (each projection trains the same
fraction `density` of its entries; the paper's ranking is over the whole model, which would let a few
small-valued matrices take most of the budget and make per-projection serving cost uneven). Ties in |W| break by
position (a stable sort), so the mask is a deterministic function of (base weights, density).

One projection's parameters:
    values  (nnz,)     the trained delta entries (stored fp16; the only per-tenant bytes)
    cols    (nnz,)     int32 column of each entry, rows in order, columns ascending within a row   } the shared
    row_ptr (out + 1,) int32 CSR row pointers                                                       } mask

    apply:  y[..., r] += sum_{j in row r} values[j] * x[..., cols[j]]         (= y + x @ dW^T)

Served in the `sparse` family: a pool keeps one mask per projection and per-slot values (`adapters.serving`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor

from deltafleet.adapters.registry import AdapterConfig, AdapterKind, Params
from deltafleet.adapters.serving import SPARSE, ServingParams
from deltafleet.adapters.sparse.functional import sparse_dense

PPM = 1_000_000


def mask_nnz(density: float, out_f: int, in_f: int) -> int:
    """Entries a projection of shape (out_f, in_f) trains at `density` (at least 1)."""
    return max(1, min(out_f * in_f, round(density * out_f * in_f)))


def magnitude_mask(weight: Tensor, density: float) -> tuple[Tensor, Tensor]:
    """weight (out, in) -> (cols (nnz,) int32, row_ptr (out + 1,) int32): the `mask_nnz` smallest |W| entries,
    as CSR (rows in order, columns ascending)."""
    out_f, in_f = weight.shape
    nnz = mask_nnz(density, out_f, in_f)
    order = weight.detach().float().abs().flatten().argsort(stable=True)[:nnz]
    flat = order.sort().values
    rows, cols = flat // in_f, flat % in_f
    row_ptr = torch.zeros(out_f + 1, dtype=torch.int32)
    row_ptr[1:] = torch.bincount(rows, minlength=out_f).cumsum(0)
    return cols.to(torch.int32), row_ptr


def csr_rows(row_ptr: Tensor) -> Tensor:
    """row_ptr (out + 1,) -> the row of each entry (nnz,) int64."""
    counts = (row_ptr[1:] - row_ptr[:-1]).long()
    return torch.repeat_interleave(torch.arange(counts.numel()), counts)


def flat_index(cols: Tensor, row_ptr: Tensor, in_f: int) -> Tensor:
    """The entries' positions in the flattened (out * in) weight, (nnz,) int64."""
    return csr_rows(row_ptr) * in_f + cols.long()


def sparse_apply(x: Tensor, values: Tensor, cols: Tensor, row_ptr: Tensor) -> Tensor:
    """x (..., in) -> x @ dW^T (..., out) for the CSR delta, computed in x's dtype by a gather and an index_add
    (no dense dW)."""
    out_f = row_ptr.numel() - 1
    contrib = x[..., cols.long()] * values.to(x.dtype)  # (..., nnz)
    y = x.new_zeros(*x.shape[:-1], out_f)
    return y.index_add_(-1, csr_rows(row_ptr), contrib)


def sparse_apply_batched(x: Tensor, values: Tensor, cols: Tensor, row_ptr: Tensor, index: Tensor) -> Tensor:
    """A mixed batch over one shared mask: x (N, in), values (S, nnz) per slot, index (N,) each token's slot ->
    (N, out), token i's x[i] @ dW(values[index[i]])^T, by one gather of inputs and values and one index_add."""
    contrib = x[:, cols.long()] * values.index_select(0, index).to(x.dtype)  # (N, nnz)
    return x.new_zeros(x.shape[0], row_ptr.numel() - 1).index_add_(1, csr_rows(row_ptr), contrib)


@dataclass(frozen=True)
class PafiConfig(AdapterConfig):
    """density: fraction of each target projection's entries trained; mask: the shared mask's id
    (`pafi.mask.mask_id`), empty for a stand-in mask (random tenants in tests)."""

    density: float = 0.02
    mask: str = ""
    kind: ClassVar[str] = "pafi"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.density, float | int) or not 0 < self.density <= 1:
            raise ValueError(f"density={self.density!r}: must be in (0, 1]")

    @property
    def summary(self) -> str:
        return f"density {self.density:g}"

    @property
    def ppm(self) -> int:
        """The density in parts per million: the serving width (one pool per mask density)."""
        return max(1, round(self.density * PPM))


def stand_in_mask(out_f: int, in_f: int, density: float) -> tuple[Tensor, Tensor]:
    """A mask that depends on the shape alone (for random tenants without a base): the magnitude mask of a fixed
    pseudo-random matrix, so every random tenant of one density shares it, as real tenants of one base do."""
    g = torch.Generator().manual_seed(out_f * 1_000_003 + in_f)
    return magnitude_mask(torch.randn(out_f, in_f, generator=g), density)


class PafiKind(AdapterKind):
    name = "pafi"
    config_cls = PafiConfig
    param_names = ("values", "cols", "row_ptr")
    shared_params = ("cols", "row_ptr")

    def param_shapes(self, cfg, out_features, in_features):
        n = mask_nnz(cfg.density, out_features, in_features)
        return {"values": (n,), "cols": (n,), "row_ptr": (out_features + 1,)}

    def init_params(self, cfg, out_features, in_features, *, identity, generator):
        cols, row_ptr = stand_in_mask(out_features, in_features, cfg.density)
        n = cols.numel()
        values = torch.zeros(n) if identity else torch.randn(n, generator=generator) * 0.05
        return {"values": values, "cols": cols, "row_ptr": row_ptr}

    def apply(self, cfg, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return y + sparse_apply(x, params["values"], params["cols"], params["row_ptr"]).to(y.dtype)

    def delta_weight(self, cfg, params: Params, weight: Tensor) -> Tensor:
        return sparse_dense(params["values"], params["cols"], params["row_ptr"], *weight.shape)

    def serving_form(self, cfg, params: Params) -> ServingParams:
        return ServingParams(SPARSE, cfg.ppm, {"values": params["values"].float(), "cols": params["cols"],
                                               "row_ptr": params["row_ptr"]})

    def config_from_dict(self, d: dict[str, Any]) -> PafiConfig:
        return PafiConfig(targets=tuple(d["targets"]), density=float(d["density"]), mask=str(d.get("mask", "")))
