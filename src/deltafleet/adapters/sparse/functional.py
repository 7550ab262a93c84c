"""Sparse delta: dW holds nnz entries in CSR form (DARE, Yu et al. 2024, arXiv:2311.03099, Sec. 3: kept entries
already rescaled by 1/(1-p)); fp16 values, int16/int32 column indices, int32 row pointers. The nnz per projection
depends on its shape, so the config keys it by `OUTxIN`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from deltafleet.adapters.qlowrank.config import shape_key
from deltafleet.adapters.registry import AdapterConfig, AdapterKind


def index_bytes(in_f: int) -> int:
    """Bytes of one stored column index: int16 while columns fit, else int32."""
    return 2 if in_f <= 1 << 15 else 4


@dataclass(frozen=True)
class SparseConfig(AdapterConfig):
    """nnz: per projection shape 'OUTxIN', the number of stored entries."""

    nnz: tuple[tuple[str, int], ...] = field(default=())
    kind: ClassVar[str] = "sparse"

    def count(self, out_f: int, in_f: int) -> int:
        for key, n in self.nnz:
            if key == shape_key(out_f, in_f):
                return n
        raise ValueError(f"nnz: no entry count for a {shape_key(out_f, in_f)} projection")

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "targets": list(self.targets), "nnz": dict(self.nnz)}


def index_dtype(in_f: int) -> torch.dtype:
    return torch.int16 if index_bytes(in_f) == 2 else torch.int32


def sparse_dense(values: Tensor, cols: Tensor, row_ptr: Tensor, out_f: int, in_f: int) -> Tensor:
    """CSR -> dense (out, in) fp32 (merge and reference only)."""
    row_ptr = row_ptr.long()
    rows = torch.repeat_interleave(torch.arange(out_f), row_ptr[1:] - row_ptr[:-1])
    dense = torch.zeros(out_f, in_f)
    dense[rows, cols.long()] = values.float()
    return dense


class SparseKind(AdapterKind):
    name = "sparse"
    config_cls = SparseConfig
    param_names = ("values", "cols", "row_ptr")

    def param_shapes(self, cfg, out_features, in_features):
        n = cfg.count(out_features, in_features)
        return {"values": (n,), "cols": (n,), "row_ptr": (out_features + 1,)}

    def init_params(self, cfg, out_features, in_features, *, identity, generator):
        n = cfg.count(out_features, in_features)
        flat = torch.randperm(out_features * in_features, generator=generator)[:n].sort().values
        rows, cols = flat // in_features, flat % in_features
        row_ptr = torch.zeros(out_features + 1, dtype=torch.int32)
        row_ptr[1:] = torch.bincount(rows, minlength=out_features).cumsum(0)
        values = torch.zeros(n) if identity else torch.randn(n, generator=generator) * 0.05
        return {"values": values.half(), "cols": cols.to(index_dtype(in_features)), "row_ptr": row_ptr}

    def apply(self, cfg, params, x, y):  # reference only: sparse deltas are not served
        return y + x @ self.delta_weight(cfg, params, torch.empty(y.shape[-1], x.shape[-1])).t().to(x.dtype)

    def delta_weight(self, cfg, params, weight):
        return sparse_dense(params["values"], params["cols"], params["row_ptr"], *weight.shape)

    def config_from_dict(self, d: dict[str, Any]) -> SparseConfig:
        return SparseConfig(targets=tuple(d["targets"]), nnz=tuple((str(k), int(v)) for k, v in d["nnz"].items()))
