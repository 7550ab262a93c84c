"""The compressed-delta artifact: a directory with a manifest and safetensors files.

    deltafleet.json     manifest: schema_version, format "deltafleet-delta", kind + typed config (band plan),
                        method + settings, base model + fingerprint, bytes (total and per module), the shape of
                        each module, the extras, and the SHA-256 of each weights file
    delta.safetensors   per projection `layers.{i}.{proj}.{param}`: packed integer codes (uint8), fp16 scales,
                        uint8 zero points, fp16 singular values (qlowrank); packed signs + scale (bitdelta);
                        CSR values, column indices, row pointers (sparse); a whole fine-tune's table delta as
                        `lm_head.{param}` (and `embed_tokens.{param}` for an untied base), compressed by the same
                        kind, and its RMSNorm gain deltas exactly, fp16, as `gains.layers.{i}.{norm}` and
                        `gains.norm` (manifest field `gains`: their names)
    extras.safetensors  other parameters the fine-tune changed (biases), exact, under their checkpoint names; the
                        engine does not serve them (artifacts written before tables and gains kept the embedding
                        and norms here too)

Loading checks every rule and names the file: schema version, the types of the manifest's fields, checksums (a
corrupted or truncated file is refused), complete and correctly shaped parameters, finite floating-point values,
for kinds served from their stored form (`compact`) that the serving form builds (e.g. zero points in range), and
(through `adapters.io.load_adapter`) the base-model fingerprint. Whatever the files hold, loading returns or raises
an `ArtifactError`. The loader is registered with `adapters.io.register_format` when `deltafleet.adapters` is
imported, so engines load these directories like any adapter (by the manifest's `format`, never by file names).
The writer of a compression run's artifact (with its statistics) is `deltafleet.compress.artifact.save_compressed`.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path
from typing import Any

import torch

from deltafleet.adapters.adapter import Adapter, ModuleKey, module_name
from deltafleet.adapters.io import config_from_manifest
from deltafleet.adapters.registry import get_kind
from deltafleet.errors import ArtifactError
from deltafleet.models.config import MODEL_LAYER, PROJECTIONS, ModelConfig
from deltafleet.store.manifest import MANIFEST, read_manifest, write_manifest
from deltafleet.store.safetensors_io import check_finite, load_tensors, save_tensors, short

FORMAT = "deltafleet-delta"
DELTA_FILE = "delta.safetensors"
EXTRAS_FILE = "extras.safetensors"
KEY_RE = re.compile(r"^layers\.([0-9]{1,9})\.(\w+)\.(.+)$")  # at most 9 digits, as in `peft_format.KEY_RE`
TABLE_KEY_RE = re.compile(r"^(embed_tokens|lm_head)\.(.+)$")
GAIN_KEY_RE = re.compile(r"^gains\.(?:layers\.([0-9]{1,9})\.(input_layernorm|post_attention_layernorm)|(norm))$")
GAIN_PREFIX = "gains."
SERVING_NOTE = ("the engine serves the projection and table deltas and the norm gain deltas; the extras (exact "
                "tensors) are applied by `deltafleet merge` only")
log = logging.getLogger(__name__)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def write_artifact(adapter: Adapter, directory: str | Path, shapes: dict[tuple[int, str], tuple[int, int]],
                   extras: dict[str, torch.Tensor], fields: dict[str, Any]) -> Path:
    """The files of an artifact: delta.safetensors, extras.safetensors (if any) and the manifest with `fields`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {f"{module_name(layer, proj)}.{n}": t for (layer, proj), p in sorted(adapter.params.items())
               for n, t in p.items()}
    tensors |= {GAIN_PREFIX + module_name(*k): g.half() for k, g in sorted(adapter.gains.items())}
    save_tensors(tensors, d / DELTA_FILE, metadata={"format": FORMAT})
    files = {DELTA_FILE: sha256(d / DELTA_FILE)}
    if extras:
        save_tensors(extras, d / EXTRAS_FILE, metadata={"format": FORMAT})
        files[EXTRAS_FILE] = sha256(d / EXTRAS_FILE)
    manifest = {"kind": adapter.config.kind, "config": adapter.config.to_dict(), **fields}
    modules = manifest.setdefault("modules", {})
    for (layer, proj), shape in shapes.items():
        if (layer, proj) in adapter.params:
            modules.setdefault(module_name(layer, proj), {})["shape"] = list(shape)
    if adapter.gains:
        manifest["gains"] = [module_name(*k) for k in sorted(adapter.gains)]
    manifest |= {"extras": [{"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."),
                             "bytes": t.numel() * t.element_size()} for n, t in sorted(extras.items())],
                 "files": files, "serving": SERVING_NOTE}
    write_manifest(d, FORMAT, manifest)
    return d


