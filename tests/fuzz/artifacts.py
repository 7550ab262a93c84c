"""The on-disk readers under fuzzing, each with a valid artifact written by the real writers to start from.

A `Target` names a reader, builds one valid artifact (a directory) on a tiny random Llama config, lists the files
of that directory a fuzzer may replace, and reads the directory back. The contract every reader keeps, whatever the
files hold: it returns, or raises a `DeltafleetError` (`ArtifactError` naming the file and the rule); any other
exception, or a hang, is a defect. `tests/fuzz` (hypothesis) and `fuzz/fuzz_readers.py` (atheris, by hand) share
these targets.

The model config is smaller than `tests/conftest.py`'s tiny ones (hidden 32, 2 layers) so that files stay a few
kilobytes: mutations then hit headers and manifests, not megabytes of tensor data.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

FUZZ_CONFIG = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=2, num_key_value_heads=1, vocab_size=64, rms_norm_eps=1e-5,
                   max_position_embeddings=64, tie_word_embeddings=False)
KEY_ENV = "DELTAFLEET_FUZZ_KEY"  # the tenancy seed reads one key from the environment
TENANCY = f"""\
[[tenants]]
name = "acme"
api_key = "sk-acme-0123456789"
adapters = ["acme-*", "shared"]

[[tenants]]
name = "ops"
api_key_env = "{KEY_ENV}"
adapters = ["*"]
admin = true
"""


@dataclass(frozen=True)
class Target:
    name: str
    build: Callable[[Path], None]  # writes the valid artifact into an empty directory
    files: tuple[str, ...]  # the files of the artifact a fuzzer replaces
    read: Callable[[Path], object]  # the reader under test, on the directory
    rehash: bool = False  # the manifest holds the files' SHA-256: recompute it after replacing a weights file


def model_config():
    from deltafleet.models.config import ModelConfig

    return ModelConfig.from_hf_dict(FUZZ_CONFIG)


# ------------------------------------------------------------------------------------------------ writers
def _safetensors(d: Path) -> None:
    from deltafleet.store.safetensors_io import save_tensors

    g = torch.Generator().manual_seed(0)
    save_tensors({"w": torch.randn(4, 3, generator=g), "h": torch.randn(5, generator=g).half(),
                  "b": torch.randn(2, 2, generator=g).bfloat16(), "codes": torch.arange(6, dtype=torch.uint8),
                  "idx": torch.tensor([3, -1], dtype=torch.int64), "empty": torch.zeros(0, 4)},
                 d / "w.safetensors", metadata={"format": "pt"})


def _adapter(config) -> Callable[[Path], None]:
    def build(d: Path) -> None:
        from deltafleet.adapters import random_adapter, save_adapter

        cfg = model_config()
        save_adapter(random_adapter(cfg, config(), seed=1), d, model_cfg=cfg, base_fingerprint="sha256:fuzz",
                     base_model="fuzz-llama")
    return build


def _lora():
    from deltafleet.adapters import LoraConfig

    return LoraConfig(r=2, alpha=4.0, targets=("q_proj", "v_proj", "down_proj"))


def _road():
    from deltafleet.adapters import RoadConfig

    return RoadConfig(variant="road_2", group_size=8, targets=("q_proj", "up_proj"))


def _lowrank():
    from deltafleet.adapters import LowRankConfig

    return LowRankConfig(rank=2, targets=("k_proj", "o_proj"))


def _qlowrank():
    from deltafleet.adapters.qlowrank import QLowRankConfig

    return QLowRankConfig(targets=("q_proj", "v_proj", "down_proj"), group_size=8, u_groups="out",
                          bands=(("32x32", ((16, 1), (4, 2))), ("16x32", ((2, 2),)), ("32x64", ((8, 1), (3, 1)))))


def _qlowrank_whole():
    """A whole fine-tune's delta: projections and both tables (the fuzz base is untied) of one band plan."""
    from deltafleet.adapters.qlowrank import QLowRankConfig

    return QLowRankConfig(targets=("q_proj", "v_proj"), group_size=8, u_groups="out",
                          bands=(("32x32", ((8, 1), (2, 2))), ("16x32", ((4, 1),)), ("64x32", ((3, 2),))))


def _whole(config) -> Callable[[Path], None]:
    """A compressed whole fine-tune: projection and table deltas plus a gain delta for every RMSNorm."""
    def build(d: Path) -> None:
        from deltafleet.adapters import random_adapter
        from deltafleet.adapters.delta_format import write_artifact

        cfg = model_config()
        adapter = random_adapter(cfg, config(), seed=3, whole=True)
        shapes = {k: cfg.module_shape(k[1]) for k in adapter.params}
        write_artifact(adapter, d, shapes, {}, {"base_model": "fuzz-llama", "base_fingerprint": "sha256:fuzz",
                                                "method": "fuzz", "bytes": {"compressed": adapter.nbytes}})
    return build


def _bitdelta():
    from deltafleet.adapters.bitdelta.functional import BitDeltaConfig

    return BitDeltaConfig(targets=("q_proj", "gate_proj"))


def _sparse():
    from deltafleet.adapters.sparse.functional import SparseConfig

    return SparseConfig(targets=("o_proj", "up_proj"), nnz=(("32x32", 40), ("64x32", 50)))


def _compressed(config) -> Callable[[Path], None]:
    """A compressed-delta artifact with one changed non-projection tensor (extras.safetensors)."""
    def build(d: Path) -> None:
        from deltafleet.adapters import random_adapter
        from deltafleet.adapters.delta_format import write_artifact

        cfg = model_config()
        adapter = random_adapter(cfg, config(), seed=2)
        shapes = {k: cfg.linear_shape(k[1]) for k in adapter.params}
        extras = {"model.layers.0.input_layernorm.weight": torch.full((cfg.hidden_size,), 1.5)}
        write_artifact(adapter, d, shapes, extras, {"base_model": "fuzz-llama", "base_fingerprint": "sha256:fuzz",
                                                    "method": "fuzz", "bytes": {"compressed": adapter.nbytes}})
    return build


