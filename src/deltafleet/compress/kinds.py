"""Adapter kinds of compressed full-fine-tune deltas, registered in `adapters.registry.KINDS` on import.

- `qlowrank`: dW = sum over bands of U_b diag(S_b) V_b^T, with V_b^T (r_b, in) and U_b (out, r_b) quantized to
  the band's bit width (group-wise, `quant.functional`), or kept in fp16 for 16-bit bands; S_b (r_b,) fp16.
  Delta-CoMe (Ping et al. 2024, arXiv:2406.08903, Sec. 3) and plain truncated SVD both produce it. Applied to
  activations right to left, y' = y + U (S * (V^T x)), so it is served without a dense matrix.
- `bitdelta`: dW = alpha * sign(Delta) (Liu et al. 2024, arXiv:2402.10193, Sec. 3.1), signs packed 8 per
  byte (bit 1: +1, bit 0: -1), one fp16 alpha per matrix.
- `sparse`: dW holds nnz entries in CSR form (DARE, Yu et al. 2024, arXiv:2311.03099, Sec. 3: kept entries
  already rescaled by 1/(1-p)); fp16 values, int16/int32 column indices, int32 row pointers.

Per-projection band ranks and nnz depend on the projection's shape, so the configs key them by `OUTxIN`.
Parameter shapes therefore depend on the config; `param_names` lists the base names only.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor

from deltafleet.adapters.registry import AdapterConfig, AdapterKind, Params, register_kind
from deltafleet.compress.budget import BAND_BITS, FP16_BITS, U_GROUPS, index_bytes
from deltafleet.quant.functional import QuantizedMatrix, num_groups, pack_codes, packed_nbytes, unpack_codes

Ranks = tuple[tuple[int, int], ...]  # ((bits, rank), ...) highest bits first


def shape_key(out_f: int, in_f: int) -> str:
    return f"{out_f}x{in_f}"


# ------------------------------------------------------------------------------------------ qlowrank
@dataclass(frozen=True)
class QLowRankConfig(AdapterConfig):
    """bands: per projection shape 'OUTxIN', the (bits, rank) of each band; group_size: quantization group G;
    u_groups: how quantized U is grouped (`compress.budget`): 'rank' stores U (out, r) grouped along r (the
    layout of schema-1 artifacts written before the option, hence the default when a manifest omits it), 'out'
    stores U^T (r, out) grouped along out."""

    bands: tuple[tuple[str, Ranks], ...] = ()
    group_size: int = 128
    u_groups: str = "rank"
    kind: ClassVar[str] = "qlowrank"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r}: must be a positive integer")
        if self.u_groups not in U_GROUPS:
            raise ValueError(f"u_groups={self.u_groups!r}: must be one of {U_GROUPS}")
        for key, ranks in self.bands:
            for bits, r in ranks:
                if bits not in BAND_BITS or not isinstance(r, int) or r < 1:
                    raise ValueError(f"bands[{key!r}]: ({bits!r}, {r!r}) must be (bits in {BAND_BITS}, rank >= 1)")

    def ranks(self, out_f: int, in_f: int) -> Ranks:
        for key, ranks in self.bands:
            if key == shape_key(out_f, in_f):
                return ranks
        raise ValueError(f"bands: no band plan for a {shape_key(out_f, in_f)} projection")

    @property
    def summary(self) -> str:
        return "; ".join(f"{k}: " + "+".join(f"{r}@{b}b" for b, r in ranks) for k, ranks in self.bands)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "targets": list(self.targets), "group_size": self.group_size,
                "u_groups": self.u_groups, "bands": {k: [list(br) for br in ranks] for k, ranks in self.bands}}

    def stored_u_shape(self, out_f: int, r: int) -> tuple[int, int]:
        """The shape quantized U is stored in: (out, r), or U^T (r, out) when grouped along out."""
        return (out_f, r) if self.u_groups == "rank" else (r, out_f)


def _band_shapes(out_f: int, in_f: int, bits: int, r: int, G: int, i: int,
                 u_shape: tuple[int, int]) -> dict[str, tuple[int, ...]]:
    if bits == FP16_BITS:
        return {f"b{i}.V": (r, in_f), f"b{i}.U": (out_f, r), f"b{i}.S": (r,)}
    shapes = {f"b{i}.S": (r,)}
    for name, (R, C) in (("V", (r, in_f)), ("U", u_shape)):
        shapes |= {f"b{i}.{name}.qcodes": (packed_nbytes(R * C, bits),), f"b{i}.{name}.qscale": (R, num_groups(C, G)),
                   f"b{i}.{name}.qzero": (R, num_groups(C, G))}
    return shapes


def qlowrank_shape(cfg: QLowRankConfig, params: Params) -> tuple[int, int]:
    """(out, in) of a module: the one shape in `cfg.bands` whose parameter shapes are exactly those of `params`."""
    got = {n: tuple(t.shape) for n, t in params.items()}
    kind = QLowRankKind()
    hits = []
    for key, _ in cfg.bands:
        out_f, in_f = (int(v) for v in key.split("x"))
        if kind.param_shapes(cfg, out_f, in_f) == got:
            hits.append((out_f, in_f))
    if len(hits) != 1:
        raise ValueError(f"qlowrank parameters {sorted(got)} match {len(hits)} projection shapes of the band plan; "
                         f"expected exactly one")
    return hits[0]


def _stored(params: Params, prefix: str) -> Params:
    """The quantized tensors in their stored dtypes (`Adapter.to(dtype)` casts every tensor; integer codes and
    zero points below 256 survive any float dtype exactly)."""
    dtypes = {"qcodes": torch.uint8, "qscale": torch.float16, "qzero": torch.uint8}
    return {f"{prefix}.{n}": params[f"{prefix}.{n}"].to(dt) for n, dt in dtypes.items() if f"{prefix}.{n}" in params}


def qlowrank_factors(cfg: QLowRankConfig, params: Params, out_f: int,
                     in_f: int) -> tuple[Tensor, Tensor, Tensor]:
    """Dequantized U (out, R), S (R,), V^T (R, in) in fp32, bands concatenated (R = total rank)."""
    Us, Ss, Vts = [], [], []
    for i, (bits, r) in enumerate(cfg.ranks(out_f, in_f)):
        if bits == FP16_BITS:
            Vt, U = params[f"b{i}.V"].float(), params[f"b{i}.U"].float()
        else:
            Vt = QuantizedMatrix.from_tensors(_stored(params, f"b{i}.V"), f"b{i}.V", (r, in_f), bits,
                                              cfg.group_size).dequantize()
            U = QuantizedMatrix.from_tensors(_stored(params, f"b{i}.U"), f"b{i}.U", cfg.stored_u_shape(out_f, r),
                                             bits, cfg.group_size).dequantize()
            U = U if cfg.u_groups == "rank" else U.t()
        Us.append(U)
        Ss.append(params[f"b{i}.S"].float())
        Vts.append(Vt)
    return torch.cat(Us, 1), torch.cat(Ss), torch.cat(Vts, 0)


def qlowrank_apply(x: Tensor, y: Tensor, U: Tensor, S: Tensor, Vt: Tensor) -> Tensor:
    """x (..., in), y (..., out) -> y + ((x Vt^T) * S) U^T = y + U (S * (Vt x)), never forming (out, in)."""
    return y + ((x @ Vt.t().to(x.dtype)) * S.to(x.dtype)) @ U.t().to(x.dtype)


class QLowRankKind(AdapterKind):
    name = "qlowrank"
    config_cls = QLowRankConfig
    param_names = ("S", "U", "V")  # per band b{i}.{name}[.qcodes|.qscale|.qzero]; see param_shapes

    def param_shapes(self, cfg: QLowRankConfig, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        shapes: dict[str, tuple[int, ...]] = {}
        for i, (bits, r) in enumerate(cfg.ranks(out_features, in_features)):
            shapes |= _band_shapes(out_features, in_features, bits, r, cfg.group_size, i,
                                   cfg.stored_u_shape(out_features, r))
        return shapes

    def init_params(self, cfg: QLowRankConfig, out_features: int, in_features: int, *, identity: bool,
                    generator: torch.Generator) -> Params:
        params: Params = {}
        for i, (bits, r) in enumerate(cfg.ranks(out_features, in_features)):
            Vt = torch.linalg.qr(torch.randn(in_features, r, generator=generator))[0].t()
            U = torch.linalg.qr(torch.randn(out_features, r, generator=generator))[0]
            S = torch.zeros(r) if identity else torch.rand(r, generator=generator) * 0.5
            params[f"b{i}.S"] = S.half()
            if bits == FP16_BITS:
                params |= {f"b{i}.V": Vt.half(), f"b{i}.U": U.half()}
            else:
                params |= QuantizedMatrix.quantize(Vt, bits, cfg.group_size).tensors(f"b{i}.V")
                Us = U if cfg.u_groups == "rank" else U.t().contiguous()
                params |= QuantizedMatrix.quantize(Us, bits, cfg.group_size).tensors(f"b{i}.U")
        return params

    def apply(self, cfg: QLowRankConfig, params: Params, x: Tensor, y: Tensor) -> Tensor:
        return qlowrank_apply(x, y, *qlowrank_factors(cfg, params, y.shape[-1], x.shape[-1]))

    def delta_weight(self, cfg: QLowRankConfig, params: Params, weight: Tensor) -> Tensor:
        U, S, Vt = qlowrank_factors(cfg, params, *weight.shape)
        return (U * S) @ Vt

    def config_from_dict(self, d: dict[str, Any]) -> QLowRankConfig:
        bands = tuple((str(k), tuple((int(b), int(r)) for b, r in v)) for k, v in dict(d["bands"]).items())
        return QLowRankConfig(targets=tuple(d["targets"]), group_size=int(d["group_size"]), bands=bands,
                              u_groups=str(d.get("u_groups", "rank")))


# ------------------------------------------------------------------------------------------ bitdelta
@dataclass(frozen=True)
class BitDeltaConfig(AdapterConfig):
    kind: ClassVar[str] = "bitdelta"


def bitdelta_signs(packed: Tensor, out_f: int, in_f: int) -> Tensor:
    """uint8 packed bits -> signs (out, in) in {-1, +1} fp32."""
    return unpack_codes(packed.to(torch.uint8), 1, out_f * in_f).reshape(out_f, in_f).float() * 2 - 1


def pack_signs(delta: Tensor) -> Tensor:
    """delta (out, in) -> uint8 (ceil(out * in / 8),): bit 1 where delta >= 0."""
    return pack_codes((delta >= 0).to(torch.uint8), 1)


class BitDeltaKind(AdapterKind):
    name = "bitdelta"
    config_cls = BitDeltaConfig
    param_names = ("signs", "scale")

    def param_shapes(self, cfg, out_features, in_features):
        return {"signs": (packed_nbytes(out_features * in_features, 1),), "scale": (1,)}

    def init_params(self, cfg, out_features, in_features, *, identity, generator):
        d = torch.randn(out_features, in_features, generator=generator)
        return {"signs": pack_signs(d), "scale": torch.tensor([0.0 if identity else 0.01]).half()}

    def apply(self, cfg, params, x, y):  # reference only: bitdelta is not served (dense signs)
        dW = self.delta_weight(cfg, params, torch.empty(y.shape[-1], x.shape[-1]))
        return y + x @ dW.t().to(x.dtype)

    def delta_weight(self, cfg, params, weight):
        return bitdelta_signs(params["signs"], *weight.shape) * params["scale"].float()


# ------------------------------------------------------------------------------------------ sparse
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


for _kind in (QLowRankKind(), BitDeltaKind(), SparseKind()):
    register_kind(_kind)
