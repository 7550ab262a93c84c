"""The HiWi tenant directory: the gain changes of the adapted RMSNorms.

    deltafleet.json            format "deltafleet-hiwi": kind "hiwi", config (targets), base model and fingerprint,
                               num_params and bytes
    adapter_model.safetensors  per norm `layers.{i}.{norm}.delta` (H,), fp16

Loading checks every tensor (name, 1-D floating point, finite, one per targeted norm and layer) and names the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from deltafleet.adapters.adapter import Adapter
from deltafleet.adapters.hiwi.functional import HiwiConfig
from deltafleet.adapters.io import WEIGHTS, config_from_manifest
from deltafleet.errors import ArtifactError
from deltafleet.models.config import ModelConfig
from deltafleet.store.manifest import MANIFEST, write_manifest
from deltafleet.store.safetensors_io import check_finite, load_tensors, refuse_pickles, save_tensors

FORMAT = "deltafleet-hiwi"


def save_hiwi(adapter: Adapter, directory: str | Path, *, model_cfg: ModelConfig | None = None,
              base_fingerprint: str | None = None, base_model: str | None = None,
              extra: dict[str, Any] | None = None) -> Path:
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"layers.{layer}.{name}.delta": p["delta"].detach().to(torch.float16).contiguous()
               for (layer, name), p in sorted(adapter.params.items())}
    save_tensors(tensors, d / WEIGHTS, metadata={"format": FORMAT})
    n = sum(t.numel() for t in tensors.values())
    write_manifest(d, FORMAT, {"kind": adapter.config.kind, "config": adapter.config.to_dict(),
                               "base_model": base_model, "base_fingerprint": base_fingerprint, "num_params": n,
                               "bytes": 2 * n, **(extra or {})})
    return d


def load_hiwi(directory: Path, manifest: dict[str, Any]) -> Adapter:
    cfg = config_from_manifest(directory, manifest)
    if not isinstance(cfg, HiwiConfig):
        raise ArtifactError(directory / MANIFEST, f"field 'kind': a {FORMAT} directory holds a hiwi tenant")
    path = directory / WEIGHTS
    if not path.is_file():
        refuse_pickles(directory, WEIGHTS)
        raise ArtifactError(path, "adapter weights file not found")
    tensors = load_tensors(path)
    check_finite(tensors, path)
    params = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or parts[3] != "delta":
            raise ArtifactError(path, f"unexpected tensor {name[:80]!r} (a HiWi tenant holds layers.N.NORM.delta)")
        if parts[2] not in cfg.targets:
            raise ArtifactError(path, f"tensor {name!r}: {parts[2][:40]!r} is not one of the targets {cfg.targets}")
        if not t.is_floating_point() or t.dim() != 1:
            raise ArtifactError(path, f"tensor {name!r}: must be a 1-D floating-point gain change, got {t.dtype} "
                                      f"{tuple(t.shape)}")
        params[(int(parts[1]), parts[2])] = {"delta": t}
    if not params:
        raise ArtifactError(path, "holds no adapter tensors")
    return Adapter(cfg, params)
