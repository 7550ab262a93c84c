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
- qadditive:   y += B^T (A x) as additive, A and B kept quantized as stored (`adapters.qadditive`)   width R,
               and the group size G of its scales

A kind says how it is served by `AdapterKind.serving_form(cfg, params) -> ServingParams`, one projection at a
time, in its own package; None (the default) means merge-only (`deltafleet merge`), e.g. bitdelta and sparse.

A whole fine-tune's delta (`Adapter` docstring) is served in the additive family: its tables are additive modules
like the projections (key `(MODEL_LAYER, "lm_head")`: A (R, H), B (R, V); at the embedding lookup a token t adds
B[:, t] @ A), and each RMSNorm gain delta is one more module of the same form, {"delta": (H,)}, applied as the
norm family applies it. One tenant thus stays one slot of one pool.

Host memory keeps an adapter in serving form (`ServingForm`). A kind with `compact = True` (quantized low-rank
deltas) may also say how it is served quantized (`AdapterKind.quantized_form`, the qadditive family): when the
engine has a qadditive pool, that form, about the stored bytes, is what host memory keeps and the slot holds;
otherwise host memory keeps the adapter as loaded (`CompactForm`) and builds its expanded additive slot contents
only when it is written into a slot (`materialize`).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor

from deltafleet.adapters.adapter import Adapter, ModuleKey
from deltafleet.adapters.qadditive import QADDITIVE, QTENSORS
from deltafleet.adapters.registry import KINDS
from deltafleet.models.config import MODEL_LAYER

ADDITIVE, ELEMENTWISE, SPARSE, NORM = "additive", "elementwise", "sparse", "norm"
GAIN = "delta"  # the one tensor of a norm module, in the norm family and beside additive modules
SLOT_TENSORS: dict[str, tuple[str, ...]] = {ADDITIVE: ("A", "B"), ELEMENTWISE: ("c", "s"),
                                            SPARSE: ("values", "cols", "row_ptr"),
                                            NORM: ("delta",), QADDITIVE: QTENSORS}  # family -> slot tensors
SHARED_TENSORS = ("cols", "row_ptr")  # shared by every tenant of a pool (a sparse family's mask)
WITH_GAINS = (ADDITIVE, QADDITIVE)  # families a whole fine-tune's RMSNorm gain deltas are served beside


@dataclass(frozen=True)
class ServingParams:
    """One projection's slot contents. family: a key of `SLOT_TENSORS`; width: rank R (additive, qadditive) or
    group size G (elementwise), density in ppm (sparse); tensors: the family's slot tensors (shapes in the module
    docstring), fp32, integer tensors as they are; group: the qadditive family's group size (0 for the others)."""

    family: str
    width: int
    tensors: dict[str, Tensor]
    group: int = 0

    def __post_init__(self) -> None:
        if self.family not in SLOT_TENSORS:
            raise ValueError(f"family={self.family!r}: must be one of {sorted(SLOT_TENSORS)}")
        if sorted(self.tensors) != sorted(SLOT_TENSORS[self.family]):
            raise ValueError(f"tensors={sorted(self.tensors)}: {self.family} slots hold "
                             f"{list(SLOT_TENSORS[self.family])}")


@dataclass
class ServingForm:
    """A whole adapter in serving form. family, width, group: as in `ServingParams` (width: the widest projection;
    a table's rank is not counted)."""

    family: str
    width: int
    modules: dict[ModuleKey, dict[str, Tensor]]
    group: int = 0

    @cached_property
    def nbytes(self) -> int:
        """Bytes of the tenant's own tensors: a sparse family's mask (`SHARED_TENSORS`) is shared by every tenant
        of the mask and is not counted per tenant. Computed once (a form is not changed once built; the host cache
        sums every form's bytes at each load)."""
        return sum(t.numel() * t.element_size() for m in self.modules.values() for n, t in m.items()
                   if n not in SHARED_TENSORS)

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

    @cached_property
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
    return _with_gains(adapter, dtype, ServingForm(family or ADDITIVE, width, modules))


def _with_gains(adapter: Adapter, dtype: torch.dtype, form: ServingForm) -> ServingForm:
    if adapter.gains and form.family not in WITH_GAINS:
        raise ValueError(f"adapter kind {adapter.config.kind!r}: RMSNorm gain deltas are served beside additive "
                         f"modules only; this adapter is served {form.family}")
    for key, g in adapter.gains.items():
        form.modules[key] = {GAIN: g.to(dtype).contiguous()}
    return form


def to_quantized_form(adapter: Adapter, dtype: torch.dtype) -> ServingForm | None:
    """The adapter in the qadditive family (its stored codes, `adapters.qadditive`), or None when its kind, or one
    of its modules, has no quantized serving form. Gain deltas are cast to `dtype`."""
    kind, cfg = adapter.kind, adapter.config
    modules, width, groups = {}, 0, set()
    for key, params in adapter.params.items():
        sp = kind.quantized_form(cfg, params)
        if sp is None:
            return None
        groups.add(sp.group)
        if key[0] != MODEL_LAYER:
            width = max(width, sp.width)
        modules[key] = sp.tensors
    if len(groups) > 1:
        return None
    return _with_gains(adapter, dtype, ServingForm(QADDITIVE, width, modules, group=groups.pop() if groups else 0))


def host_forms(adapter: Adapter, dtype: torch.dtype,
               families: frozenset[str] = frozenset()) -> tuple[ServingForm | CompactForm, ServingForm]:
    """(what the host-memory cache keeps, the serving form). `families`: those the engine has pools of. A compact
    kind is kept quantized (one form for both) when a qadditive pool exists and the kind has that form; else as
    loaded, with its expanded serving form built here to validate it and learn its family and width (the caller
    may keep it for a slot copy)."""
    if adapter.kind.compact and QADDITIVE in families:
        quantized = to_quantized_form(adapter, dtype)
        if quantized is not None:
            return quantized, quantized
    form = to_serving_form(adapter, dtype)
    if adapter.kind.compact:
        return CompactForm(form.family, form.width, adapter, dtype), form
    return form, form


def host_form(adapter: Adapter, dtype: torch.dtype,
              families: frozenset[str] = frozenset()) -> ServingForm | CompactForm:
    """What the host-memory cache keeps (`host_forms`'s first)."""
    return host_forms(adapter, dtype, families)[0]
