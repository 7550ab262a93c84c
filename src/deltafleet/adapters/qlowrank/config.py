"""The typed config of a `qlowrank` adapter: its band plan per projection shape."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from typing import Any, ClassVar

from deltafleet.adapters.registry import AdapterConfig
from deltafleet.store.quantized import SUPPORTED_BITS

FP16_BITS = 16  # a band kept in fp16 instead of quantized
BAND_BITS = (*SUPPORTED_BITS, FP16_BITS)
U_GROUPS = ("rank", "out")  # how quantized U is grouped: along the rank (U stored (out, r)) or along out (U^T)
Ranks = tuple[tuple[int, int], ...]  # ((bits, rank), ...) highest bits first


_SHAPE_KEY = re.compile(r"[1-9][0-9]{0,9}x[1-9][0-9]{0,9}(@(layers\.[0-9]{1,6}\.[a-z_]{1,32}|[a-z_]{1,32}))?")


def shape_key(out_f: int, in_f: int, module: str | None = None) -> str:
    """'OUTxIN', the plan of every module of that shape; 'OUTxIN@module' (e.g. '576x576@layers.3.q_proj'), one
    module's own plan, which overrides its shape's."""
    return f"{out_f}x{in_f}" if module is None else f"{out_f}x{in_f}@{module}"


def key_shape(key: str) -> tuple[int, int]:
    """(out, in) of a band-plan key."""
    out_f, in_f = key.split("@")[0].split("x")
    return int(out_f), int(in_f)


# ------------------------------------------------------------------------------------------ qlowrank
@dataclass(frozen=True)
class QLowRankConfig(AdapterConfig):
    """bands: per projection shape 'OUTxIN', the (bits, rank) of each band, and per module 'OUTxIN@module' where a
    module has its own plan (per-matrix allocation; an empty plan: the module is left out); group_size: quantization
    group G;
    u_groups: how quantized U is grouped (`compress.budget`): 'rank' stores U (out, r) grouped along r (the
    layout of schema-1 artifacts written before the option, hence the default when a manifest omits it), 'out'
    stores U^T (r, out) grouped along out."""

    bands: tuple[tuple[str, Ranks], ...] = ()
    group_size: int = 128
    u_groups: str = "rank"
    kind: ClassVar[str] = "qlowrank"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r}: must be a positive integer")
        if self.u_groups not in U_GROUPS:
            raise ValueError(f"u_groups={self.u_groups!r}: must be one of {U_GROUPS}")
        for key, ranks in self.bands:
            if not isinstance(key, str) or not _SHAPE_KEY.fullmatch(key):
                raise ValueError(f"bands: key {key!r} must be a projection shape 'OUTxIN', or 'OUTxIN@module'")
            for bits, r in ranks:
                if (bits not in BAND_BITS or isinstance(bits, bool) or not isinstance(r, int) or isinstance(r, bool)
                        or r < 1):
                    raise ValueError(f"bands[{key!r}]: ({bits!r}, {r!r}) must be (bits in {BAND_BITS}, rank >= 1)")

    def ranks(self, out_f: int, in_f: int, module: str | None = None) -> Ranks:
        """The bands of a module of this shape: its own plan when `module` has one, else its shape's."""
        plans = self._plans
        if module is not None and shape_key(out_f, in_f, module) in plans:
            return plans[shape_key(out_f, in_f, module)]
        if shape_key(out_f, in_f) in plans:
            return plans[shape_key(out_f, in_f)]
        where = "" if module is None else f" ({module})"
        raise ValueError(f"bands: no band plan for a {shape_key(out_f, in_f)} projection{where}")

    @cached_property
    def _plans(self) -> dict[str, Ranks]:
        return dict(self.bands)

    @property
    def summary(self) -> str:
        shared = [(k, ranks) for k, ranks in self.bands if "@" not in k]
        own = [(k, ranks) for k, ranks in self.bands if "@" in k]
        text = "; ".join(f"{k}: " + "+".join(f"{r}@{b}b" for b, r in ranks) for k, ranks in shared)
        if own:
            rows = [sum(r for _, r in ranks) for _, ranks in own]
            text += ("; " if text else "") + (f"{len(own)} modules with their own plans (rank {min(rows)}-"
                                              f"{max(rows)})")
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "targets": list(self.targets), "group_size": self.group_size,
                "u_groups": self.u_groups, "bands": {k: [list(br) for br in ranks] for k, ranks in self.bands}}

    def stored_u_shape(self, out_f: int, r: int) -> tuple[int, int]:
        """The shape quantized U is stored in: (out, r), or U^T (r, out) when grouped along out."""
        return (out_f, r) if self.u_groups == "rank" else (r, out_f)
