"""Serving forms: how each adapter kind is laid out in the engine's batched slot pools.

Every kind reduces, per projection, to one of two families that batch without per-adapter matmuls over the
base weights:
- additive:    y += B^T (A x)       A (R, in), B (R, out)   LoRA (scale folded into B), low-rank deltas
- elementwise: y  = y * c + rotate_half_G(y) * s            c, s (out,)                  RoAd, group size G

A kind registers `to_serving_form(config, params) -> ServingForm`; the engine never dispatches on kind names.

Compact kinds (registered with `compact=True`, e.g. the quantized low-rank deltas of `deltafleet.compress`) stay
in host memory as loaded, a `CompactForm` of about their stored bytes; their dequantized factors are built only
when they are written into a slot (`materialize`). Other kinds are kept in host memory in serving form.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from deltafleet.adapters import Adapter, AdapterConfig
from deltafleet.adapters.qlowrank import qlowrank_factors, qlowrank_shape
from deltafleet.adapters.registry import Params
from deltafleet.adapters.road.functional import road_cols

ADDITIVE, ELEMENTWISE = "additive", "elementwise"
ModuleKey = tuple[int, str]


@dataclass
class ServingForm:
    """family: ADDITIVE or ELEMENTWISE; width: rank R (additive) or group size G (elementwise)."""

    family: str
    width: int
    modules: dict[ModuleKey, dict[str, Tensor]]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.modules.values() for t in m.values())

    @property
    def module_keys(self) -> frozenset[ModuleKey]:
        return frozenset(self.modules)

    def materialize(self) -> ServingForm:
        return self


@dataclass
class CompactForm:
    """A loaded adapter kept as stored (e.g. packed codes); `nbytes` is its stored size."""

    family: str
    width: int
    adapter: Adapter
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return self.adapter.nbytes

    def materialize(self) -> ServingForm:
        return to_serving_form(self.adapter, self.dtype)


FormFn = Callable[[AdapterConfig, Params], tuple[str, int, dict[str, Tensor]]]
SERVING_FORMS: dict[str, FormFn] = {}
COMPACT_KINDS: set[str] = set()


def register_serving_form(kind: str, fn: FormFn, *, compact: bool = False) -> None:
    if kind in SERVING_FORMS:
        raise ValueError(f"serving form for kind {kind!r} registered twice")
    SERVING_FORMS[kind] = fn
    if compact:
        COMPACT_KINDS.add(kind)


def to_serving_form(adapter: Adapter, dtype: torch.dtype) -> ServingForm:
    fn = SERVING_FORMS.get(adapter.config.kind)
    if fn is None:
        raise ValueError(f"adapter kind {adapter.config.kind!r} is not served (no serving form; served kinds: "
                         f"{sorted(SERVING_FORMS)}); merge it into the base instead (deltafleet merge)")
    modules, family, width = {}, None, 0
    for key, params in adapter.params.items():
        fam, w, tensors = fn(adapter.config, params)
        family, width = fam, max(width, w)
        modules[key] = {n: t.to(dtype).contiguous() for n, t in tensors.items()}
    return ServingForm(family, width, modules)


def host_form(adapter: Adapter, dtype: torch.dtype) -> ServingForm | CompactForm:
    """What the host-memory cache keeps: the serving form, or for compact kinds the adapter as loaded (its serving
    form is built once here to validate it and learn its family and width, then dropped)."""
    form = to_serving_form(adapter, dtype)
    if adapter.config.kind in COMPACT_KINDS:
        return CompactForm(form.family, form.width, adapter, dtype)
    return form


def _lora(cfg, p):
    return ADDITIVE, cfg.r, {"A": p["A"].float(), "B": (p["B"].float() * cfg.scaling).t()}


def _lowrank(cfg, p):
    return ADDITIVE, cfg.rank, {"A": (p["V"].float() * p["S"].float()).t(), "B": p["U"].float().t()}


def _road(cfg, p):
    c, s = road_cols(cfg.variant, cfg.group_size, p["theta"].float(), p["alpha"].float())
    return ELEMENTWISE, cfg.group_size, {"c": c, "s": s}


register_serving_form("lora", _lora)
register_serving_form("lowrank", _lowrank)
register_serving_form("road", _road)


def _qlowrank(cfg, p):
    U, S, Vt = qlowrank_factors(cfg, p, *qlowrank_shape(cfg, p))
    return ADDITIVE, S.numel(), {"A": Vt * S[:, None], "B": U.t()}


register_serving_form("qlowrank", _qlowrank, compact=True)
