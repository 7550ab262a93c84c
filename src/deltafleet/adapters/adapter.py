"""An adapter in memory: its typed config and per-projection parameters, plus single-adapter application.

`Adapter.params[(layer, proj)]` holds that projection's parameters (names per kind, e.g. LoRA's A and B).
Projections without an entry are untouched. A whole fine-tune's delta also changes model-level modules: its
tables (`config.TABLES`, key `(MODEL_LAYER, name)`, a (V, H) delta in the LM head's orientation compressed by the
kind like any projection; when the base ties its LM head to the embedding, one `lm_head` table serves both) and
its RMSNorm gains, kept exactly beside any kind's parameters in `Adapter.gains[(layer, norm)]` (H,) (the final
norm: `(MODEL_LAYER, "norm")`), applied as y + n * delta (n: the norm's normalised input).
Applying one adapter to a whole forward is `adapter.hook()`,
a `ProjectionHook` for `Transformer.forward`; the serving engine builds batched hooks from the same kind
functions.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from deltafleet.adapters.registry import AdapterConfig, AdapterKind, Params, get_kind
from deltafleet.models.config import GAIN_NORMS, MODEL_LAYER, NORMS, TABLES, ModelConfig
from deltafleet.models.llama import ProjectionHook, Transformer

ModuleKey = tuple[int, str]


@dataclass
class Adapter:
    config: AdapterConfig
    params: dict[ModuleKey, Params] = field(default_factory=dict)
    gains: dict[ModuleKey, Tensor] = field(default_factory=dict)  # RMSNorm gain deltas (H,), any kind

    @property
    def model_level(self) -> bool:
        """Whether it changes model-level modules (a table, the final norm): the model calls its hook for them."""
        return any(layer == MODEL_LAYER for layer, _ in (*self.params, *self.gains))

    @property
    def kind(self) -> AdapterKind:
        return get_kind(self.config.kind)

    @property
    def nbytes(self) -> int:
        """The tenant's own bytes: its parameters but those its kind shares across tenants (`shared_params`)."""
        shared = self.kind.shared_params
        return sum(t.numel() * t.element_size() for p in self.params.values() for n, t in p.items()
                   if n not in shared) + self.gains_nbytes

    @property
    def parts_nbytes(self) -> dict[str, int]:
        """The tenant's own bytes per part of a whole fine-tune: projections (every decoder-layer module), tables,
        gains (those present)."""
        shared = self.kind.shared_params
        out: dict[str, int] = {}
        for key, p in self.params.items():
            part = part_of(key)
            out[part] = out.get(part, 0) + sum(t.numel() * t.element_size() for n, t in p.items() if n not in shared)
        if self.gains:
            out["gains"] = self.gains_nbytes
        return out

    @property
    def gains_nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.gains.values())

    @property
    def num_params(self) -> int:
        return sum(t.numel() for p in self.params.values() for t in p.values())

    @property
    def layers(self) -> list[int]:
        """The decoder layers it adapts (a table is not a layer)."""
        return sorted({layer for layer, _ in self.params if layer != MODEL_LAYER})

    def to(self, dtype: torch.dtype) -> Adapter:
        """Floating-point parameters cast to dtype; integer ones (packed codes, indices) kept as stored."""
        return Adapter(self.config, {k: {n: t.to(dtype) if t.is_floating_point() else t for n, t in p.items()}
                                     for k, p in self.params.items()},
                       {k: t.to(dtype) for k, t in self.gains.items()})

    def hook(self, model_cfg: ModelConfig | None = None) -> ProjectionHook:
        """This adapter over a whole forward. A table applies at the embedding lookup as its delta's rows, built
        once on the first lookup (from the serving form's factors for a served kind, else dense); an adapter with
        tables needs `model_cfg` (whether the LM head is tied, the table's shape)."""
        kind, cfg, params, gains = self.kind, self.config, self.params, self.gains
        if model_cfg is None and any(layer == MODEL_LAYER for layer, _ in params):
            raise ValueError("an adapter with a table delta needs model_cfg for its hook (is the LM head tied?)")
        lookup = embedding_table(model_cfg)
        rows: list[Tensor] = []  # the table delta's factors (A (R, H), B (R, V)), or [dense (V, H)]

        def embedding_delta(ids: Tensor) -> Tensor:
            if not rows:
                p = params[lookup]
                sp = kind.serving_form(cfg, p) if kind.served else None
                if sp is not None and sp.family == "additive":
                    rows.extend((sp.tensors["A"].float(), sp.tensors["B"].float()))
                else:
                    shape = model_cfg.module_shape(lookup[1])
                    rows.append(kind.delta_weight(cfg, p, torch.empty(shape, device="meta")).float())
            if len(rows) == 1:
                return rows[0][ids]
            A, B = rows
            return B[:, ids].movedim(0, -1) @ A  # (..., R) @ (R, H)

        def apply(layer: int, proj: str, x: Tensor, y: Tensor) -> Tensor:
            g = gains.get((layer, proj))
            if g is not None:
                return torch.addcmul(y, x, g.to(y.dtype))
            if (layer, proj) == (MODEL_LAYER, "embed_tokens"):
                return y if lookup not in params else y + embedding_delta(x).to(y.dtype)
            p = params.get((layer, proj))
            return y if p is None else kind.apply(cfg, p, x, y)

        apply.norms = any(name in NORMS for _, name in (*params, *gains))  # the model calls it for its RMSNorms too
        apply.model_level = self.model_level
        return apply

    def check_shapes(self, model_cfg: ModelConfig, source: str = "adapter") -> None:
        """Raise ValueError naming the projection and tensor whose shape does not fit `model_cfg`."""
        tables = (MODEL_LAYER, TABLES[1]) if model_cfg.tie_word_embeddings else None
        for (layer, proj), p in self.params.items():
            if layer == MODEL_LAYER and proj not in TABLES:
                raise ValueError(f"{source}: model-level module {proj!r}: a table delta must be one of {TABLES}")
            if layer == MODEL_LAYER and tables is not None and (layer, proj) != tables:
                raise ValueError(f"{source}: {proj!r}: this base ties its LM head to the embedding; one 'lm_head' "
                                 f"table delta serves both")
            if layer != MODEL_LAYER and not 0 <= layer < model_cfg.num_layers:
                raise ValueError(f"{source}: layer {layer} out of range (model has {model_cfg.num_layers})")
            want = self.kind.module_param_shapes(self.config, *model_cfg.module_shape(proj), module_name(layer, proj))
            for name, shape in want.items():
                got = tuple(p[name].shape) if name in p else None
                if got != shape:
                    raise ValueError(
                        f"{source}: {module_name(layer, proj)}.{name} has shape {got}, expected {shape} for this base"
                    )
        for (layer, name), g in self.gains.items():
            if name not in GAIN_NORMS or (layer == MODEL_LAYER) != (name not in NORMS) or not (
                    layer == MODEL_LAYER or 0 <= layer < model_cfg.num_layers):
                raise ValueError(f"{source}: gain delta {module_name(layer, name)}: not an RMSNorm of this base")
            if tuple(g.shape) != (model_cfg.hidden_size,):
                raise ValueError(f"{source}: gain delta {module_name(layer, name)} has shape {tuple(g.shape)}, "
                                 f"expected ({model_cfg.hidden_size},)")


