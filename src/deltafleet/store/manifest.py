"""The one manifest of every deltafleet artifact: `deltafleet.json` beside the artifact's safetensors files.

Every artifact directory (adapters in peft or deltafleet layout, compressed deltas, quantized bases, trained
tenants) carries one JSON object with at least

    schema_version  int, `SCHEMA_VERSION` (a reader refuses any other)
    format          which layout the directory holds ("peft", "deltafleet", "deltafleet-delta",
                    "deltafleet-quantized-base", ...)

plus the fields its format defines (kind, typed config, base-model fingerprint, sizes, method, settings).
Readers get `None` for a directory without a manifest, and an `ArtifactError` naming the file and the rule for a
manifest that is unreadable, not valid JSON, not an object, of another schema version, or whose `format` is not a
string.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from deltafleet.errors import ArtifactError
from deltafleet.store.safetensors_io import short

MANIFEST = "deltafleet.json"
SCHEMA_VERSION = 1


def read_json_object(path: str | Path) -> dict[str, Any]:
    """A JSON file that must hold one object; errors name the file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ArtifactError(p, f"unreadable ({e})") from None
    try:
        data = json.loads(text)
    except ValueError as e:  # JSONDecodeError, or an integer past Python's digit limit
        raise ArtifactError(p, f"not valid JSON ({e})") from None
    except RecursionError:
        raise ArtifactError(p, "not valid JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ArtifactError(p, "must hold a JSON object")
    return data


def read_manifest(directory: str | Path, format: str | None = None) -> dict[str, Any] | None:
    """The manifest of `directory`, or None when it has none (or, with `format`, when it is of another format).
    The schema version is checked only for the manifests returned."""
    path = Path(directory) / MANIFEST
    if not path.is_file():
        return None
    m = read_json_object(path)
    if not isinstance(m.get("format", ""), str):
        raise ArtifactError(path, f"field 'format'={short(m['format'])}: must be a string")
    if format is not None and m.get("format") != format:
        return None
    if m.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(path, f"schema_version={short(m.get('schema_version'))}; "
                                  f"this deltafleet reads {SCHEMA_VERSION}")
    return m


def write_manifest(directory: str | Path, format: str, fields: dict[str, Any]) -> Path:
    """Write `{schema_version, format, **fields}` as the manifest of `directory`; returns its path."""
    path = Path(directory) / MANIFEST
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "format": format, **fields}, indent=2))
    return path


def require(manifest: dict[str, Any], field: str, path: str | Path) -> Any:
    """manifest[field], or an ArtifactError naming the manifest file and the missing field."""
    try:
        return manifest[field]
    except KeyError:
        raise ArtifactError(Path(path) / MANIFEST if Path(path).is_dir() else path,
                            f"missing field {field!r}") from None
