"""An adapter in memory: its typed config and per-projection parameters, plus single-adapter application.

`Adapter.params[(layer, proj)]` holds that projection's parameters (names per kind, e.g. LoRA's A and B).
Projections without an entry are untouched. Applying one adapter to a whole forward is `adapter.hook()`,
a `ProjectionHook` for `Transformer.forward`; the serving engine builds batched hooks from the same kind
functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from deltafleet.adapters.registry import AdapterConfig, AdapterKind, Params, get_kind
from deltafleet.models.config import NORMS, ModelConfig
from deltafleet.models.llama import ProjectionHook, Transformer

ModuleKey = tuple[int, str]


@dataclass
class Adapter:
    config: AdapterConfig
    params: dict[ModuleKey, Params] = field(default_factory=dict)

    @property
    def kind(self) -> AdapterKind:
        return get_kind(self.config.kind)

    @property
    def nbytes(self) -> int:
        """The tenant's own bytes: its parameters but those its kind shares across tenants (`shared_params`)."""
        shared = self.kind.shared_params
        return sum(t.numel() * t.element_size() for p in self.params.values() for n, t in p.items()
                   if n not in shared)

    @property
    def num_params(self) -> int:
        return sum(t.numel() for p in self.params.values() for t in p.values())

    @property
    def layers(self) -> list[int]:
        return sorted({layer for layer, _ in self.params})

    def to(self, dtype: torch.dtype) -> Adapter:
        """Floating-point parameters cast to dtype; integer ones (packed codes, indices) kept as stored."""
        return Adapter(self.config, {k: {n: t.to(dtype) if t.is_floating_point() else t for n, t in p.items()}
                                     for k, p in self.params.items()})

    def hook(self) -> ProjectionHook:
        kind, cfg, params = self.kind, self.config, self.params

        def apply(layer: int, proj: str, x: Tensor, y: Tensor) -> Tensor:
            p = params.get((layer, proj))
            return y if p is None else kind.apply(cfg, p, x, y)

        apply.norms = any(name in NORMS for _, name in params)  # the model calls it for its RMSNorms too
        return apply

    def check_shapes(self, model_cfg: ModelConfig, source: str = "adapter") -> None:
        """Raise ValueError naming the projection and tensor whose shape does not fit `model_cfg`."""
        for (layer, proj), p in self.params.items():
            if not 0 <= layer < model_cfg.num_layers:
                raise ValueError(f"{source}: layer {layer} out of range (model has {model_cfg.num_layers})")
            want = self.kind.param_shapes(self.config, *model_cfg.module_shape(proj))
            for name, shape in want.items():
                got = tuple(p[name].shape) if name in p else None
                if got != shape:
                    raise ValueError(
                        f"{source}: layers.{layer}.{proj}.{name} has shape {got}, expected {shape} for this base"
                    )


def random_adapter(model_cfg: ModelConfig, config: AdapterConfig, *, identity: bool = False, seed: int = 0,
                   layers: list[int] | None = None) -> Adapter:
    """An adapter over `config.targets` of `layers` (default all). identity=False gives a non-trivial one."""
    g = torch.Generator().manual_seed(seed)
    kind = get_kind(config.kind)
    params = {}
    for layer in range(model_cfg.num_layers) if layers is None else layers:
        for proj in config.targets:
            params[(layer, proj)] = kind.init_params(config, *model_cfg.module_shape(proj), identity=identity,
                                                     generator=g)
    return Adapter(config, params)


@torch.no_grad()
def merge_adapter(model: Transformer, adapter: Adapter) -> None:
    """Fold the adapter into the model's weights in place (zero-latency serving of one tenant)."""
    _fold(model, adapter, adapter.kind.merge)


@torch.no_grad()
def unmerge_adapter(model: Transformer, adapter: Adapter) -> None:
    """Undo `merge_adapter` (exact up to floating-point rounding)."""
    _fold(model, adapter, adapter.kind.unmerge)


def _fold(model: Transformer, adapter: Adapter, fn) -> None:
    for (layer, proj), p in adapter.params.items():
        lin = model.module(layer, proj)  # a projection, or an RMSNorm (its gain is the weight, no bias)
        bias = getattr(lin, "bias", None)
        w, b = fn(adapter.config, p, lin.weight.data, None if bias is None else bias.data)
        lin.weight.data = w.to(lin.weight.dtype).contiguous()
        if b is not None:
            lin.bias.data = b.to(lin.bias.dtype).contiguous()
