"""The shared PaFi mask of one base model and density: built once, content-addressed, cached, interned.

    $DELTAFLEET_CACHE_DIR/pafi-masks/<id>/
        deltafleet.json      format "deltafleet-pafi-mask": id, density, base fingerprint, targets, nnz
        mask.safetensors     per projection `layers.{i}.{proj}.cols` (int32) and `.row_ptr` (int32)

The id is a SHA-256 over the density and every projection's index bytes (in layer, projection order), so a mask
file that was altered or truncated no longer matches the id its tenants name and is refused. Within a process a
mask is loaded once (`intern`): every tenant of the mask holds the same index tensors, so a tenant's host bytes are
its values alone, and a slot pool recognises the shared mask by identity.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import torch
from torch import Tensor

from deltafleet.adapters.adapter import ModuleKey
from deltafleet.adapters.pafi.functional import magnitude_mask
from deltafleet.errors import ArtifactError
from deltafleet.store.cache import cache_dir
from deltafleet.store.manifest import read_manifest, require, write_manifest
from deltafleet.store.safetensors_io import load_tensors, save_tensors

MASK_FORMAT = "deltafleet-pafi-mask"
MASK_FILE = "mask.safetensors"
Mask = dict[ModuleKey, tuple[Tensor, Tensor]]  # (layer, proj) -> (cols (nnz,) int32, row_ptr (out + 1,) int32)

_interned: dict[str, Mask] = {}
_bases: dict[str, str | None] = {}  # mask id -> the base fingerprint its manifest names
_lock = threading.Lock()


def mask_id(mask: Mask, density: float) -> str:
    h = hashlib.sha256(repr(float(density)).encode())
    for (layer, proj), (cols, row_ptr) in sorted(mask.items()):
        h.update(f"{layer}.{proj}".encode())
        h.update(cols.to(torch.int32).contiguous().numpy().tobytes())
        h.update(row_ptr.to(torch.int32).contiguous().numpy().tobytes())
    return "sha256:" + h.hexdigest()[:16]


def build_mask(weights: dict[ModuleKey, Tensor], density: float) -> Mask:
    """(layer, proj) -> W (out, in) of every target projection -> the magnitude mask of each."""
    return {key: magnitude_mask(w, density) for key, w in sorted(weights.items())}


def mask_dir(mid: str, root: Path | None = None) -> Path:
    return (root or cache_dir() / "pafi-masks") / mid.replace("sha256:", "")


def save_mask(mask: Mask, density: float, base_fingerprint: str | None, root: Path | None = None) -> str:
    """Write the mask to its content-addressed directory (once) and intern it; returns its id."""
    mid = mask_id(mask, density)
    d = mask_dir(mid, root)
    if read_manifest(d, MASK_FORMAT) is None:
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"layers.{layer}.{proj}.{name}": t.to(torch.int32).contiguous()
                   for (layer, proj), pair in sorted(mask.items())
                   for name, t in zip(("cols", "row_ptr"), pair, strict=True)}
        save_tensors(tensors, d / MASK_FILE, metadata={"format": MASK_FORMAT})
        targets = sorted({proj for _, proj in mask})
        write_manifest(d, MASK_FORMAT, {"id": mid, "density": float(density), "base_fingerprint": base_fingerprint,
                                        "targets": targets, "nnz": sum(c.numel() for c, _ in mask.values())})
    with _lock:
        _interned.setdefault(mid, mask)
        _bases.setdefault(mid, base_fingerprint)
    return mid


def load_mask(mid: str, root: Path | None = None) -> Mask:
    """The interned mask `mid`, read from its cache directory the first time; refused (naming the file) when it is
    missing, malformed, or its contents no longer hash to `mid`."""
    with _lock:
        if mid in _interned:
            return _interned[mid]
    d = mask_dir(mid, root)
    manifest = read_manifest(d, MASK_FORMAT)
    if manifest is None:
        raise ArtifactError(d, f"PaFi mask {mid} not found: it is written by `deltafleet train --method pafi` on the "
                               f"same base and density (or copy the directory from the machine that trained it)")
    density = require(manifest, "density", d)
    tensors = load_tensors(d / MASK_FILE)
    mask: dict[ModuleKey, dict[str, Tensor]] = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or parts[3] not in ("cols", "row_ptr"):
            raise ArtifactError(d / MASK_FILE, f"unexpected tensor {name[:80]!r}")
        if t.dtype != torch.int32 or t.dim() != 1:
            raise ArtifactError(d / MASK_FILE, f"tensor {name!r}: must be 1-D int32")
        mask.setdefault((int(parts[1]), parts[2]), {})[parts[3]] = t
    pairs: Mask = {}
    for key, p in mask.items():
        if set(p) != {"cols", "row_ptr"}:
            raise ArtifactError(d / MASK_FILE, f"layers.{key[0]}.{key[1]}: needs both cols and row_ptr")
        pairs[key] = (p["cols"], p["row_ptr"])
    if not isinstance(density, float | int) or mask_id(pairs, density) != mid:
        raise ArtifactError(d / MASK_FILE, f"contents do not match mask id {mid} (altered or truncated)")
    with _lock:
        _bases.setdefault(mid, manifest.get("base_fingerprint"))
        return _interned.setdefault(mid, pairs)


def mask_base(mid: str) -> str | None:
    """The base fingerprint the (loaded or saved) mask `mid` was recorded for; None when unknown."""
    with _lock:
        return _bases.get(mid)


def intern(mid: str, mask: Mask) -> Mask:
    """The process's one copy of mask `mid` (`mask` becomes it if none is held yet)."""
    with _lock:
        return _interned.setdefault(mid, mask)
