"""The PaFi tenant directory: the trained values only; the indices live in the shared mask (`pafi.mask`).

    deltafleet.json            format "deltafleet-pafi": kind "pafi", config (targets, density, mask id), base model
                               and fingerprint, num_params and bytes (the values')
    adapter_model.safetensors  per projection `layers.{i}.{proj}.values`, fp16, in the mask's entry order

Loading finds the mask by the id the manifest names, checks every projection's values against it (present, 1-D,
the mask's entry count, finite) and returns an `Adapter` whose params hold the shared index tensors.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from deltafleet.adapters.adapter import Adapter
from deltafleet.adapters.io import WEIGHTS, config_from_manifest
from deltafleet.adapters.pafi.functional import PafiConfig
from deltafleet.adapters.pafi.mask import load_mask, save_mask
from deltafleet.errors import ArtifactError
from deltafleet.models.config import ModelConfig
from deltafleet.store.manifest import MANIFEST, write_manifest
from deltafleet.store.safetensors_io import check_finite, load_tensors, refuse_pickles, save_tensors

FORMAT = "deltafleet-pafi"


def save_pafi(adapter: Adapter, directory: str | Path, *, model_cfg: ModelConfig | None = None,
              base_fingerprint: str | None = None, base_model: str | None = None,
              extra: dict[str, Any] | None = None) -> Path:
    """Write the tenant (and its mask, once, to the mask cache); the manifest names the mask's id."""
    cfg = adapter.config
    mask = {key: (p["cols"], p["row_ptr"]) for key, p in adapter.params.items()}
    mid = save_mask(mask, cfg.density, base_fingerprint)
    cfg = replace(cfg, mask=mid)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    values = {f"layers.{layer}.{proj}.values": p["values"].detach().to(torch.float16).contiguous()
              for (layer, proj), p in sorted(adapter.params.items())}
    save_tensors(values, d / WEIGHTS, metadata={"format": FORMAT})
    n = sum(v.numel() for v in values.values())
    write_manifest(d, FORMAT, {"kind": cfg.kind, "config": cfg.to_dict(), "base_model": base_model,
                               "base_fingerprint": base_fingerprint, "num_params": n, "bytes": 2 * n,
                               **(extra or {})})
    return d


def load_pafi(directory: Path, manifest: dict[str, Any]) -> Adapter:
    cfg = config_from_manifest(directory, manifest)
    if not isinstance(cfg, PafiConfig) or not cfg.mask:
        raise ArtifactError(directory / MANIFEST, "field 'config': a PaFi tenant must name its mask ('mask')")
    mask = load_mask(cfg.mask)
    path = directory / WEIGHTS
    if not path.is_file():
        refuse_pickles(directory, WEIGHTS)
        raise ArtifactError(path, "adapter weights file not found")
    tensors = load_tensors(path)
    check_finite(tensors, path)
    params = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or parts[3] != "values":
            raise ArtifactError(path, f"unexpected tensor {name[:80]!r} (a PaFi tenant holds layers.N.PROJ.values)")
        key = (int(parts[1]), parts[2])
        if key not in mask:
            raise ArtifactError(path, f"tensor {name!r}: the mask {cfg.mask} has no layers.{key[0]}.{key[1]}")
        cols, row_ptr = mask[key]
        if not t.is_floating_point() or tuple(t.shape) != (cols.numel(),):
            raise ArtifactError(path, f"tensor {name!r}: must be {cols.numel()} floating-point values (the mask's "
                                      f"entries), got {t.dtype} {tuple(t.shape)}")
        params[key] = {"values": t, "cols": cols, "row_ptr": row_ptr}
    if not params:
        raise ArtifactError(path, "holds no adapter tensors")
    if set(mask) != set(params):
        missing = sorted(set(mask) - set(params))[0]
        raise ArtifactError(path, f"lacks layers.{missing[0]}.{missing[1]}.values (the mask covers it)")
    return Adapter(cfg, params)