def save_adapter_artifact(adapter: Adapter, directory: str | Path, *, model_cfg: ModelConfig | None = None,
                          base_fingerprint: str | None = None, base_model: str | None = None,
                          extra: dict[str, Any] | None = None) -> Path:
    """`adapters.io.save_adapter` for the compressed kinds (an adapter without compression statistics)."""
    if model_cfg is None:
        raise ValueError(f"saving a {adapter.config.kind!r} adapter needs model_cfg (projection shapes)")
    shapes = {(layer, proj): model_cfg.module_shape(proj) for layer, proj in adapter.params}
    fields = {"base_model": base_model, "base_fingerprint": base_fingerprint,
              "bytes": {"compressed": adapter.nbytes}, **(extra or {})}
    return write_artifact(adapter, directory, shapes, {}, fields)


def _verified(d: Path, manifest: dict[str, Any], name: str) -> Path:
    path = d / name
    files = manifest.get("files")
    want = files.get(name) if isinstance(files, dict) else None
    if not isinstance(want, str):
        raise ArtifactError(d / MANIFEST, f"field 'files' lists no checksum for {name}")
    if not path.is_file():
        raise ArtifactError(path, "file not found")
    got = sha256(path)
    if got != want:
        raise ArtifactError(path, f"checksum mismatch (sha256 {got[:16]}..., manifest {want[:16]}...): the file is "
                                  f"corrupted or was modified; refusing to load it")
    return path


def load_compressed(directory: str | Path, manifest: dict[str, Any] | None = None) -> Adapter:
    """Read and validate the projection deltas of an artifact (registered with `adapters.io`)."""
    d = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(d)
    if manifest is None or manifest.get("format") != FORMAT:
        raise ArtifactError(d / MANIFEST, f"not a compressed-delta manifest (format must be {FORMAT!r})")
    mpath = d / MANIFEST
    config = config_from_manifest(d, manifest)
    kind = get_kind(config.kind)
    shapes = _module_shapes(manifest, mpath)
    extras = _extras(manifest, mpath)
    path = _verified(d, manifest, DELTA_FILE)
    tensors = load_tensors(path)
    check_finite(tensors, path)
    params: dict[ModuleKey, dict[str, torch.Tensor]] = {}
    gains: dict[ModuleKey, torch.Tensor] = {}
    for key, t in tensors.items():
        if key.startswith(GAIN_PREFIX):
            g = GAIN_KEY_RE.match(key)
            if g is None or t.dim() != 1:
                raise ArtifactError(path, f"tensor {short(key)}: a gain delta is gains.layers.N.(input_layernorm|"
                                          f"post_attention_layernorm) or gains.norm, one vector each")
            gains[(MODEL_LAYER, "norm") if g[3] else (int(g[1]), g[2])] = t
            continue
        m, tm = KEY_RE.match(key), TABLE_KEY_RE.match(key)
        if tm is not None:
            params.setdefault((MODEL_LAYER, tm[1]), {})[tm[2]] = t
            continue
        if m is None or m[2] not in PROJECTIONS:
            raise ArtifactError(path, f"tensor {short(key)} is not a projection parameter (layers.N.PROJ.NAME), a "
                                      f"table's (lm_head.NAME, embed_tokens.NAME) or a gain delta (gains.MODULE)")
        params.setdefault((int(m[1]), m[2]), {})[m[3]] = t
    if set(module_name(*k) for k in params) != set(shapes):
        raise ArtifactError(path, "its modules differ from the manifest's 'modules'")
    if sorted(module_name(*k) for k in gains) != sorted(_gains(manifest, mpath)):
        raise ArtifactError(path, "its gain deltas differ from the manifest's 'gains'")
    for (layer, proj), p in params.items():
        out_f, in_f = shapes[module_name(layer, proj)]
        try:
            want = kind.module_param_shapes(config, out_f, in_f, module_name(layer, proj))
        except ValueError as e:
            raise ArtifactError(mpath, str(e)) from None
        got = {n: tuple(t.shape) for n, t in p.items()}
        if got != want:
            bad = sorted(set(got) ^ set(want)) or sorted(n for n in want if got[n] != want[n])
            raise ArtifactError(path, f"{module_name(layer, proj)}: parameter {short(bad[0])} has shape "
                                      f"{got.get(bad[0])}, expected {want.get(bad[0])}")
        if kind.compact:  # served from the stored form, built when a slot is written: check it builds
            try:
                kind.check_serving(config, p)
            except ValueError as e:
                raise ArtifactError(path, f"{module_name(layer, proj)}: {e}") from None
    if extras:
        log.warning("%s: %d changed tensors kept exactly (%s) are not served; %s", d, len(extras),
                    ", ".join(extras[:3]), SERVING_NOTE)
    return Adapter(config, params, gains)


