"""Serving forms: how each adapter kind is laid out in the engine's batched slot pools.

Every kind reduces, per projection, to one of two families that batch without per-adapter matmuls over the
base weights:
- additive:    y += B^T (A x)       A (R, in), B (R, out)   LoRA (scale folded into B), low-rank deltas
- elementwise: y  = y * c + rotate_half_G(y) * s            c, s (out,)                  RoAd, group size G

A kind registers `to_serving_form(config, params) -> ServingForm`; the engine never dispatches on kind names.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from deltafleet.adapters import Adapter, AdapterConfig
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


FormFn = Callable[[AdapterConfig, Params], tuple[str, int, dict[str, Tensor]]]
SERVING_FORMS: dict[str, FormFn] = {}


def register_serving_form(kind: str, fn: FormFn) -> None:
    if kind in SERVING_FORMS:
        raise ValueError(f"serving form for kind {kind!r} registered twice")
    SERVING_FORMS[kind] = fn


def to_serving_form(adapter: Adapter, dtype: torch.dtype) -> ServingForm:
    fn = SERVING_FORMS.get(adapter.config.kind)
    if fn is None:
        raise ValueError(f"adapter kind {adapter.config.kind!r} has no serving form; known: {sorted(SERVING_FORMS)}")
    modules, family, width = {}, None, 0
    for key, params in adapter.params.items():
        fam, w, tensors = fn(adapter.config, params)
        family, width = fam, max(width, w)
        modules[key] = {n: t.to(dtype).contiguous() for n, t in tensors.items()}
    return ServingForm(family, width, modules)


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
