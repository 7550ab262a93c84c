"""Reading and writing tensors safely.

Only safetensors is ever read. Pickle-based formats (`.bin`, `.pt`, `.pth`, `.ckpt`, `.pkl`) are refused
without being opened by a deserialiser, because unpickling runs arbitrary code. Every failure names the file.

The header is checked here, in full, before the file is handed to the library, against the format's rules
(https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian length N, N bytes of one JSON
object, then the data buffer. Each entry other than `__metadata__` (an object of strings) is an object with
`dtype` (one of `ELEMENT_BITS`), `shape` (non-negative integers) and `data_offsets` [begin, end] into the buffer,
with end - begin = numel * element size; the entries, sorted by offset, tile the buffer exactly (no gap, no
overlap, nothing after). Any other file raises `ArtifactError` naming the file, the tensor and the rule.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from deltafleet.errors import ArtifactError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
_ZIP_MAGIC = b"PK\x03\x04"
MAX_HEADER_BYTES = 100_000_000  # the library's limit
# Bits per element of the dtypes read (the safetensors names torch can hold); others are refused by name.
ELEMENT_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E4M3": 8, "F8_E4M3FNUZ": 8, "F8_E5M2": 8, "F8_E5M2FNUZ": 8,
                "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64,
                "F64": 64, "C64": 64}


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


def short(value: Any, limit: int = 60) -> str:
    """repr(value) cut to `limit` characters, for messages about hostile input."""
    r = repr(value)
    return r if len(r) <= limit else r[: limit - 3] + "..."


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _numel(shape: list[int], limit: int) -> int:
    """The product of `shape`, or any number above `limit` once it is known to exceed it (a hostile header's
    thousands of huge dimensions would otherwise cost quadratic time in big-integer products)."""
    if 0 in shape:
        return 0
    n = 1
    for d in shape:
        n *= d
        if n > limit:
            return limit + 1
    return n


def _check_entries(header: dict, data_len: int, path: Path) -> None:
    """The format's rules for every entry (see the module docstring); raises naming the tensor and the rule."""
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise ArtifactError(path, f"__metadata__ must be an object of strings, got {short(meta)}")
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {short(name)}"
        if not isinstance(info, dict):
            raise ArtifactError(path, f"{where}: header entry must be an object, got {short(info)}")
        dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if not isinstance(dtype, str) or dtype not in ELEMENT_BITS:
            raise ArtifactError(path, f"{where}: dtype {short(dtype)} is not one of {sorted(ELEMENT_BITS)}")
        if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
            raise ArtifactError(path, f"{where}: shape must be a list of non-negative integers, got {short(shape)}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)
                and offsets[0] <= offsets[1]):
            raise ArtifactError(path, f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, "
                                      f"got {short(offsets)}")
        span = offsets[1] - offsets[0]
        numel = _numel(shape, 8 * span)
        if numel * ELEMENT_BITS[dtype] != 8 * span:
            need = f"{numel * ELEMENT_BITS[dtype] // 8}" if numel <= 8 * span else "more than"
            raise ArtifactError(path, f"{where}: {dtype} {short(shape)} needs {need} bytes, its data_offsets span "
                                      f"{span}")
        spans.append((offsets[0], offsets[1], name))
    end = 0
    for begin, stop, name in sorted(spans):
        if begin != end:
            rule = "overlaps the previous tensor" if begin < end else f"leaves a gap before it at byte {end}"
            raise ArtifactError(path, f"tensor {short(name)}: data_offsets {[begin, stop]} {rule}")
        end = stop
    if end > data_len:
        raise ArtifactError(path, f"truncated: tensors need {end} data bytes, the file has {data_len}")
    if end < data_len:
        raise ArtifactError(path, f"{data_len - end} bytes after the last tensor's data (the tensors cover {end})")