def build_checkpoint(d: Path) -> None:
    """A Hugging Face checkpoint (config.json + model.safetensors) written by transformers itself."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FUZZ_CONFIG)
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config, dtype=torch.float32).save_pretrained(str(d), safe_serialization=True)


def _quantized_base(d: Path) -> None:
    from deltafleet.quant.config import QuantConfig
    from deltafleet.quant.pipeline import quantize_base

    build_checkpoint(d / "source")
    quantize_base(d / "source", QuantConfig("rtn", bits=4, group_size=8), d / "base", dense_dtype="float32")


def _onebit_base(d: Path) -> None:
    from deltafleet.quant.config import QuantConfig
    from deltafleet.quant.pipeline import quantize_base

    build_checkpoint(d / "source")
    quantize_base(d / "source", QuantConfig("onebit", kd_steps=0), d / "base", dense_dtype="float32",
                  show_progress=False)


def _tenancy(d: Path) -> None:
    (d / "tenancy.toml").write_text(TENANCY)


# ------------------------------------------------------------------------------------------------ readers
def _read_safetensors(d: Path) -> object:
    from deltafleet.store.safetensors_io import load_tensors, read_metadata, stored_dtypes

    path = d / "w.safetensors"
    return stored_dtypes(path), read_metadata(path), load_tensors(path)


def _read_manifest(d: Path) -> object:
    from deltafleet.store.manifest import read_manifest

    return read_manifest(d), read_manifest(d, "peft")


def _read_adapter(d: Path) -> object:
    from deltafleet.adapters.io import load_adapter, peek_config

    return peek_config(d), load_adapter(d, model_config(), expected_fingerprint="sha256:fuzz")


def _read_compressed(d: Path) -> object:
    from deltafleet.adapters.delta_format import load_extras

    return _read_adapter(d), load_extras(d)


def _read_quantized_base(d: Path) -> object:
    from deltafleet.quant.base import read_quantized_base

    return read_quantized_base(d / "base")


def _read_checkpoint(d: Path) -> object:
    from deltafleet.models.config import ModelConfig
    from deltafleet.models.loading import load_model

    return ModelConfig.from_file(d / "config.json"), load_model(d)


def _read_tenancy(d: Path) -> object:
    from deltafleet.serve.http.tenancy import Tenancy

    os.environ.setdefault(KEY_ENV, "sk-ops-abcdefghijk")
    return Tenancy.from_file(d / "tenancy.toml")


_PEFT = ("adapter_config.json", "adapter_model.safetensors", "deltafleet.json")
_DELTA = ("deltafleet.json", "delta.safetensors", "extras.safetensors")
_DELTA_WHOLE = tuple(f for f in _DELTA if f != "extras.safetensors")  # nothing outside modules and gains
TARGETS: dict[str, Target] = {t.name: t for t in (
    Target("safetensors", _safetensors, ("w.safetensors",), _read_safetensors),
    Target("manifest", _adapter(_lora), ("deltafleet.json",), _read_manifest),
    Target("peft-lora", _adapter(_lora), _PEFT, _read_adapter),
    Target("peft-road", _adapter(_road), _PEFT, _read_adapter),
    Target("deltafleet-lowrank", _adapter(_lowrank), ("deltafleet.json", "adapter_model.safetensors"),
           _read_adapter),
    Target("delta-qlowrank", _compressed(_qlowrank), _DELTA, _read_compressed, rehash=True),
    Target("delta-whole", _whole(_qlowrank_whole), _DELTA_WHOLE, _read_compressed, rehash=True),
    Target("delta-bitdelta", _compressed(_bitdelta), _DELTA, _read_compressed, rehash=True),
    Target("delta-sparse", _compressed(_sparse), _DELTA, _read_compressed, rehash=True),
    Target("quantized-base", _quantized_base,
           ("base/deltafleet.json", "base/config.json", "base/quantized.safetensors"), _read_quantized_base),
    Target("onebit-base", _onebit_base,
           ("base/deltafleet.json", "base/config.json", "base/quantized.safetensors"), _read_quantized_base),
    Target("checkpoint", build_checkpoint, ("config.json", "model.safetensors"), _read_checkpoint),
    Target("tenancy", _tenancy, ("tenancy.toml",), _read_tenancy),
)}


def rehash(d: Path) -> None:
    """Rewrite a compressed artifact's manifest checksums to match its files (when the manifest still parses), so
    that a mutated weights file reaches the parser instead of failing the checksum."""
    from deltafleet.adapters.delta_format import sha256

    mpath = d / "deltafleet.json"
    try:
        m = json.loads(mpath.read_text())
    except ValueError:
        return
    if isinstance(m, dict) and isinstance(m.get("files"), dict):
        m["files"] = {name: sha256(d / name) if (d / name).is_file() else want for name, want in m["files"].items()}
        mpath.write_text(json.dumps(m))


def read_allowing_documented_errors(target: Target, d: Path) -> object | None:
    """target.read(d), or None when it raised one of our documented errors; anything else propagates."""
    from deltafleet.errors import DeltafleetError

    try:
        return target.read(d)
    except DeltafleetError:
        return None


def fresh_copy(seed: Path, work: Path) -> Path:
    """A copy of a seed artifact to mutate."""
    d = work / seed.name
    shutil.copytree(seed, d)
    return d
