"""The adapter-kind registry: one entry per kind (LoRA, RoAd, low-rank delta), filled by each kind's package.

A kind is a bundle of pure functions over one projection's parameters (STYLE principle 2):

    apply(cfg, params, x (..., in), y (..., out)) -> y'  (..., out)   adapted output, y = W x + b
    delta_weight(cfg, params, W (out, in)) -> dW (out, in)             W_merged = W + dW
    merge(cfg, params, W, b) -> (W', b')       unmerge(cfg, params, W', b') -> (W, b)

plus the shapes of its parameters and an initialiser. Merge, serving and compression all reuse them. A kind
the engine serves in mixed batches also says how, per projection (`serving_form`, see `adapters.serving`).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor

from deltafleet.models.config import PROJECTIONS
from deltafleet.registry import Registry

if TYPE_CHECKING:
    from deltafleet.adapters.serving import ServingParams

Params = dict[str, Tensor]


@dataclass(frozen=True)
class AdapterConfig:
    """Fields every kind shares. `targets`: which of the seven projections carry the adapter."""

    targets: tuple[str, ...] = ("q_proj", "v_proj")
    kind: ClassVar[str] = ""

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("targets: must name at least one projection")
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if unknown:
            raise ValueError(f"targets: unknown projection {unknown[0]!r}; must be among {PROJECTIONS}")

    @property
    def summary(self) -> str:
        """Short description of the kind-specific settings (rank, variant, ...)."""
        return ""

    def to_dict(self) -> dict[str, Any]:
        from dataclasses import asdict

        d = asdict(self)
        d["targets"] = list(self.targets)
        return {"kind": self.kind, **d}


class AdapterKind(ABC):
    """One adapter family's math. Subclasses hold no state; instances live in `KINDS`."""

    name: ClassVar[str]
    config_cls: ClassVar[type[AdapterConfig]]
    param_names: ClassVar[tuple[str, ...]]
    # Served kinds only: host memory keeps the adapter as loaded (e.g. packed codes), its slot contents are built
    # when it is written into a slot.
    compact: ClassVar[bool] = False
    # Parameters every adapter of the kind shares (PaFi's mask: one copy per base and density, not a tenant's bytes).
    shared_params: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def param_shapes(self, cfg: AdapterConfig, out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
        """Shapes of one projection's parameters."""

    def module_param_shapes(self, cfg: AdapterConfig, out_features: int, in_features: int,
                            module: str) -> dict[str, tuple[int, ...]]:
        """Shapes of one named module's parameters (`param_shapes` unless the config gives modules their own, as
        qlowrank's per-matrix band plans do)."""
        return self.param_shapes(cfg, out_features, in_features)

    @abstractmethod
    def init_params(self, cfg: AdapterConfig, out_features: int, in_features: int, *, identity: bool,
                    generator: torch.Generator) -> Params:
        """identity=True: the adapter leaves the projection unchanged (training start); else a random one."""

    @abstractmethod
    def apply(self, cfg: AdapterConfig, params: Params, x: Tensor, y: Tensor) -> Tensor:
        """Adapted output of one projection, from its input x (..., in) and base output y (..., out)."""

    @abstractmethod
    def delta_weight(self, cfg: AdapterConfig, params: Params, weight: Tensor) -> Tensor:
        """dW (out, in) with apply(x, W x) == (W + dW) x for a bias-free projection."""

    def merge(self, cfg: AdapterConfig, params: Params, weight: Tensor,
              bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        """Weights that compute apply() without the adapter. Additive kinds leave the bias alone."""
        return weight + self.delta_weight(cfg, params, weight).to(weight.dtype), bias

    def unmerge(self, cfg: AdapterConfig, params: Params, weight: Tensor,
                bias: Tensor | None) -> tuple[Tensor, Tensor | None]:
        return weight - self.delta_weight(cfg, params, weight).to(weight.dtype), bias

    def serving_form(self, cfg: AdapterConfig, params: Params) -> ServingParams | None:
        """One projection's slot contents for the serving engine (`adapters.serving`); None: merge-only."""
        return None

    def quantized_form(self, cfg: AdapterConfig, params: Params) -> ServingParams | None:
        """One projection's slot contents in the qadditive family (`adapters.qadditive`: kept as stored, dequantized
        by the kernel as it reads them), or None (the default): served in `serving_form`'s family only."""
        return None

    def check_serving(self, cfg: AdapterConfig, params: Params) -> None:
        """Raise ValueError if `serving_form` would: what a reader checks of a compact kind's stored tensors. The
        default builds the form; a kind may check the stored tensors without building it (cheaper)."""
        self.serving_form(cfg, params)

    @property
    def served(self) -> bool:
        """Whether the kind has a serving form (overrides `serving_form`)."""
        return type(self).serving_form is not AdapterKind.serving_form

    def config_from_dict(self, d: dict[str, Any]) -> AdapterConfig:
        d = {k: v for k, v in d.items() if k != "kind"}
        d["targets"] = tuple(d.get("targets", ()))
        return self.config_cls(**d)


def _check_kind(name: str, kind: AdapterKind) -> None:
    """Checked at registration, so a broken plugin fails at import, not mid-request."""
    if kind.config_cls.kind != kind.name:
        raise TypeError(f"{kind.config_cls.__name__}.kind={kind.config_cls.kind!r} != kind name {kind.name!r}")
    if kind.compact and not kind.served:
        raise TypeError(f"adapter kind {kind.name!r}: compact=True needs a serving_form (merge-only kinds are not "
                        f"kept in host memory)")


KINDS: Registry[AdapterKind] = Registry("adapter kind", _check_kind)


def register_kind(kind: AdapterKind) -> AdapterKind:
    for attr in ("name", "config_cls", "param_names"):
        if not getattr(kind, attr, None):
            raise TypeError(f"adapter kind {type(kind).__name__} must define {attr}")
    return KINDS.register(kind.name, kind)


def get_kind(name: str) -> AdapterKind:
    return KINDS.lookup(name)
