"""Resolve a base model (embedded name or checkpoint directory) and load it into our `Transformer`.

A checkpoint directory is a Hugging Face Llama-family layout: `config.json`, `model.safetensors` or sharded
`model-0000N-of-0000M.safetensors` (+ index), and tokenizer files. Weights are read only from safetensors;
every tensor's name and shape is checked against the config before the model is built.

A quantized base (`deltafleet quantize`; recognised by its manifest, see `deltafleet.quant.base`) loads through
`deltafleet.quant.base.load_quantized_model`, with a `QuantLinear` for every projection; the dequantizing kernel is
`native` (a C dequantizer, falling back to `fast`) unless the environment variable DELTAFLEET_QUANT_KERNEL names
another (`reference`, `fast`, `cached`).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from deltafleet.errors import ArtifactError, DeltafleetError
from deltafleet.models.config import ModelConfig
from deltafleet.models.embedded import EMBEDDED, materialize
from deltafleet.models.llama import Transformer, rope_inv_freq
from deltafleet.store.safetensors_io import load_tensors, refuse_pickles

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise DeltafleetError(f"dtype={name!r}: must be one of {sorted(DTYPES)}")
    return DTYPES[name]


def resolve_base(name_or_path: str | Path, progress=lambda _: None) -> Path:
    """An embedded model's name (converted and cached on first use) or a checkpoint directory."""
    s = str(name_or_path)
    if s in EMBEDDED:
        return materialize(s, progress)
    path = Path(s).expanduser()
    if not path.exists():
        raise DeltafleetError(
            f"base {s!r}: neither an embedded model ({', '.join(sorted(EMBEDDED))}) nor an existing directory"
        )
    if not path.is_dir():
        raise ArtifactError(path, "a base model must be a checkpoint directory (config.json + *.safetensors)")
    return path


def expected_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        model = Transformer(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def read_checkpoint_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Path]]:
    """All tensors of a checkpoint directory, and the file each came from."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        refuse_pickles(path, "model.safetensors")
        raise ArtifactError(path, "no *.safetensors weight file in the checkpoint directory")
    tensors: dict[str, torch.Tensor] = {}
    sources: dict[str, Path] = {}
    for f in files:
        for k, v in load_tensors(f).items():
            tensors[k], sources[k] = v, f
    return tensors, sources


def validate_state(cfg: ModelConfig, tensors: dict[str, torch.Tensor], sources: dict[str, Path],
                   path: Path) -> dict[str, torch.Tensor]:
    """Check names and shapes against the config; returns the tensors the model takes."""
    want = expected_shapes(cfg)
    state = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        want.pop("lm_head.weight")
    missing = sorted(set(want) - set(state))
    if missing:
        raise ArtifactError(path, f"missing tensor {missing[0]!r} ({len(missing)} missing in all)")
    unexpected = sorted(set(state) - set(want))
    if unexpected:
        name = unexpected[0]
        raise ArtifactError(sources[name], f"unexpected tensor {name!r}: not part of a {cfg.model_type} model")
    for k, shape in want.items():
        if tuple(state[k].shape) != shape:
            raise ArtifactError(sources[k], f"tensor {k!r} has shape {tuple(state[k].shape)}, config implies {shape}")
    return state


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32,
               progress=lambda _: None) -> tuple[Transformer, Path]:
    """Load our Transformer; returns it (eval mode) and the checkpoint directory it came from."""
    path = resolve_base(name_or_path, progress)
    from deltafleet.quant.base import is_quantized_base, load_quantized_model  # quant imports models: lazily

    if is_quantized_base(path):
        return load_quantized_model(path, dtype, os.environ.get("DELTAFLEET_QUANT_KERNEL", "native")), path
    cfg = ModelConfig.from_file(path / "config.json")
    state = validate_state(cfg, *read_checkpoint_tensors(path), path)
    with torch.device("meta"):
        model = Transformer(cfg)
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False, assign=True)
    model.tie_weights()
    model.inv_freq = rope_inv_freq(cfg.rope, cfg.head_dim)  # buffers built on meta hold no values
    return model.eval(), path


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise ArtifactError(path, f"no usable tokenizer files ({e})") from None
