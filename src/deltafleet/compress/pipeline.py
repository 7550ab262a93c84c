"""Compress every projection delta of a fine-tune with one method, and measure what was kept.

    deltas (delta.py) -> [calibration Hessians (calib.py)] -> method (methods/) -> budget check -> stats

Each module's stored bytes are summed from the tensors the method produced (codes, scales, zero points,
indices: everything), checked against `budget.budget_bytes`, and reported beside its relative reconstruction
error ||Delta - Delta_hat||_F / ||Delta||_F.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from deltafleet.adapters import Adapter
from deltafleet.compress.budget import budget_bytes, fp16_bytes
from deltafleet.compress.calib import capture_hessians
from deltafleet.compress.delta import DeltaSet
from deltafleet.compress.methods import CompressSettings, Context, get_method
from deltafleet.errors import DeltafleetError
from deltafleet.models.llama import Transformer


@dataclass(frozen=True)
class ModuleStats:
    layer: int
    proj: str
    shape: tuple[int, int]  # (out, in)
    bytes: int
    budget: int
    fp16_bytes: int
    rel_error: float


@dataclass
class Compressed:
    adapter: Adapter
    extras: dict[str, Tensor]
    settings: CompressSettings
    stats: list[ModuleStats]
    seconds: float
    spectra: dict[tuple[int, str], Tensor] = field(default_factory=dict)  # singular values of each delta

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.stats)

    @property
    def fp16_bytes(self) -> int:
        return sum(s.fp16_bytes for s in self.stats)

    @property
    def extras_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.extras.values())

    @property
    def mean_rel_error(self) -> float:
        return sum(s.rel_error for s in self.stats) / max(1, len(self.stats))


def module_bytes(params: dict[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in params.values())


def compress_deltas(ds: DeltaSet, settings: CompressSettings, model: Transformer | None = None,
                    calib_ids: Tensor | None = None, tick: Callable[[], None] = lambda: None,
                    spectra: bool = False) -> Compressed:
    """Run `settings.method` on `ds`. `model` (the base) and `calib_ids` (N, T) are needed for calibration."""
    method = get_method(settings.method)
    t0 = time.perf_counter()
    ctx = Context(model=model, calib_ids=calib_ids, tick=tick)
    if method.needs_calibration(settings):
        if model is None or calib_ids is None:
            raise DeltafleetError(f"method={settings.method!r} with these settings needs calibration text "
                                  f"(use --quantizer rtn to compress without it)")
        if method.needs_hessians(settings):
            ctx.hessians = capture_hessians(model, calib_ids)
    adapter = method.compress(ds, settings, ctx)
    seconds = time.perf_counter() - t0
    stats = []
    kind = adapter.kind
    for (layer, proj), delta in sorted(ds.deltas.items()):
        p = adapter.params.get((layer, proj))  # None: nothing fit the budget, the delta is dropped
        o, i = delta.shape
        n, budget = 0 if p is None else module_bytes(p), budget_bytes(o, i, settings.ratio)
        if n > budget + method.slack_bytes:
            raise AssertionError(f"{settings.method}: layers.{layer}.{proj} stores {n} bytes over its budget {budget}")
        rec = torch.zeros_like(delta) if p is None else kind.delta_weight(adapter.config, p, delta)
        err = float((delta - rec).norm() / delta.norm().clamp(min=1e-30))
        stats.append(ModuleStats(layer, proj, (o, i), n, budget, fp16_bytes(o, i), err))
    sv = {k: torch.linalg.svdvals(d) for k, d in ds.deltas.items()} if spectra else {}
    return Compressed(adapter, ds.extras, settings, stats, seconds, sv)