def _gains(manifest: dict[str, Any], mpath: Path) -> list[str]:
    """The manifest's `gains`: a list of module names (absent: none)."""
    gains = manifest.get("gains") or []
    if not isinstance(gains, list) or not all(isinstance(n, str) for n in gains):
        raise ArtifactError(mpath, f"field 'gains'={short(gains)}: must be a list of module names")
    return gains


def _module_shapes(manifest: dict[str, Any], mpath: Path) -> dict[str, tuple[int, int]]:
    """The manifest's `modules`: module name -> (out, in), both positive integers."""
    modules = manifest.get("modules")
    if not isinstance(modules, dict):
        raise ArtifactError(mpath, "missing field 'modules'" if modules is None else
                                   f"field 'modules'={short(modules)}: must be an object")
    shapes = {}
    for name, v in modules.items():
        shape = v.get("shape") if isinstance(v, dict) else None
        if not (isinstance(shape, list) and len(shape) == 2
                and all(isinstance(n, int) and not isinstance(n, bool) and n > 0 for n in shape)):
            raise ArtifactError(mpath, f"modules[{short(name)}]: needs a 'shape' [out, in] of positive integers, "
                                       f"got {short(v)}")
        shapes[name] = (shape[0], shape[1])
    return shapes


def _extras(manifest: dict[str, Any], mpath: Path) -> list[str]:
    """The names in the manifest's `extras` (a list of objects with a string `name`; absent: none)."""
    extras = manifest.get("extras") or []
    if not isinstance(extras, list) or not all(isinstance(e, dict) and isinstance(e.get("name"), str)
                                               for e in extras):
        raise ArtifactError(mpath, f"field 'extras'={short(extras)}: must be a list of objects with a string 'name'")
    return [e["name"] for e in extras]


def load_extras(directory: str | Path) -> dict[str, torch.Tensor]:
    d = Path(directory)
    manifest = read_manifest(d) or {}
    names = set(_extras(manifest, d / MANIFEST))
    if not names:
        return {}
    path = _verified(d, manifest, EXTRAS_FILE)
    tensors = load_tensors(path)
    check_finite(tensors, path)
    if set(tensors) != names:
        raise ArtifactError(d / EXTRAS_FILE, "its tensors differ from the manifest's 'extras'")
    return tensors
