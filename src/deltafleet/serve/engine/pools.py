"""Preallocated adapter slot pools: the resident adapters, stacked so a batch gathers rows by slot index.

A pool holds `n` slots plus one null row (index n) that leaves a projection unchanged (zeros for additive,
c=1/s=0 for elementwise): tokens of the base model or of another pool's adapters index the null row, so a
gather needs no masking. Tensors per projection are allocated on first use for the full slot count, then
reused; loading an adapter copies its own weights into its slot (never a copy of base weights). Every mutation
(`write`, `clear`) runs under `torch.inference_mode()`, so it works from any thread (the engine's loop, or an
admin call freeing a slot): the pool's tensors are inference tensors, read by forwards under inference mode or
`no_grad`.

Shapes: additive A (n+1, R_max, in), B (n+1, R_max, out) (a table: in = H, out = V; a whole fine-tune's norm
gain delta (n+1, H)); qadditive the tensors of `adapters.qadditive` with a slot dimension first, R_max rows and
data (n+1, D_max + DATA_PAD); elementwise c, s (n+1, out); sparse values (n+1, nnz)
with the pool's one mask per projection, cols (nnz,) and row_ptr (out+1,) (PaFi: the mask of the base); norm delta
(n+1, H) per RMSNorm (HiWi).

The engine builds its pools from `PoolSpec`s (`EngineConfig.pools`), one pool class per serving family
(`POOL_CLASSES`); which family and what a slot holds is each adapter kind's own `serving_form`
(`deltafleet.adapters.serving`). `PoolStep` is one pool's share of a step's batch (`layout.BatchLayout`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from deltafleet.adapters.adapter import ModuleKey
from deltafleet.adapters.qadditive import DATA_PAD, QADDITIVE
from deltafleet.adapters.serving import ADDITIVE, ELEMENTWISE, GAIN, NORM, SLOT_TENSORS, SPARSE, ServingForm
from deltafleet.models.config import MODEL_LAYER, ModelConfig
from deltafleet.registry import Registry


@dataclass(frozen=True)
class PoolSpec:
    """name: the pool's name (errors, listings); family: the serving family it holds (a key of `POOL_CLASSES`);
    slots: resident adapters at most; width: the widest rank R it holds (additive) or its group size G
    (elementwise)."""

    name: str
    family: str
    slots: int
    width: int

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError(f"name={self.name!r}: a pool needs a non-empty name")
        cls = POOL_CLASSES.get(self.family)
        if cls is None:
            raise ValueError(f"pool {self.name!r}: family={self.family!r}: must be one of {sorted(POOL_CLASSES)}")
        if not isinstance(self.slots, int) or self.slots < 1:
            raise ValueError(f"pool {self.name!r}: slots={self.slots!r}: must be an integer >= 1")
        if not isinstance(self.width, int) or not cls.width_ok(self.width):
            raise ValueError(f"pool {self.name!r}: width={self.width!r}: {cls.width_rule}")


class Pool(ABC):
    family: ClassVar[str]
    width_rule: ClassVar[str] = "must be an integer >= 1"

    def __init__(self, spec: PoolSpec, model_cfg: ModelConfig, dtype: torch.dtype):
        if spec.family != self.family:
            raise ValueError(f"pool {spec.name!r}: family={spec.family!r}: {type(self).__name__} holds "
                             f"{self.family} adapters")
        self.spec, self.cfg, self.dtype = spec, model_cfg, dtype
        self.name, self.slots, self.width = spec.name, spec.slots, spec.width
        self.null = self.slots
        self.tensors: dict[ModuleKey, dict[str, Tensor]] = {}
        self.slot_modules: list[frozenset[ModuleKey]] = [frozenset()] * self.slots
        # One shared object per distinct target set, so a step unions the sets of its distinct objects (usually
        # one) instead of hashing every slot's keys again (32 slots x 210 keys cost ~3 ms a step).
        self._module_sets: dict[frozenset[ModuleKey], frozenset[ModuleKey]] = {}
        self.slot_width: list[int] = [0] * self.slots
        # Bumped whenever a module's tensor dict is added, replaced or dropped: what was built over the old dicts
        # (a backend's fused calls, `Backend.fused_table`) is then built again.
        self.version = 0

    @staticmethod
    def width_ok(width: int) -> bool:
        return width >= 1

    @classmethod
    @abstractmethod
    def specs_for(cls, widths: list[int]) -> list[PoolSpec]:
        """Pools of this family that keep adapters of these widths (one each) resident at once."""

    @abstractmethod
    def accepts(self, form: ServingForm) -> bool: ...

    @abstractmethod
    def _allocate(self, key: ModuleKey, src: dict[str, Tensor]) -> dict[str, Tensor]:
        """A projection's tensors for every slot, allocated when the first adapter adapting it (`src`) arrives."""

    @abstractmethod
    def _write_module(self, slot: int, dst: dict[str, Tensor], src: dict[str, Tensor]) -> None:
        """Write `src` as the slot's whole row of a module: afterwards the row reads as src alone (nothing of before
        that a kernel reads remains)."""

    @abstractmethod
    def _clear_module(self, slot: int, dst: dict[str, Tensor]) -> None: ...

    @torch.inference_mode()
    def write(self, slot: int, form: ServingForm) -> None:
        """Place `form` in `slot`. Each module it adapts is written whole (`_write_module` defines the slot's entire
        row of it, tails zeroed); the previous occupant's other modules are cleared. The slot is not cleared first:
        tenants of a kind adapt the same modules, and a slot copy is on the engine's step (a whole fine-tune: 1,749
        tensors, 10.3 -> 5.7 ms; LoRA r16 4.3 -> 2.4 ms). If a write fails, every module either occupant touched is
        cleared."""
        old, new = self.slot_modules[slot], form.module_keys
        try:
            for key in old:
                if key not in new:
                    self._clear_module(slot, self.tensors[key])
            for key, src in form.modules.items():
                if key not in self.tensors:
                    self.tensors[key] = self._allocate(key, src)
                    self.version += 1
                self._write_module(slot, self.tensors[key], src)
        except BaseException:
            for key in old | new:
                if key in self.tensors:
                    self._clear_module(slot, self.tensors[key])
            self.slot_modules[slot], self.slot_width[slot] = frozenset(), 0
            raise
        self.slot_modules[slot] = self._module_sets.setdefault(new, new)
        self.slot_width[slot] = form.width

    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        for key in self.slot_modules[slot]:
            self._clear_module(slot, self.tensors[key])
        self.slot_modules[slot], self.slot_width[slot] = frozenset(), 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for m in self.tensors.values() for t in m.values())

    def _regrow(self, key: ModuleKey, grown: dict[str, Tensor]) -> None:
        """Replace a module's tensors by larger ones (`grown`, every slot), keeping every slot's contents: a new
        dict, so kernels bound to the old one rebind."""
        for name, t in self.tensors[key].items():
            grown[name][:, :t.shape[1]] = t
        self.tensors[key] = grown
        self.version += 1


