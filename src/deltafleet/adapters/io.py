"""Adapter directories on disk.

Two layouts, told apart by their files (never by the directory name):
- peft (LoRA, RoAd): `adapter_config.json` + `adapter_model.safetensors`, readable and writable by peft;
- deltafleet (kinds peft lacks, e.g. low-rank deltas): `adapter_model.safetensors` with the same key layout
  (`base_model.model.model.layers.{i}.{self_attn|mlp}.{proj}.{param}`) and no `adapter_config.json`.
Both get a manifest `deltafleet.json` (schema version, kind, typed config, base-model fingerprint, sizes);
peft ignores it. Weights are read only from safetensors; a pickle `.bin` is refused unopened, and so is a weights
file holding NaN or inf (non-finite weights would poison sampling).
Whatever the files hold, loading returns an `Adapter` or raises a `DeltafleetError` (an `ArtifactError` naming the
file and the rule); `tests/fuzz` checks it on hostile inputs.
Other packages add layouts by registering a loader for their manifest's `format` field (`register_format`),
e.g. `deltafleet.compress` for compressed full-fine-tune deltas.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deltafleet.adapters.adapter import Adapter
from deltafleet.adapters.peft_format import KEY_RE, PEFT_KEY_PREFIX, peft_format_for_kind, peft_format_of
from deltafleet.adapters.registry import AdapterConfig, get_kind
from deltafleet.errors import ArtifactError, DeltafleetError
from deltafleet.models.config import PROJECTIONS, ModelConfig
from deltafleet.registry import Registry
from deltafleet.store.manifest import MANIFEST, read_json_object, read_manifest, write_manifest
from deltafleet.store.safetensors_io import check_finite, load_tensors, refuse_pickles, save_tensors, short

PEFT_CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"


FormatLoader = Callable[[Path, dict[str, Any]], Adapter]
FormatSaver = Callable[..., Path]  # (adapter, directory, *, model_cfg, base_fingerprint, base_model, extra) -> dir
BUILTIN_FORMATS = ("peft", "deltafleet")


def _check_format(name: str, loader: FormatLoader) -> None:
    if name in BUILTIN_FORMATS:
        raise ValueError(f"adapter format {name!r} registered twice (it is built in)")


FORMAT_LOADERS: Registry[FormatLoader] = Registry("adapter format", _check_format)
FORMAT_SAVERS: Registry[FormatSaver] = Registry("saver for adapter kind")  # kind -> the saver of its format


def register_format(name: str, loader: FormatLoader, *, kinds: tuple[str, ...] = (),
                    saver: FormatSaver | None = None) -> None:
    """Load directories whose manifest says `"format": name` with `loader(directory, manifest)`; `save_adapter`
    writes adapters of `kinds` with `saver`."""
    if kinds and saver is None:
        raise ValueError(f"adapter format {name!r}: kinds {kinds} need a saver")
    FORMAT_LOADERS.register(name, loader)
    for kind in kinds:
        FORMAT_SAVERS.register(kind, saver)


def _group(proj: str) -> str:
    return "self_attn" if proj in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def _weights_file(directory: Path) -> Path:
    path = directory / WEIGHTS
    if not path.is_file():
        refuse_pickles(directory, WEIGHTS)
        raise ArtifactError(path, "adapter weights file not found")
    return path


def read_module_tensors(directory: Path, param: str, module: str,
                        ) -> tuple[Path, dict[tuple[int, str], tuple[str, torch.Tensor]]]:
    """A deltafleet tenant's weights file holding one tensor `layers.{i}.{NAME}.{param}` per adapted module: its path
    and (layer, NAME) -> (tensor name, tensor). Refused (an `ArtifactError` naming the file) when missing, a pickle,
    non-finite, empty, or holding any other tensor; `module` says what NAME is in the error (PROJ, NORM)."""
    path = directory / WEIGHTS
    if not path.is_file():
        refuse_pickles(directory, WEIGHTS)
        raise ArtifactError(path, "adapter weights file not found")
    tensors = load_tensors(path)
    check_finite(tensors, path)
    out = {}
    for name, t in tensors.items():
        parts = name.split(".")
        if len(parts) != 4 or parts[0] != "layers" or not parts[1].isdigit() or parts[3] != param:
            raise ArtifactError(path, f"unexpected tensor {name[:80]!r} (this tenant holds layers.N.{module}.{param})")
        out[(int(parts[1]), parts[2])] = (name, t)
    if not out:
        raise ArtifactError(path, "holds no adapter tensors")
    return path, out


def write_module_tensors(directory: str | Path, tensors: dict[tuple[int, str], torch.Tensor], param: str, fmt: str,
                         fields: dict[str, Any]) -> Path:
    """Write `layers.{i}.{NAME}.{param}` for each (layer, NAME) in fp16, and the manifest of format `fmt` with
    `fields` plus num_params and bytes; the inverse of `read_module_tensors`."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    stored = {f"layers.{layer}.{name}.{param}": t.detach().to(torch.float16).contiguous()
              for (layer, name), t in sorted(tensors.items())}
    save_tensors(stored, d / WEIGHTS, metadata={"format": fmt})
    n = sum(t.numel() for t in stored.values())
    write_manifest(d, fmt, {**fields, "num_params": n, "bytes": 2 * n})
    return d


