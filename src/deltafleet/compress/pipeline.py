"""Compress a fine-tune's whole delta with one method, and measure what was kept.

    deltas (delta.py) -> [calibration Hessians (calib.py)] -> method (methods/) -> + exact gains -> budget check
    -> stats

Each module's stored bytes (projections and tables) are summed from the tensors the method produced (codes,
scales, zero points, indices: everything), checked against `DeltaSet.budgets`, and reported beside its relative
reconstruction error ||Delta - Delta_hat||_F / ||Delta||_F. The RMSNorm gain deltas are added to the adapter
exactly (fp16). `Compressed.parts` gives the bytes of each part (`adapters.adapter.PARTS`) against its fp16
bytes; the ratio is over the whole delta.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from deltafleet.adapters import Adapter
from deltafleet.adapters.adapter import PARTS, module_name, part_of
from deltafleet.compress.budget import fp16_bytes
from deltafleet.compress.calib import capture_hessians
from deltafleet.compress.delta import DeltaSet
from deltafleet.compress.methods import CompressSettings, Context, get_method
from deltafleet.errors import DeltafleetError
from deltafleet.models.llama import Transformer


@dataclass(frozen=True)
class ModuleStats:
    layer: int  # MODEL_LAYER for a table
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
        """Every stored byte of the delta: compressed modules and the exact gains."""
        return sum(s.bytes for s in self.stats) + self.adapter.gains_nbytes

    @property
    def fp16_bytes(self) -> int:
        """The whole delta in fp16 (projections, tables, gains)."""
        return sum(s.fp16_bytes for s in self.stats) + self.adapter.gains_nbytes  # gains are stored as fp16

    @property
    def parts(self) -> dict[str, dict[str, int]]:
        """part (`adapters.adapter.PARTS`, those present) -> {"bytes", "fp16_bytes", "modules"}."""
        out: dict[str, dict[str, int]] = {}
        for st in self.stats:
            p = out.setdefault(part_of((st.layer, st.proj)), {"bytes": 0, "fp16_bytes": 0, "modules": 0})
            p["bytes"] += st.bytes
            p["fp16_bytes"] += st.fp16_bytes
            p["modules"] += 1
        if self.adapter.gains:
            n = self.adapter.gains_nbytes  # stored as fp16: their own fp16 bytes
            out["gains"] = {"bytes": n, "fp16_bytes": n, "modules": len(self.adapter.gains)}
        return {k: out[k] for k in PARTS if k in out}

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
    adapter.gains = {k: g.half() for k, g in sorted(ds.gains.items())}
    seconds = time.perf_counter() - t0
    stats = []
    kind = adapter.kind
    budgets = method.module_budgets(ds, settings, adapter)
    whole = sum(ds.budgets(settings.ratio, method.charges_gains).values())
    if sum(budgets.values()) > whole:
        raise AssertionError(f"{settings.method}: module budgets sum to {sum(budgets.values())} bytes, over the whole "
                             f"delta's {whole}")
    for (layer, proj), delta in sorted(ds.deltas.items()):
        p = adapter.params.get((layer, proj))  # None: nothing fit the budget, the delta is dropped
        o, i = delta.shape
        n, budget = 0 if p is None else module_bytes(p), budgets[(layer, proj)]
        if n > budget + method.slack_bytes:
            raise AssertionError(f"{settings.method}: {module_name(layer, proj)} stores {n} bytes over its budget "
                                 f"{budget}")
        rec = torch.zeros_like(delta) if p is None else kind.delta_weight(adapter.config, p, delta)
        err = float((delta - rec).norm() / delta.norm().clamp(min=1e-30))
        stats.append(ModuleStats(layer, proj, (o, i), n, budget, fp16_bytes(o, i), err))
    sv = {k: torch.linalg.svdvals(d) for k, d in ds.deltas.items()} if spectra else {}
    return Compressed(adapter, ds.extras, settings, stats, seconds, sv)