class AdditivePool(Pool):
    family = ADDITIVE

    @classmethod
    def specs_for(cls, widths: list[int]) -> list[PoolSpec]:
        return [PoolSpec(cls.family, cls.family, len(widths), max(widths))]

    def accepts(self, form: ServingForm) -> bool:
        return form.family == ADDITIVE and form.width <= self.width

    def _allocate(self, key: ModuleKey, src: dict[str, Tensor]) -> dict[str, Tensor]:
        n = self.slots + 1
        if GAIN in src:  # a whole fine-tune's RMSNorm gain delta (`adapters.serving`)
            return {GAIN: torch.zeros(n, self.cfg.hidden_size, dtype=self.dtype)}
        out_f, in_f = self.cfg.module_shape(key[1])  # a projection, or a table (V, H)
        width = src["A"].shape[0] if key[0] == MODEL_LAYER else self.width
        return {"A": torch.zeros(n, width, in_f, dtype=self.dtype),
                "B": torch.zeros(n, width, out_f, dtype=self.dtype)}

    @torch.inference_mode()
    def write(self, slot: int, form: ServingForm) -> None:
        """A table (`MODEL_LAYER` key) is sized by the widest table rank written so far: a wider one regrows it
        (a new tensor dict, so kernels bound to the old one rebind), keeping the other slots' rows."""
        for key, src in form.modules.items():
            held = self.tensors.get(key)
            if key[0] == MODEL_LAYER and held is not None and "A" in src and src["A"].shape[0] > held["A"].shape[1]:
                self._regrow(key, self._allocate(key, src))
        super().write(slot, form)

    def _write_module(self, slot, dst, src):
        if GAIN in dst:
            dst[GAIN][slot] = src[GAIN]
            return
        r = src["A"].shape[0]
        dst["A"][slot, :r] = src["A"]
        dst["B"][slot, :r] = src["B"]
        if r < dst["A"].shape[1]:  # rows past the slot's rank stay zero (a step reads up to its widest member's)
            dst["A"][slot, r:].zero_()
            dst["B"][slot, r:].zero_()

    def _clear_module(self, slot, dst):
        for t in dst.values():
            t[slot].zero_()


