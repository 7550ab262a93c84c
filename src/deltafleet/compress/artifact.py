"""Writing a compression run as a compressed-delta artifact (the `deltafleet-delta` format of
`deltafleet.adapters.delta_format`, which also reads it), with the run's statistics in the manifest: `bytes`
holds the total against the whole delta's fp16 bytes (`ratio`) and each part's (`parts`)."""

from __future__ import annotations

from pathlib import Path

from deltafleet.adapters.adapter import module_name
from deltafleet.adapters.delta_format import write_artifact
from deltafleet.compress.pipeline import Compressed


def save_compressed(c: Compressed, directory: str | Path, *, base_model: str | None = None,
                    base_fingerprint: str | None = None, finetuned: str | None = None) -> Path:
    kept = [s for s in c.stats if (s.layer, s.proj) in c.adapter.params]
    fields = {
        "method": c.settings.method,
        "settings": c.settings.to_dict(),
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "finetuned": finetuned,
        "bytes": {"compressed": c.bytes, "fp16_delta": c.fp16_bytes, "ratio": c.bytes / c.fp16_bytes,
                  "parts": c.parts, "extras": c.extras_bytes},
        "modules": {module_name(s.layer, s.proj): {"bytes": s.bytes, "budget": s.budget,
                                                   "rel_error": round(s.rel_error, 6)} for s in kept},
        "dropped_modules": [module_name(s.layer, s.proj) for s in c.stats if s not in kept],
        "compress_seconds": round(c.seconds, 3),
    }
    return write_artifact(c.adapter, directory, {(s.layer, s.proj): s.shape for s in c.stats}, c.extras, fields)
