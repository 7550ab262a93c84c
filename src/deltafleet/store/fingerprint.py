"""Base-model fingerprints: which exact base an artifact was made for.

The fingerprint is the SHA-256 of the checkpoint's safetensors files (sorted by name, bytes as stored), cut to
16 hex digits. It is cached beside the checkpoint keyed by file sizes and mtimes, so it is computed once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from pathlib import Path

CACHE_NAME = ".deltafleet-fingerprint.json"


def _stamp(files: list[Path]) -> list[list]:
    return [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def base_fingerprint(checkpoint_dir: str | Path) -> str:
    d = Path(checkpoint_dir)
    files = sorted(d.glob("*.safetensors"))
    stamp = _stamp(files)
    cache = d / CACHE_NAME
    try:
        cached = json.loads(cache.read_text())
        if cached.get("stamp") == stamp:
            return cached["fingerprint"]
    except (OSError, ValueError, KeyError, AttributeError):
        pass
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 24):
                h.update(chunk)
    fp = "sha256:" + h.hexdigest()[:16]
    with contextlib.suppress(OSError):  # a read-only checkpoint directory recomputes next time
        cache.write_text(json.dumps({"stamp": stamp, "fingerprint": fp}))
    return fp
