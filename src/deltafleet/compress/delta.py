"""Deltas between a fine-tuned checkpoint and its base: the whole delta, every parameter the fine-tune changed.

- `deltas[(layer, proj)]`: Delta = W_finetuned - W_base of the seven projections of every decoder layer, and of
  the tables (`config.TABLES`, key `(MODEL_LAYER, name)`): the embedding / LM head (one `lm_head` table when the
  base ties them), each (V, H); all are compressed.
- `gains[(layer, norm)]`: the change of every RMSNorm gain (H,), kept exactly (fp16: 2 bytes an element).
- `extras`: any other changed parameter (biases), exact, as the fine-tune holds it (merged, not served).
Both checkpoints are read through `models.loading`, so names and shapes are validated against the config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor

from deltafleet.compress.budget import module_budgets
from deltafleet.errors import DeltafleetError
from deltafleet.models.config import GAIN_NORMS, MODEL_LAYER, NORMS, TABLES, ModelConfig
from deltafleet.models.llama import Transformer
from deltafleet.models.loading import read_checkpoint_tensors, resolve_base, validate_state

ModuleKey = tuple[int, str]


def projection_name(layer: int, proj: str) -> str:
    """The checkpoint name of a module's weight: a projection, a norm (`GAIN_NORMS`) or a table."""
    if layer == MODEL_LAYER:
        return {"embed_tokens": "model.embed_tokens.weight", "lm_head": "lm_head.weight",
                "norm": "model.norm.weight"}[proj]
    if proj in NORMS:
        return f"model.layers.{layer}.{proj}.weight"
    group = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{group}.{proj}.weight"


def weight_name(cfg: ModelConfig, key: ModuleKey) -> str:
    """`projection_name`, with a tied LM head read from the embedding table it shares."""
    if key == (MODEL_LAYER, "lm_head") and cfg.tie_word_embeddings:
        return projection_name(MODEL_LAYER, "embed_tokens")
    return projection_name(*key)


@dataclass
class DeltaSet:
    """deltas[(layer, proj)] (out, in) fp32 (projections and tables); gains[(layer, norm)] (H,) fp32;
    extras: full fine-tuned tensors of other changed parameters."""

    config: ModelConfig
    deltas: dict[ModuleKey, Tensor]
    extras: dict[str, Tensor]
    base_path: Path
    gains: dict[ModuleKey, Tensor] = field(default_factory=dict)

    @property
    def fp16_bytes(self) -> int:
        """The whole delta in fp16: projections, tables and gains (extras are not a delta)."""
        return sum(d.numel() * 2 for d in self.deltas.values()) + self.gains_fp16_bytes

    @property
    def gains_fp16_bytes(self) -> int:
        return sum(g.numel() * 2 for g in self.gains.values())

    def budgets(self, ratio: float, charge_gains: bool = True) -> dict[ModuleKey, int]:
        """Bytes each compressed module may store at `ratio` (`budget.module_budgets`); charge_gains=False: the
        gains are stored above the ratio (a fixed-rate format such as BitDelta's cannot give up bytes)."""
        shapes = {k: (d.shape[0], d.shape[1]) for k, d in self.deltas.items()}
        tables = {k for k in self.deltas if k[1] in TABLES}
        return module_budgets(shapes, tables, self.gains_fp16_bytes if charge_gains else 0, ratio)

    def shape_budgets(self, ratio: float, charge_gains: bool = True) -> dict[tuple[int, int], int]:
        """(out, in) -> the smallest budget of a module of that shape (kinds keep one band plan per shape)."""
        out: dict[tuple[int, int], int] = {}
        for k, b in self.budgets(ratio, charge_gains).items():
            shape = (self.deltas[k].shape[0], self.deltas[k].shape[1])
            out[shape] = min(b, out.get(shape, b))
        return out


def load_state(path: Path) -> tuple[ModelConfig, dict[str, Tensor]]:
    cfg = ModelConfig.from_file(path / "config.json")
    return cfg, validate_state(cfg, *read_checkpoint_tensors(path), path)


def extract_deltas(base: str | Path, finetuned: str | Path, progress=lambda _: None) -> DeltaSet:
    base_path = resolve_base(base, progress)
    ft_path = Path(finetuned)
    if not (ft_path / "config.json").is_file():
        raise DeltafleetError(f"finetuned={str(ft_path)!r}: not a checkpoint directory (no config.json)")
    cfg, base_state = load_state(base_path)
    ft_cfg, ft_state = load_state(ft_path)
    for name in ("hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "vocab_size"):
        if getattr(cfg, name) != getattr(ft_cfg, name):
            raise DeltafleetError(f"finetuned {ft_path}: {name}={getattr(ft_cfg, name)} but the base has "
                                  f"{getattr(cfg, name)}; a delta needs the same architecture")
    deltas, gains, names = {}, {}, set()
    for key in cfg.module_keys():
        name = weight_name(cfg, key)
        names.add(name)
        d = ft_state[name].float() - base_state[name].float()
        if key[1] in GAIN_NORMS or key[1] in TABLES:  # kept only if the fine-tune changed them
            if bool(d.any()):
                (gains if key[1] in GAIN_NORMS else deltas)[key] = d
        else:
            deltas[key] = d
    if cfg.tie_word_embeddings:
        names.add("lm_head.weight")
    extras = {name: t.clone() for name, t in ft_state.items()
              if name not in names and not torch.equal(t.float(), base_state[name].float())}
    return DeltaSet(cfg, deltas, extras, base_path, gains)


def apply_extras(model: Transformer, extras: dict[str, Tensor]) -> dict[str, Tensor]:
    """Put the fine-tune's extras in place of the model's parameters; returns the replaced tensors."""
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(set(extras) - set(params))
    if unknown:
        raise DeltafleetError(f"extra tensor {unknown[0]!r} is not a parameter of the model")
    saved = {n: params[n].data for n in extras}
    for n, t in extras.items():
        params[n].data = t.to(params[n].dtype)
    return saved


@contextlib.contextmanager
def swapped_extras(model: Transformer, extras: dict[str, Tensor]) -> Iterator[Transformer]:
    """Run with the fine-tune's extras in place of the base's parameters; restores them after."""
    saved = apply_extras(model, extras)
    try:
        yield model
    finally:
        apply_extras(model, saved)