class QAdditivePool(Pool):
    """Quantized additive adapters kept as stored (`adapters.qadditive`), of one group size: the first adapter
    written into the empty pool sets it (a different one reallocates the empty pool's tensors). A module's tensors
    are sized by the widest form written so far (rows, data bytes; a table by its own rows): a larger one regrows
    them (a new tensor dict, so bound kernels rebind), keeping the other slots'. The null row has no rows (bits
    0)."""

    family = QADDITIVE

    def __init__(self, spec: PoolSpec, model_cfg: ModelConfig, dtype: torch.dtype):
        super().__init__(spec, model_cfg, dtype)
        self.group = 0

    @classmethod
    def specs_for(cls, widths: list[int]) -> list[PoolSpec]:
        return [PoolSpec(cls.family, cls.family, len(widths), max(widths))]

    def accepts(self, form: ServingForm) -> bool:
        return (form.family == QADDITIVE and form.width <= self.width
                and (self.group in (0, form.group) or not any(self.slot_modules)))

    def _allocate(self, key: ModuleKey, src: dict[str, Tensor]) -> dict[str, Tensor]:
        if GAIN in src:
            return {GAIN: torch.zeros(self.slots + 1, self.cfg.hidden_size, dtype=self.dtype)}
        return self._sized(src, src["bits"].shape[0] if key[0] == MODEL_LAYER else self.width, src["data"].numel())

    def _sized(self, like: dict[str, Tensor], R: int, D: int) -> dict[str, Tensor]:
        """Zeroed tensors for every slot: R rows, D data bytes (plus the kernel's padding), groups as `like`'s."""
        n = self.slots + 1
        return {name: torch.zeros(n, D + DATA_PAD, dtype=t.dtype) if name == "data" else
                torch.zeros(n, R, *t.shape[1:], dtype=t.dtype) for name, t in like.items()}

    @torch.inference_mode()
    def write(self, slot: int, form: ServingForm) -> None:
        if not any(m for s, m in enumerate(self.slot_modules) if s != slot):  # empty but for this slot's occupant
            if form.group != self.group:  # an empty pool takes the new group size: scales are shaped by it
                self.clear(slot)
                self.tensors.clear()
                self.version += 1
            self.group = form.group
        elif form.group != self.group:
            raise ValueError(f"pool {self.name!r}: group size {form.group} differs from the pool's {self.group}")
        for key, src in form.modules.items():
            held = self.tensors.get(key)
            if held is None or GAIN in src:
                continue
            R, D = held["bits"].shape[1], held["data"].shape[1] - DATA_PAD
            if src["bits"].shape[0] > R or src["data"].numel() > D:
                self._regrow(key, self._sized(src, max(R, src["bits"].shape[0]), max(D, src["data"].numel())))
        super().write(slot, form)

    def _write_module(self, slot, dst, src):
        if GAIN in dst:
            dst[GAIN][slot] = src[GAIN]
            return
        r = src["bits"].shape[0]
        for name, t in src.items():
            if name == "data":
                dst[name][slot, :t.numel()] = t
            else:
                dst[name][slot, :r] = t
        if r < dst["bits"].shape[1]:  # a slot's first 0 bits ends its rows: what lies past it is never read
            dst["bits"][slot, r:].zero_()

    def _clear_module(self, slot, dst):
        for t in dst.values():
            t[slot].zero_()


class ElementwisePool(Pool):
    """RoAd-style adapters that share one group size G (= width)."""

    family = ELEMENTWISE
    width_rule = "must be a positive even integer (the group size G)"

    @staticmethod
    def width_ok(width: int) -> bool:
        return width >= 2 and width % 2 == 0

    @classmethod
    def specs_for(cls, widths: list[int]) -> list[PoolSpec]:
        return [PoolSpec(f"{cls.family}-g{G}", cls.family, widths.count(G), G) for G in sorted(set(widths))]

    def accepts(self, form: ServingForm) -> bool:
        return form.family == ELEMENTWISE and form.width == self.width

    def _allocate(self, key: ModuleKey, src: dict[str, Tensor]) -> dict[str, Tensor]:
        out_f, _ = self.cfg.linear_shape(key[1])
        n = self.slots + 1
        return {"c": torch.ones(n, out_f, dtype=self.dtype), "s": torch.zeros(n, out_f, dtype=self.dtype)}

    def _write_module(self, slot, dst, src):
        dst["c"][slot] = src["c"]
        dst["s"][slot] = src["s"]

    def _clear_module(self, slot, dst):
        dst["c"][slot].fill_(1)
        dst["s"][slot].zero_()