PARTS = ("projections", "tables", "gains")  # the parts of a whole fine-tune's delta


def part_of(key: ModuleKey) -> str:
    """Which part of a whole delta a module belongs to (`PARTS`): a table, an RMSNorm gain, else a projection."""
    return "gains" if key[1] in GAIN_NORMS else "tables" if key[1] in TABLES else "projections"


def module_name(layer: int, name: str) -> str:
    """'layers.{layer}.{name}', or the bare name of a model-level module ('lm_head', 'norm')."""
    return name if layer == MODEL_LAYER else f"layers.{layer}.{name}"


def embedding_table(model_cfg: ModelConfig | None) -> ModuleKey:
    """The table whose delta applies at the embedding lookup: the LM head's when tied, else the embedding's own
    (None: no table)."""
    tied = model_cfg is None or model_cfg.tie_word_embeddings
    return (MODEL_LAYER, "lm_head" if tied else "embed_tokens")


def random_adapter(model_cfg: ModelConfig, config: AdapterConfig, *, identity: bool = False, seed: int = 0,
                   layers: list[int] | None = None, whole: bool = False) -> Adapter:
    """An adapter over `config.targets` of `layers` (default all). identity=False gives a non-trivial one.
    whole=True: a whole fine-tune's delta, also over the tables and with a gain delta for every RMSNorm."""
    g = torch.Generator().manual_seed(seed)
    kind = get_kind(config.kind)
    keys = [(layer, proj) for layer in (range(model_cfg.num_layers) if layers is None else layers)
            for proj in config.targets]
    gains = {}
    if whole:
        keys += [k for k in model_cfg.module_keys() if k[1] in TABLES]
        gains = {k: torch.zeros(model_cfg.hidden_size) if identity else
                 torch.randn(model_cfg.hidden_size, generator=g) * 0.05
                 for k in model_cfg.module_keys() if k[1] in GAIN_NORMS}
    params = {(layer, proj): kind.init_params(config, *model_cfg.module_shape(proj), identity=identity, generator=g)
              for layer, proj in keys}
    return Adapter(config, params, gains)


@torch.no_grad()
def merge_adapter(model: Transformer, adapter: Adapter) -> None:
    """Fold the adapter into the model's weights in place (zero-latency serving of one tenant)."""
    _fold(model, adapter, adapter.kind.merge, 1)


@torch.no_grad()
def unmerge_adapter(model: Transformer, adapter: Adapter) -> None:
    """Undo `merge_adapter` (exact up to floating-point rounding)."""
    _fold(model, adapter, adapter.kind.unmerge, -1)


def _fold(model: Transformer, adapter: Adapter, fn, sign: int) -> None:
    for (layer, name), g in adapter.gains.items():
        norm = model.module(layer, name)
        norm.weight.data = (norm.weight.data.float() + sign * g.float()).to(norm.weight.dtype)
    for (layer, proj), p in adapter.params.items():
        lin = model.module(layer, proj)  # a projection, or an RMSNorm (its gain is the weight, no bias)
        bias = getattr(lin, "bias", None)
        w, b = fn(adapter.config, p, lin.weight.data, None if bias is None else bias.data)
        lin.weight.data = w.to(lin.weight.dtype).contiguous()
        if b is not None:
            lin.bias.data = b.to(lin.bias.dtype).contiguous()
