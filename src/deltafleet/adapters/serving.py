"""Serving forms: how an adapter kind is laid out in the engine's batched slot pools (`deltafleet.serve.engine`
builds its pools from these; this module knows nothing of pools).

Every served kind reduces, per projection, to one family that batches without per-adapter matmuls over the base
weights:
- additive:    y += B^T (A x)                       A (R, in), B (R, out)   width R (LoRA: scale folded into B)
- elementwise: y  = y * c + rotate_half_G(y) * s     c, s (out,)             width G (RoAd group size)
- norm:        y += n * delta                       delta (H,) per RMSNorm       width 1 (HiWi: n is the norm's
               normalised input, y its output: the gain g becomes g + delta)
- sparse:      y += dW x, dW in CSR: values (nnz,), cols (nnz,), row_ptr (out+1,)   width: density in ppm
               (PaFi: every tenant of one base and density shares cols/row_ptr, the mask; a slot holds values)

A kind says how it is served by `AdapterKind.serving_form(cfg, params) -> ServingParams`, one projection at a
time, in its own package; None (the default) means merge-only (`deltafleet merge`), e.g. bitdelta and sparse.

A whole fine-tune's delta (`Adapter` docstring) is served in the additive family: its tables are additive modules
like the projections (key `(MODEL_LAYER, "lm_head")`: A (R, H), B (R, V); at the embedding lookup a token t adds
B[:, t] @ A), and each RMSNorm gain delta is one more module of the same form, {"delta": (H,)}, applied as the
norm family applies it. One tenant thus stays one slot of one pool.

Host memory keeps an adapter in serving form (`ServingForm`), or, for kinds with `compact = True` (quantized
low-rank deltas), as loaded (`CompactForm`, about its stored bytes), building the slot contents only when the
adapter is written into a slot (`materialize`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deltafleet.adapters.adapter import Adapter, ModuleKey
from deltafleet.adapters.registry import KINDS
from deltafleet.models.config import MODEL_LAYER

ADDITIVE, ELEMENTWISE, SPARSE, NORM = "additive", "elementwise", "sparse", "norm"
GAIN = "delta"  # the one tensor of a norm module, in the norm family and beside additive modules
SLOT_TENSORS: dict[str, tuple[str, ...]] = {ADDITIVE: ("A", "B"), ELEMENTWISE: ("c", "s"),
                                            SPARSE: ("values", "cols", "row_ptr"),
                                            NORM: ("delta",)}  # family -> slot tensors


@dataclass(frozen=True)
class ServingParams:
    """One projection's slot contents. family: a key of `SLOT_TENSORS`; width: rank R (additive) or group size G
    (elementwise), density in ppm (sparse); tensors: the family's slot tensors (shapes in the module docstring),
    fp32, integer index tensors as they are."""

    family: str
    width: int
    tensors: dict[str, Tensor]

    def __post_init__(self) -> None:
        if self.family not in SLOT_TENSORS:
            raise ValueError(f"family={self.family!r}: must be one of {sorted(SLOT_TENSORS)}")
        if sorted(self.tensors) != sorted(SLOT_TENSORS[self.family]):
            raise ValueError(f"tensors={sorted(self.tensors)}: {self.family} slots hold "
                             f"{list(SLOT_TENSORS[self.family])}")


@dataclass
class ServingForm:
    """A whole adapter in serving form. family, width: as in `ServingParams` (width: the widest projection; a
    table's rank is not counted)."""

    family: str
    width: int
    modules: dict[ModuleKey, dict[str, Tensor]]

    @property
    def nbytes(self) -> int:
        """Bytes of the floating-point tensors: integer index tensors (a sparse family's mask) are shared by every
        tenant of the mask and are not counted per tenant."""
        return sum(t.numel() * t.element_size() for m in self.modules.values() for t in m.values()
                   if t.is_floating_point())

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


def served_kinds() -> list[str]:
    """Names of the registered kinds that have a serving form."""
    return sorted(n for n, k in KINDS.items() if k.served)


def to_serving_form(adapter: Adapter, dtype: torch.dtype) -> ServingForm:
    kind, cfg = adapter.kind, adapter.config
    modules, family, width = {}, None, 0
    for key, params in adapter.params.items():
        sp = kind.serving_form(cfg, params)
        if sp is None:
            raise ValueError(f"adapter kind {cfg.kind!r} is not served (no serving form; served kinds: "
                             f"{served_kinds()}); merge it into the base instead (deltafleet merge)")
        if family not in (None, sp.family):
            raise ValueError(f"adapter kind {cfg.kind!r}: layers.{key[0]}.{key[1]} is served {sp.family}, an "
                             f"earlier projection {family}; one adapter is served in one family")
        family = sp.family
        if key[0] != MODEL_LAYER:  # a table's rank is its own: the pool sizes its table tensors by it
            width = max(width, sp.width)
        modules[key] = {n: (t.to(dtype) if t.is_floating_point() else t).contiguous() for n, t in sp.tensors.items()}
    if adapter.gains and family != ADDITIVE:
        raise ValueError(f"adapter kind {cfg.kind!r}: RMSNorm gain deltas are served beside additive modules only; "
                         f"this adapter is served {family}")
    for key, g in adapter.gains.items():
        modules[key] = {GAIN: g.to(dtype).contiguous()}
    return ServingForm(family or ADDITIVE, width, modules)


def host_forms(adapter: Adapter, dtype: torch.dtype) -> tuple[ServingForm | CompactForm, ServingForm]:
    """(what the host-memory cache keeps, the serving form): for compact kinds the adapter as loaded, whose serving
    form is built here to validate it and learn its family and width (the caller may keep it for a slot copy)."""
    form = to_serving_form(adapter, dtype)
    if adapter.kind.compact:
        return CompactForm(form.family, form.width, adapter, dtype), form
    return form, form


def host_form(adapter: Adapter, dtype: torch.dtype) -> ServingForm | CompactForm:
    """What the host-memory cache keeps (`host_forms`'s first)."""
    return host_forms(adapter, dtype)[0]