def _check_header(path: Path) -> dict:
    """Validate the safetensors header against the format's rules and the file size before handing the file to the
    library; returns the header.

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
                if n > MAX_HEADER_BYTES:
                    raise ArtifactError(path, f"header of {n} bytes exceeds the format's {MAX_HEADER_BYTES}")
                try:
                    header = json.loads(f.read(n))
                except (UnicodeDecodeError, ValueError, RecursionError):  # ValueError: JSONDecodeError, huge ints
                    raise ArtifactError(path, "malformed safetensors header (not JSON)") from None
                if not isinstance(header, dict):
                    raise ArtifactError(path, "malformed safetensors header (not a JSON object)")
            except ArtifactError:
                if _looks_like_pickle(head):
                    raise ArtifactError(path, "is a pickle/zip file, not safetensors; it is never unpickled") from None
                raise
    except FileNotFoundError:
        raise ArtifactError(path, "file not found") from None
    except OSError as e:
        raise ArtifactError(path, f"unreadable ({e.strerror or e})") from None
    _check_entries(header, size - 8 - n, path)
    return header


READ_WHOLE_BYTES = 64 << 20
"""A file up to this size is read in one call and its tensors built from the bytes (`safetensors.torch.load`):
for an adapter of 1,538 small tensors (a Delta-CoMe tenant of SmolLM2) that took 19 ms against 41-47 ms through
`safe_open`, a call per tensor. Larger files (a base's weights) are opened lazily, as `safe_open` does."""


def load_tensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of one safetensors file."""
    path = Path(path)
    if device == "cpu":
        small = _load_small(path)
        if small is not None:
            return small
    _check_header(path)
    try:
        out = {}
        with safe_open(str(path), framework="pt", device=device) as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a Mapping)
                out[name] = f.get_tensor(name)
        return out
    except SafetensorError as e:
        raise ArtifactError(path, f"malformed safetensors file ({e})") from None
    except OSError as e:  # replaced or removed since the header was checked
        raise ArtifactError(path, f"unreadable ({e.strerror or e})") from None


def _load_small(path: Path) -> dict[str, torch.Tensor] | None:
    """The tensors of a file of at most READ_WHOLE_BYTES, read in one call; None for a larger file. The library
    validates the header and every offset as it builds them; only a file it refuses goes through `_check_header`,
    for an error that names the rule (parsing a 1,538-tensor header twice was a tenth of an adapter's load)."""
    try:
        if path.stat().st_size > READ_WHOLE_BYTES:
            return None
        data = path.read_bytes()
    except FileNotFoundError:
        raise ArtifactError(path, "file not found") from None
    except OSError as e:
        raise ArtifactError(path, f"unreadable ({e.strerror or e})") from None
    try:
        return safetensors.torch.load(data)
    except Exception as e:  # noqa: BLE001 (SafetensorError, and whatever else malformed bytes raise in the library)
        _check_header(path)  # raises, naming the rule
        raise ArtifactError(path, f"malformed safetensors file ({e})") from None


def check_finite(tensors: dict[str, torch.Tensor], path: str | Path) -> None:
    """Raise naming the first floating-point tensor that holds NaN or inf (integer codes cannot). Small tensors of
    one dtype are checked in one pass over their concatenation (an adapter may hold over a thousand of them; one
    isfinite call each cost a fifth of a load); only a failing dtype's are looked at one by one, for the name."""
    batched = {name for name, t in tensors.items() if _batchable(t)}
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for name in batched:
        t = tensors[name]
        by_dtype.setdefault(t.dtype, []).append(t.reshape(-1))
    clean = {dt for dt, ts in by_dtype.items() if bool(torch.isfinite(torch.cat(ts)).all())}
    for name, t in tensors.items():
        if name in batched and t.dtype in clean:
            continue
        if not (t.is_floating_point() or t.is_complex()):
            continue
        x = t.float() if t.is_floating_point() and t.element_size() == 1 else t  # isfinite lacks some fp8 kernels
        if not bool(torch.isfinite(x).all()):
            raise ArtifactError(path, f"tensor {name!r} holds non-finite values (NaN or inf); refusing to load it")


def _batchable(t: torch.Tensor) -> bool:
    """A tensor `check_finite` checks inside a concatenation: small (the copy is cheap) and of a float dtype of 2 or
    more bytes (isfinite lacks some fp8 kernels)."""
    return t.is_floating_point() and t.element_size() > 1 and t.numel() <= 1 << 16


def stored_dtypes(path: str | Path) -> set[str]:
    """The dtypes (safetensors names, e.g. F32, BF16) of the tensors in a file, from its header only."""
    return {v["dtype"] for k, v in _check_header(Path(path)).items() if k != "__metadata__"}


def read_metadata(path: str | Path) -> dict[str, str]:
    return _check_header(Path(path)).get("__metadata__") or {}


def save_tensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict[str, str] | None = None) -> None:
    # metadata `or None`: safetensors 0.8 writes the invalid header `{},"__metadata__":{}}` for no tensors and {}.
    save_file({k: v.detach().contiguous() for k, v in tensors.items()}, str(path), metadata=metadata or None)
