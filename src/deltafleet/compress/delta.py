"""Deltas between a fine-tuned checkpoint and its base: Delta = W_finetuned - W_base per projection.

The seven projections of every decoder layer are compressed; every other parameter the fine-tune changed
(norms, embeddings, the LM head, biases) is returned as an exact "extra", stored as the fine-tune holds it.
Both checkpoints are read through `models.loading`, so names and shapes are validated against the config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from deltafleet.errors import DeltafleetError
from deltafleet.models.config import PROJECTIONS, ModelConfig
from deltafleet.models.llama import Transformer
from deltafleet.models.loading import read_checkpoint_tensors, resolve_base, validate_state

ModuleKey = tuple[int, str]


def projection_name(layer: int, proj: str) -> str:
    group = "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"
    return f"model.layers.{layer}.{group}.{proj}.weight"


@dataclass
class DeltaSet:
    """deltas[(layer, proj)] (out, in) fp32; extras: full fine-tuned tensors of other changed parameters."""

    config: ModelConfig
    deltas: dict[ModuleKey, Tensor]
    extras: dict[str, Tensor]
    base_path: Path

    @property
    def fp16_bytes(self) -> int:
        return sum(d.numel() * 2 for d in self.deltas.values())


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
    deltas, proj_names = {}, set()
    for layer in range(cfg.num_layers):
        for proj in PROJECTIONS:
            name = projection_name(layer, proj)
            proj_names.add(name)
            deltas[(layer, proj)] = ft_state[name].float() - base_state[name].float()
    extras = {name: t.clone() for name, t in ft_state.items()
              if name not in proj_names and not torch.equal(t.float(), base_state[name].float())}
    return DeltaSet(cfg, deltas, extras, base_path)


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