def _split_params(tensors: dict[str, torch.Tensor], path: Path,
                  suffix_to_param: dict[str, str]) -> dict[tuple[int, str], dict[str, torch.Tensor]]:
    params: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = KEY_RE.match(key)
        if m is None:
            raise ArtifactError(path, f"tensor {short(key)} is not a decoder-layer projection parameter")
        layer, group, proj, suffix = int(m[1]), m[2], m[3], m[4]
        if proj not in PROJECTIONS or _group(proj) != group:
            raise ArtifactError(path, f"tensor {short(key)} targets unknown module {group}.{proj[:60]}")
        if suffix not in suffix_to_param:
            raise ArtifactError(path, f"tensor {short(key)}: unknown parameter {short(suffix)} "
                                      f"(expected one of {sorted(suffix_to_param)})")
        params.setdefault((layer, proj), {})[suffix_to_param[suffix]] = t
    if not params:
        raise ArtifactError(path, "holds no adapter tensors")
    return params


def config_from_manifest(directory: Path, manifest: dict[str, Any]) -> AdapterConfig:
    """The typed config a manifest's `kind` and `config` fields describe; errors name the manifest."""
    path = directory / MANIFEST
    try:
        kind = get_kind(str(manifest.get("kind")))
    except DeltafleetError as e:
        raise ArtifactError(path, f"field 'kind': {e}") from None
    fields = manifest.get("config")
    if not isinstance(fields, dict):
        raise ArtifactError(path, "missing field 'config'" if fields is None else
                                  f"field 'config'={short(fields)}: must be an object")
    try:
        return kind.config_from_dict(fields)
    except KeyError as e:
        raise ArtifactError(path, f"field 'config' lacks {short(e.args[0])}") from None
    except (TypeError, ValueError, AttributeError, ArithmeticError) as e:  # the kinds' conversions of JSON values
        raise ArtifactError(path, f"field 'config': {str(e)[:200]}") from None


def adapter_layout(directory: str | Path, manifest: dict[str, Any] | None = None) -> str | None:
    """Which layout an adapter directory holds, by its files (never its name): a registered format named by its
    manifest, "peft" (`adapter_config.json`), "deltafleet" (a manifest alone), or None when it is no adapter."""
    d = Path(directory)
    manifest = manifest if manifest is not None else read_manifest(d)
    if manifest is not None and manifest.get("format") in FORMAT_LOADERS:
        return manifest["format"]
    if (d / PEFT_CONFIG).is_file():
        return "peft"
    return "deltafleet" if manifest is not None else None


def peek_config(directory: str | Path) -> AdapterConfig:
    """The typed config of an adapter directory from its config files alone (no weights read)."""
    d = Path(directory)
    manifest = read_manifest(d)
    layout = adapter_layout(d, manifest)
    if layout is None:
        raise ArtifactError(d, f"not an adapter directory: needs {PEFT_CONFIG} (peft) or {MANIFEST} (deltafleet)")
    if layout == "peft":
        cfg_path = d / PEFT_CONFIG
        cfg = read_json_object(cfg_path)
        return peft_format_of(cfg, cfg_path).config_from_peft(cfg, PROJECTIONS, cfg_path)
    return config_from_manifest(d, manifest)


