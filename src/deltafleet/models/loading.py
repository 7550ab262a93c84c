"""Resolve a base model (embedded name or checkpoint directory) and load it into our `Transformer`.

A checkpoint directory is a Hugging Face Llama-family layout: `config.json`, `model.safetensors` or sharded
`model-0000N-of-0000M.safetensors` (+ index), and tokenizer files. Weights are read only from safetensors;
every tensor's name and shape is checked against the config before the model is built. Whatever the files hold,
reading and validating raise nothing but `DeltafleetError`s (`ArtifactError` naming the file and the rule).

Other base formats register a loader for their manifest's `format` (`BASE_FORMATS`, filled by the layers above:
importing `deltafleet.quant` registers the quantized base of `deltafleet quantize`, loaded with a `QuantLinear` for
every projection). A directory whose manifest names a format nobody registered is refused with the rule.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import torch

from deltafleet.errors import ArtifactError, DeltafleetError
from deltafleet.models.config import ModelConfig
from deltafleet.models.embedded import EMBEDDED, materialize
from deltafleet.models.llama import Transformer, rope_inv_freq
from deltafleet.registry import Registry
from deltafleet.store.manifest import MANIFEST, read_manifest
from deltafleet.store.safetensors_io import load_tensors, refuse_pickles

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
_LAYER_RE = re.compile(r"model\.layers\.([0-9]{1,9})\.")


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
    state = {k: v for k, v in tensors.items() if not k.endswith(_IGNORED_SUFFIXES)}
    layers = {int(m[1]) for k in state if (m := _LAYER_RE.match(k))}
    if cfg.num_layers > len(layers):  # found before building the expected names (a layer costs ~1 ms on meta)
        first = min(set(range(len(layers) + 1)) - layers)
        raise ArtifactError(path, f"missing the tensors of layer {first} (model.layers.{first}.*): the config has "
                                  f"num_hidden_layers={cfg.num_layers}, the checkpoint tensors of {len(layers)} layers")
    want = expected_shapes(cfg)
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


BaseLoader = Callable[[Path, torch.dtype], Transformer]
BASE_FORMATS: Registry[BaseLoader] = Registry("base-model format")
KNOWN_BASE_FORMATS = {"deltafleet-quantized-base": "deltafleet.quant"}  # format -> the package that registers it


def base_format(path: Path) -> str | None:
    """The registered format of a base directory (by its manifest), or None for a plain checkpoint."""
    m = read_manifest(path)
    fmt = None if m is None else m.get("format")
    if fmt in BASE_FORMATS:
        return fmt
    if fmt in KNOWN_BASE_FORMATS:
        raise ArtifactError(path / MANIFEST, f"format {fmt!r} is a base format that no loader is registered for; "
                                             f"import {KNOWN_BASE_FORMATS[fmt]} first")
    return None


def load_model(name_or_path: str | Path, dtype: torch.dtype = torch.float32,
               progress=lambda _: None) -> tuple[Transformer, Path]:
    """Load our Transformer; returns it (eval mode) and the checkpoint directory it came from."""
    path = resolve_base(name_or_path, progress)
    fmt = base_format(path)
    if fmt is not None:
        return BASE_FORMATS[fmt](path, dtype), path
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
