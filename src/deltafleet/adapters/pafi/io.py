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

from deltafleet.adapters.adapter import Adapter
from deltafleet.adapters.io import config_from_manifest, read_module_tensors, write_module_tensors
from deltafleet.adapters.pafi.functional import PafiConfig
from deltafleet.adapters.pafi.mask import load_mask, mask_base, save_mask
from deltafleet.errors import ArtifactError
from deltafleet.models.config import ModelConfig
from deltafleet.store.manifest import MANIFEST

FORMAT = "deltafleet-pafi"


def save_pafi(adapter: Adapter, directory: str | Path, *, model_cfg: ModelConfig | None = None,
              base_fingerprint: str | None = None, base_model: str | None = None,
              extra: dict[str, Any] | None = None) -> Path:
    """Write the tenant (and its mask, once, to the mask cache); the manifest names the mask's id."""
    cfg = adapter.config
    mask = {key: (p["cols"], p["row_ptr"]) for key, p in adapter.params.items()}
    cfg = replace(cfg, mask=save_mask(mask, cfg.density, base_fingerprint))
    return write_module_tensors(directory, {k: p["values"] for k, p in adapter.params.items()}, "values", FORMAT,
                                {"kind": cfg.kind, "config": cfg.to_dict(), "base_model": base_model,
                                 "base_fingerprint": base_fingerprint, **(extra or {})})


def load_pafi(directory: Path, manifest: dict[str, Any]) -> Adapter:
    cfg = config_from_manifest(directory, manifest)
    if not isinstance(cfg, PafiConfig) or not cfg.mask:
        raise ArtifactError(directory / MANIFEST, "field 'config': a PaFi tenant must name its mask ('mask')")
    mask = load_mask(cfg.mask)
    tenant_base, mask_made_for = manifest.get("base_fingerprint"), mask_base(cfg.mask)
    if tenant_base and mask_made_for and tenant_base != mask_made_for:  # a mask of another base: refused here, so
        raise ArtifactError(directory / MANIFEST,  # it never reaches (and claims) a slot pool
                            f"names mask {cfg.mask}, made for base {mask_made_for}, but the tenant is for "
                            f"{str(tenant_base)[:80]}")
    path, tensors = read_module_tensors(directory, "values", "PROJ")
    params = {}
    for key, (name, t) in tensors.items():
        if key not in mask:
            raise ArtifactError(path, f"tensor {name!r}: the mask {cfg.mask} has no layers.{key[0]}.{key[1]}")
        cols, row_ptr = mask[key]
        if not t.is_floating_point() or tuple(t.shape) != (cols.numel(),):
            raise ArtifactError(path, f"tensor {name!r}: must be {cols.numel()} floating-point values (the mask's "
                                      f"entries), got {t.dtype} {tuple(t.shape)}")
        params[key] = {"values": t, "cols": cols, "row_ptr": row_ptr}
    if set(mask) != set(params):
        missing = sorted(set(mask) - set(params))[0]
        raise ArtifactError(path, f"lacks layers.{missing[0]}.{missing[1]}.values (the mask covers it)")
    return Adapter(cfg, params)
