"""Export one tenant as a full Hugging Face checkpoint: the adapter merged into the base (peft's
`merge_and_unload`), for LoRA, RoAd, low-rank and compressed deltas alike.

Each projection becomes W + dW through the kind's own `merge` (the same pure functions serving uses); a
compressed delta's extras (norms, embeddings the fine-tune changed) replace the base's tensors exactly. Weights
are written in the dtype the base checkpoint stores (merged in fp32 first); config and tokenizer files are
copied from the base, so `transformers.AutoModelForCausalLM.from_pretrained(out)` loads the result.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from deltafleet.adapters import Adapter, load_adapter, merge_adapter
from deltafleet.adapters.delta_format import FORMAT, load_extras
from deltafleet.compress.delta import apply_extras
from deltafleet.dtypes import SAFETENSORS_DTYPES
from deltafleet.errors import DeltafleetError
from deltafleet.models.llama import Transformer
from deltafleet.models.loading import load_model, resolve_base
from deltafleet.store.fingerprint import CACHE_NAME, base_fingerprint
from deltafleet.store.manifest import read_manifest
from deltafleet.store.safetensors_io import save_tensors, stored_dtypes


def merged_model(base: str | Path, adapter_dir: str | Path) -> tuple[Transformer, Adapter, Path]:
    """Our fp32 model with the adapter (and a compressed delta's extras) folded in; checks the fingerprint."""
    base_path = resolve_base(base)
    model, _ = load_model(base_path, dtype=torch.float32)
    adapter = load_adapter(adapter_dir, model.config, expected_fingerprint=base_fingerprint(base_path))
    merge_adapter(model, adapter)
    manifest = read_manifest(adapter_dir) or {}
    if manifest.get("format") == FORMAT:
        apply_extras(model, load_extras(adapter_dir))
    return model, adapter, base_path


def merge_to_checkpoint(base: str | Path, adapter_dir: str | Path, out: str | Path) -> Path:
    model, _, base_path = merged_model(base, adapter_dir)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise DeltafleetError(f"out={str(out)!r}: directory exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    dtypes = {SAFETENSORS_DTYPES.get(d) for f in base_path.glob("*.safetensors") for d in stored_dtypes(f)}
    dtype = dtypes.pop() if len(dtypes) == 1 and None not in dtypes else torch.float32
    state = {k: v.to(dtype) for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_tensors(state, out / "model.safetensors", metadata={"format": "pt"})
    for f in base_path.iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in (CACHE_NAME, "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    (out / "deltafleet-merge.json").write_text(json.dumps(
        {"base": str(base_path), "adapter": str(Path(adapter_dir).resolve()), "dtype": str(dtype)}, indent=2))
    return out