def load_adapter(directory: str | Path, model_cfg: ModelConfig | None = None,
                 expected_fingerprint: str | None = None) -> Adapter:
    """Read a peft or deltafleet adapter directory; shapes are checked against `model_cfg` when given."""
    d = Path(directory)
    if not d.is_dir():
        raise DeltafleetError(f"{d}: adapter directory not found")
    manifest = read_manifest(d)
    if expected_fingerprint and manifest and manifest.get("base_fingerprint") not in (None, expected_fingerprint):
        raise ArtifactError(
            d / MANIFEST,
            f"made for base {str(manifest['base_fingerprint'])[:80]}, but the loaded base is {expected_fingerprint}",
        )
    layout = adapter_layout(d, manifest)
    if layout is None:
        refuse_pickles(d, WEIGHTS)
        raise ArtifactError(d, f"not an adapter directory: needs {PEFT_CONFIG} (peft) or {MANIFEST} (deltafleet)")
    if layout == "peft":
        adapter = _load_peft(d)
    elif layout == "deltafleet":
        adapter = _load_native(d, manifest)
    else:
        adapter = FORMAT_LOADERS[layout](d, manifest)
    if model_cfg is not None:
        try:
            adapter.check_shapes(model_cfg, source=str(d / WEIGHTS))
        except ValueError as e:
            raise ArtifactError(d / WEIGHTS, str(e).split(": ", 1)[-1]) from None
    return adapter


def _load_peft(d: Path) -> Adapter:
    cfg_path = d / PEFT_CONFIG
    cfg = read_json_object(cfg_path)
    fmt = peft_format_of(cfg, cfg_path)
    weights = _weights_file(d)
    suffix_to_param = {v: k for k, v in fmt.key_suffix.items()}
    params = _split_params(_read_weights(weights), weights, suffix_to_param)
    targets = tuple(p for p in PROJECTIONS if any(proj == p for _, proj in params))
    config = fmt.config_from_peft(cfg, targets, cfg_path)
    _check_complete(params, get_kind(fmt.kind).param_names, weights)
    return Adapter(config, params)


def _load_native(d: Path, manifest: dict[str, Any]) -> Adapter:
    config = config_from_manifest(d, manifest)
    kind = get_kind(config.kind)
    weights = _weights_file(d)
    params = _split_params(_read_weights(weights), weights, {n: n for n in kind.param_names})
    _check_complete(params, kind.param_names, weights)
    return Adapter(config, params)


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    tensors = load_tensors(path)
    check_finite(tensors, path)
    return tensors


def _check_complete(params, names, path: Path) -> None:
    for (layer, proj), p in params.items():
        missing = [n for n in names if n not in p]
        if missing:
            raise ArtifactError(path, f"layers.{layer}.{proj} lacks parameter {missing[0]!r}")


def _key(layer: int, proj: str, suffix: str) -> str:
    return f"{PEFT_KEY_PREFIX}model.layers.{layer}.{_group(proj)}.{proj}.{suffix}"


def save_adapter(adapter: Adapter, directory: str | Path, *, model_cfg: ModelConfig | None = None,
                 base_fingerprint: str | None = None, base_model: str | None = None,
                 extra: dict[str, Any] | None = None) -> Path:
    """Write peft's layout when peft knows the kind, a registered format's when one carries the kind, else
    deltafleet's; always with the manifest."""
    if adapter.config.kind in FORMAT_SAVERS:
        return FORMAT_SAVERS[adapter.config.kind](adapter, directory, model_cfg=model_cfg,
                                                  base_fingerprint=base_fingerprint, base_model=base_model,
                                                  extra=extra)
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    fmt = peft_format_for_kind(adapter.config.kind)
    suffix = fmt.key_suffix if fmt else {n: n for n in adapter.kind.param_names}
    tensors = {_key(layer, proj, suffix[n]): t for (layer, proj), p in sorted(adapter.params.items())
               for n, t in p.items()}
    save_tensors(tensors, d / WEIGHTS, metadata={"format": "pt"})
    if fmt:
        peft_cfg = fmt.config_to_peft(adapter.config)
        num_layers = model_cfg.num_layers if model_cfg else max(adapter.layers) + 1
        full = {(layer, proj) for layer in range(num_layers) for proj in adapter.config.targets}
        if set(adapter.params) != full:  # partial coverage: name each adapted module exactly
            peft_cfg["target_modules"] = [f"model.layers.{layer}.{_group(proj)}.{proj}"
                                          for layer, proj in sorted(adapter.params)]
        peft_cfg.update(base_model_name_or_path=base_model, task_type="CAUSAL_LM", inference_mode=True)
        (d / PEFT_CONFIG).write_text(json.dumps(peft_cfg, indent=2))
    write_manifest(d, "peft" if fmt else "deltafleet", {
        "kind": adapter.config.kind,
        "config": adapter.config.to_dict(),
        "base_model": base_model,
        "base_fingerprint": base_fingerprint,
        "num_params": adapter.num_params,
        "bytes": adapter.nbytes,
        **(extra or {}),
    })
    return d