class SparsePool(Pool):
    """Sparse additive adapters sharing one mask per projection (PaFi tenants of one base and density; width =
    the density in ppm). The mask comes with the first adapter written; a later adapter whose indices differ is
    refused (ValueError), never mixed in."""

    family = SPARSE

    @classmethod
    def specs_for(cls, widths: list[int]) -> list[PoolSpec]:
        return [PoolSpec(f"{cls.family}-{w}ppm", cls.family, widths.count(w), w) for w in sorted(set(widths))]

    def accepts(self, form: ServingForm) -> bool:
        return form.family == SPARSE and form.width == self.width

    def _allocate(self, key: ModuleKey, src: dict[str, Tensor]) -> dict[str, Tensor]:
        nnz = src["values"].numel()
        return {"values": torch.zeros(self.slots + 1, nnz, dtype=self.dtype), "cols": src["cols"],
                "row_ptr": src["row_ptr"]}

    @torch.inference_mode()
    def write(self, slot: int, form: ServingForm) -> None:
        for key, src in form.modules.items():  # checked before any slot tensor changes
            held = self.tensors.get(key)
            if held is None or (held["cols"] is src["cols"] and held["row_ptr"] is src["row_ptr"]):
                continue
            if not (torch.equal(held["cols"], src["cols"]) and torch.equal(held["row_ptr"], src["row_ptr"])):
                raise ValueError(f"pool {self.name!r}: layers.{key[0]}.{key[1]}: this adapter's sparsity mask differs "
                                 f"from the pool's (PaFi tenants in one pool share the mask of one base and density)")
        super().write(slot, form)

    def _write_module(self, slot, dst, src):
        dst["values"][slot] = src["values"]

    def _clear_module(self, slot, dst):
        dst["values"][slot].zero_()

    @torch.inference_mode()
    def clear(self, slot: int) -> None:
        """Free a slot; when the pool holds no adapter any more it also lets go of its mask, so the next adapter
        placed brings its own (a refused or evicted tenant cannot pin a mask on an empty pool)."""
        super().clear(slot)
        if not any(self.slot_modules):
            self.tensors.clear()
            self.version += 1

    @property
    def nbytes(self) -> int:
        return sum(m["values"].numel() * m["values"].element_size() for m in self.tensors.values())


class NormPool(Pool):
    """RMSNorm gain changes (HiWi tenants), one (H,) row per slot and adapted norm; width 1."""

    family = NORM

    @classmethod
    def specs_for(cls, widths: list[int]) -> list[PoolSpec]:
        return [PoolSpec(cls.family, cls.family, len(widths), 1)]

    def accepts(self, form: ServingForm) -> bool:
        return form.family == NORM

    def _allocate(self, key: ModuleKey, src: dict[str, Tensor]) -> dict[str, Tensor]:
        return {"delta": torch.zeros(self.slots + 1, self.cfg.hidden_size, dtype=self.dtype)}

    def _write_module(self, slot, dst, src):
        dst["delta"][slot] = src["delta"]

    def _clear_module(self, slot, dst):
        dst["delta"][slot].zero_()


def _check_pool_class(family: str, cls: type[Pool]) -> None:
    if family not in SLOT_TENSORS:
        raise ValueError(f"pool class {cls.__name__}: family={family!r}: must be one of {sorted(SLOT_TENSORS)}")


POOL_CLASSES: Registry[type[Pool]] = Registry("pool class for family", _check_pool_class)


def register_pool_class(cls: type[Pool]) -> type[Pool]:
    return POOL_CLASSES.register(cls.family, cls)


register_pool_class(AdditivePool)
register_pool_class(QAdditivePool)
register_pool_class(ElementwisePool)
register_pool_class(SparsePool)
register_pool_class(NormPool)


def pool_specs_for(shapes: Iterable[tuple[str, int]]) -> tuple[PoolSpec, ...]:
    """Pools that keep every adapter of `shapes` ((family, width) of each, e.g. of its `ServingForm`) resident at
    once: per family in `POOL_CLASSES` order, as that family's pool class sizes them."""
    widths: dict[str, list[int]] = {}
    for family, width in shapes:
        if family not in POOL_CLASSES:
            raise ValueError(f"family={family!r}: must be one of {sorted(POOL_CLASSES)}")
        widths.setdefault(family, []).append(width)
    return tuple(spec for family, cls in POOL_CLASSES.items() if family in widths
                 for spec in cls.specs_for(widths[family]))


@dataclass
class PoolStep:
    """One pool's share of a step's batch, computed once per step (`layout.BatchLayout`), read by every layer."""

    pool: Pool
    index: Tensor  # (N,) long: pool row of each token (pool.null for non-members)
    members: Tensor | None  # (M,) long: tokens that use this pool; None when all N do
    order: Tensor  # (M,) long: member tokens sorted by slot (stable), the grouped-matmul order
    offs: Tensor  # (G,) int32: cumulative member counts of slots 0..G-1, G = highest slot in use + 1
    width: int  # widest rank (additive) among members
    modules: frozenset[ModuleKey]  # projections adapted by at least one member
    distinct: int = 0  # distinct slots in use (the number of segments)

    @property
    def segments(self) -> list[tuple[int, Tensor]]:
        """(slot, token indices) per distinct slot in use, in slot order."""
        counts = torch.diff(self.offs, prepend=self.offs.new_zeros(1)).tolist()
        parts = torch.split(self.order, counts)
        return [(slot, part) for slot, part in enumerate(parts) if part.numel()]
