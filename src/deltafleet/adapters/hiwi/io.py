"""The HiWi tenant directory: the gain changes of the adapted RMSNorms.

    deltafleet.json            format "deltafleet-hiwi": kind "hiwi", config (targets), base model and fingerprint,
                               num_params and bytes
    adapter_model.safetensors  per norm `layers.{i}.{norm}.delta` (H,), fp16

Loading checks every tensor (name, 1-D floating point, finite, one per targeted norm and layer) and names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltafleet.adapters.adapter import Adapter
from deltafleet.adapters.hiwi.functional import HiwiConfig
from deltafleet.adapters.io import config_from_manifest, read_module_tensors, write_module_tensors
from deltafleet.errors import ArtifactError
from deltafleet.models.config import ModelConfig
from deltafleet.store.manifest import MANIFEST

FORMAT = "deltafleet-hiwi"


def save_hiwi(adapter: Adapter, directory: str | Path, *, model_cfg: ModelConfig | None = None,
              base_fingerprint: str | None = None, base_model: str | None = None,
              extra: dict[str, Any] | None = None) -> Path:
    return write_module_tensors(directory, {k: p["delta"] for k, p in adapter.params.items()}, "delta", FORMAT,
                                {"kind": adapter.config.kind, "config": adapter.config.to_dict(),
                                 "base_model": base_model, "base_fingerprint": base_fingerprint, **(extra or {})})


def load_hiwi(directory: Path, manifest: dict[str, Any]) -> Adapter:
    cfg = config_from_manifest(directory, manifest)
    if not isinstance(cfg, HiwiConfig):
        raise ArtifactError(directory / MANIFEST, f"field 'kind': a {FORMAT} directory holds a hiwi tenant")
    path, tensors = read_module_tensors(directory, "delta", "NORM")
    params = {}
    for (layer, norm), (name, t) in tensors.items():
        if norm not in cfg.targets:
            raise ArtifactError(path, f"tensor {name!r}: {norm[:40]!r} is not one of the targets {cfg.targets}")
        if not t.is_floating_point() or t.dim() != 1:
            raise ArtifactError(path, f"tensor {name!r}: must be a 1-D floating-point gain change, got {t.dtype} "
                                      f"{tuple(t.shape)}")
        params[(layer, norm)] = {"delta": t}
    return Adapter(cfg, params)
