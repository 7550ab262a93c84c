"""Preallocated adapter slot pools: the resident adapters, stacked so a batch gathers rows by slot index.

A pool holds `n` slots plus one null row (index n) that leaves a projection unchanged (zeros for additive,
c=1/s=0 for elementwise): tokens of the base model or of another pool's adapters index the null row, so a
gather needs no masking. Tensors per projection are allocated on first use for the full slot count, then
reused; loading an adapter copies its own weights into its slot (never a copy of base weights).

Shapes: additive A (n+1, R_max, in), B (n+1, R_max, out); elementwise c, s (n+1, out).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import Tensor

from deltafleet.models.config import ModelConfig
from deltafleet.serve.engine.forms import ADDITIVE, ELEMENTWISE, ModuleKey, ServingForm


class Pool(ABC):
    family: str

    def __init__(self, name: str, model_cfg: ModelConfig, slots: int, width: int, dtype: torch.dtype):
        if slots < 1:
            raise ValueError(f"pool {name!r}: slots={slots} must be >= 1")
        self.name, self.cfg, self.slots, self.width, self.dtype = name, model_cfg, slots, width, dtype
        self.null = slots
        self.tensors: dict[ModuleKey, dict[str, Tensor]] = {}
        self.slot_modules: list[frozenset[ModuleKey]] = [frozenset()] * slots
        # One shared object per distinct target set, so a step unions the sets of its distinct objects (usually
        # one) instead of hashing every slot's keys again (32 slots x 210 keys cost ~3 ms a step).
        self._module_sets: dict[frozenset[ModuleKey], frozenset[ModuleKey]] = {}
        self.slot_width: list[int] = [0] * slots

    @abstractmethod
    def accepts(self, form: ServingForm) -> bool: ...

    @abstractmethod
    def _allocate(self, key: ModuleKey) -> dict[str, Tensor]: ...

    @abstractmethod
    def _write_module(self, slot: int, dst: dict[str, Tensor], src: dict[str, Tensor]) -> None: ...

    @abstractmethod
    def _clear_module(self, slot: int, dst: dict[str, Tensor]) -> None: ...

    def write(self, slot: int, form: ServingForm) -> None:
        self.clear(slot)
        for key, src in form.modules.items():
            if key not in self.tensors:
                self.tensors[key] = self._allocate(key)
            self._write_module(slot, self.tensors[key], src)
        self.slot_modules[slot] = self._module_sets.setdefault(form.module_keys, form.module_keys)
        self.slot_width[slot] = form.width

    def clear(self, slot: int) -> None:
        for key in self.slot_modules[slot]:
            self._clear_module(slot, self.tensors[key])
        self.slot_modules[slot], self.slot_width[slot] = frozenset(), 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.tensors.values() for t in m.values())


class AdditivePool(Pool):
    family = ADDITIVE

    def accepts(self, form: ServingForm) -> bool:
        return form.family == ADDITIVE and form.width <= self.width

    def _allocate(self, key: ModuleKey) -> dict[str, Tensor]:
        out_f, in_f = self.cfg.linear_shape(key[1])
        n = self.slots + 1
        return {"A": torch.zeros(n, self.width, in_f, dtype=self.dtype),
                "B": torch.zeros(n, self.width, out_f, dtype=self.dtype)}

    def _write_module(self, slot, dst, src):
        r = src["A"].shape[0]
        dst["A"][slot, :r] = src["A"]
        dst["B"][slot, :r] = src["B"]

    def _clear_module(self, slot, dst):
        dst["A"][slot].zero_()
        dst["B"][slot].zero_()


class ElementwisePool(Pool):
    """RoAd-style adapters that share one group size G (= width)."""

    family = ELEMENTWISE

    def accepts(self, form: ServingForm) -> bool:
        return form.family == ELEMENTWISE and form.width == self.width

    def _allocate(self, key: ModuleKey) -> dict[str, Tensor]:
        out_f, _ = self.cfg.linear_shape(key[1])
        n = self.slots + 1
        return {"c": torch.ones(n, out_f, dtype=self.dtype), "s": torch.zeros(n, out_f, dtype=self.dtype)}

    def _write_module(self, slot, dst, src):
        dst["c"][slot] = src["c"]
        dst["s"][slot] = src["s"]

    def _clear_module(self, slot, dst):
        dst["c"][slot].fill_(1)
        dst["s"][slot].zero_()
