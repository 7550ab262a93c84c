"""Reading and writing tensors safely.

Only safetensors is ever read. Pickle-based formats (`.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`) are refused
without being opened by a deserialiser, because unpickling runs arbitrary code. Every failure names the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltafleet.errors import ArtifactError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_ZIP_MAGIC = b"PK\x03\x04"


def refuse_pickles(directory: Path, wanted: str) -> None:
    """Raise if `directory` offers only pickle weight files where safetensors (`wanted`) was expected."""
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ArtifactError(
            directory / pickles[0],
            f"pickle weight files are never loaded (unpickling can run arbitrary code); "
            f"convert to {wanted} (safetensors) first",
        )


def _looks_like_pickle(head: bytes) -> bool:
    """torch.save zip archives, or a raw pickle stream (PROTO opcode 0x80 then protocol 2-5)."""
    return head[:4] == _ZIP_MAGIC or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def _check_header(path: Path) -> dict:
    """Validate the safetensors header against the file size before handing the file to the library.

    The header is parsed first: a valid header whose length is 128 mod 256 also starts with byte 0x80, so
    the pickle diagnosis is only given to a file that fails to parse as safetensors and looks like a pickle.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            try:
                if len(head) < 8:
                    raise ArtifactError(path, f"truncated: {size} bytes, a safetensors file has an 8-byte header")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise ArtifactError(path, f"truncated or malformed: header claims {n} bytes, file has {size}")
                try:
                    header = json.loads(f.read(n))
                except (UnicodeDecodeError, json.JSONDecodeError):
                    raise ArtifactError(path, "malformed safetensors header (not JSON)") from None
            except ArtifactError:
                if _looks_like_pickle(head):
                    raise ArtifactError(path, "is a pickle/zip file, not safetensors; it is never unpickled") from None
                raise
    except FileNotFoundError:
        raise ArtifactError(path, "file not found") from None
    if not isinstance(header, dict):
        raise ArtifactError(path, "malformed safetensors header (not a JSON object)")
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise ArtifactError(path, f"truncated: tensors need {8 + n + end} bytes, file has {size}")
    return header


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file."""
    path = Path(path)
    _check_header(path)
    try:
        out = {}
        with safe_open(str(path), framework="pt", device=device) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                out[name] = f.get_tensor(name)
        return out
    except SafetensorError as e:
        raise ArtifactError(path, f"malformed safetensors file ({e})") from None


def stored_dtypes(path: str | Path) -> set[str]:
    """The dtypes (safetensors names, e.g. F32, BF16) of the tensors in a file, from its header only."""
    return {v["dtype"] for k, v in _check_header(Path(path)).items() if k != "__metadata__"}


def read_metadata(path: str | Path) -> dict[str, str]:
    return _check_header(Path(path)).get("__metadata__", {}) or {}


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
