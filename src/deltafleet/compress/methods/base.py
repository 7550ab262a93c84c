"""The compression-method registry and the typed settings every method reads.

A method turns a `DeltaSet` into an `Adapter` of one of the kinds in `deltafleet.adapters`, module by module
(projections and tables), within `DeltaSet.budgets(ratio)` bytes per module; the pipeline adds the exact gains.
Methods register themselves with `register_method`;
the pipeline never dispatches on method names.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, ClassVar

from torch import Tensor

from deltafleet.adapters import Adapter
from deltafleet.adapters.qlowrank import U_GROUPS
from deltafleet.compress.alloc import ALLOC_PER, ALLOC_WEIGHTS
from deltafleet.compress.budget import ALLOC_PLAN, parse_plan
from deltafleet.compress.delta import DeltaSet
from deltafleet.errors import DeltafleetError
from deltafleet.models.llama import Transformer
from deltafleet.registry import Registry

QUANTIZERS = ("gptq", "rtn")


@dataclass(frozen=True)
class CompressSettings:
    """
    method: a name in METHODS. ratio: compressed bytes / fp16 bytes of the whole delta (projections, tables,
    gains), in (0, 1].
    plan: delta-come's bits per singular vector: 'alloc' (default) allocated per vector, module shape and part on
    measured errors (compress.alloc); 'auto' the paper's fixed bands ('8:2,3:32,2:*' at 1/16, see compress.budget);
    or explicit bands, highest bits first. Other methods ignore it.
    group_size: quantization group G (columns per scale and zero point). quantizer: gptq (calibrated) or rtn.
    u_groups: delta-come's U grouped along the rank ('rank', per output row) or along out ('out'); see budget.
    damp, act_order: GPTQ settings (paper: 0.01, act-order). seed: DARE's drop mask.
    distill_steps, distill_lr: BitDelta scale distillation on calibration text (0 steps: off).
    alloc_weight: how `plan='alloc'` weighs a module's relative error (`compress.alloc.ALLOC_WEIGHTS`).
    alloc_per: `plan='alloc'` gives every module its own plan ('matrix') or one per module shape ('shape').
    """

    method: str
    ratio: float = 1 / 16
    plan: str = "alloc"
    group_size: int = 128
    u_groups: str = "out"
    quantizer: str = "gptq"
    damp: float = 0.01
    act_order: bool = True
    seed: int = 0
    distill_steps: int = 0
    distill_lr: float = 1e-4
    alloc_weight: str = "size"
    alloc_per: str = "shape"
    schema_version: ClassVar[int] = 1

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: must be one of {sorted(METHODS)}")
        if not 0 < self.ratio <= 1:
            raise ValueError(f"ratio={self.ratio!r}: must lie in (0, 1]")
        if self.plan.strip() != ALLOC_PLAN:
            parse_plan(self.plan)
        if self.group_size < 1:
            raise ValueError(f"group_size={self.group_size!r}: must be a positive integer")
        if self.u_groups not in U_GROUPS:
            raise ValueError(f"u_groups={self.u_groups!r}: must be one of {U_GROUPS}")
        if self.alloc_weight not in ALLOC_WEIGHTS:
            raise ValueError(f"alloc_weight={self.alloc_weight!r}: must be one of {ALLOC_WEIGHTS}")
        if self.alloc_per not in ALLOC_PER:
            raise ValueError(f"alloc_per={self.alloc_per!r}: must be one of {ALLOC_PER}")
        if self.quantizer not in QUANTIZERS:
            raise ValueError(f"quantizer={self.quantizer!r}: must be one of {QUANTIZERS}")
        if not 0 <= self.damp < 1:
            raise ValueError(f"damp={self.damp!r}: must lie in [0, 1)")
        if self.distill_steps < 0 or self.distill_lr <= 0:
            raise ValueError(f"distill_steps={self.distill_steps}, distill_lr={self.distill_lr}: "
                             f"need steps >= 0 and lr > 0")

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": self.schema_version, **asdict(self)}


@dataclass
class Context:
    """What a method may read besides the deltas: the base model, calibration token ids (N, T) and the
    Hessians of each projection's input (computed on demand by the pipeline), and a per-module tick."""

    model: Transformer | None = None
    calib_ids: Tensor | None = None
    hessians: dict[tuple[int, str], Tensor] | None = None
    tick: Callable[[], None] = field(default=lambda: None)


class Method(ABC):
    name: ClassVar[str]
    needs_calibration: ClassVar[Callable[[CompressSettings], bool]] = staticmethod(lambda s: False)  # token ids
    needs_hessians: ClassVar[Callable[[CompressSettings], bool]] = staticmethod(lambda s: False)  # H per input
    servable: ClassVar[bool] = True  # the engine serves its kind (else: export/merge only)
    slack_bytes: ClassVar[int] = 0  # bytes a module may exceed the budget by (a fixed-size format's overhead)
    charges_gains: ClassVar[bool] = True  # the tables pay for the exact gains (`DeltaSet.budgets`)

    @abstractmethod
    def compress(self, ds: DeltaSet, s: CompressSettings, ctx: Context) -> Adapter:
        """An adapter whose every module fits the byte budget (the pipeline checks it)."""

    def module_budgets(self, ds: DeltaSet, s: CompressSettings, adapter: Adapter) -> dict[tuple[int, str], int]:
        """Each module's byte budget (the pipeline checks every module against it, and their sum against the whole
        delta's budget): `DeltaSet.budgets` unless the method allocates bytes across modules."""
        return ds.budgets(s.ratio, self.charges_gains)


METHODS: Registry[Method] = Registry("compression method")


def register_method(method: Method) -> Method:
    if not getattr(method, "name", None):
        raise TypeError(f"compression method {type(method).__name__} must define name")
    return METHODS.register(method.name, method)


def get_method(name: str) -> Method:
    try:
        return METHODS[name]
    except KeyError:
        raise DeltafleetError(f"method={name!r}: must be one of {sorted(METHODS)}") from None
