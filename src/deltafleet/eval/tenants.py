"""What a subdirectory of an adapters directory is, and how evaluation gets a model for it.

Told apart by files, never by directory names:
- `adapter`: a peft directory of a type deltafleet serves (LoRA, RoAd), or a deltafleet-format adapter
  (`deltafleet.json` with an adapter kind, e.g. `lowrank`): served by the engine on the shared base;
- `folded`: a peft directory of a type the engine has no serving form for (IA3): its weights are folded into
  a private copy of the base, which then runs as a model of its own;
- `checkpoint`: a full fine-tune (`config.json` + `*.safetensors`, as `deltafleet train --method full` writes):
  loaded as a model of its own.

Folding IA3 (Liu et al. 2022, sec. 3.3): peft scales a feed-forward module's input, W (l * x) = (W diag(l)) x,
and other modules' output, l * (W x + b); its `ia3_l` is stored as (1, in) or (out, 1) respectively, so both
fold as W * l (broadcast), and an output scaling also scales the bias.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from deltafleet.adapters.io import PEFT_CONFIG, WEIGHTS, adapter_layout, peek_config
from deltafleet.adapters.peft_format import KEY_RE, PEFT_FORMATS
from deltafleet.errors import ArtifactError, DeltafleetError
from deltafleet.models.llama import Transformer
from deltafleet.models.loading import load_model
from deltafleet.store.manifest import MANIFEST, read_manifest
from deltafleet.store.safetensors_io import load_tensors

ADAPTER, FOLDED, CHECKPOINT, BASE = "adapter", "folded", "checkpoint", "base"


@dataclass(frozen=True)
class Tenant:
    """One row of an evaluation: `served` is how it runs (see the module docstring); `method` as trained."""

    name: str
    path: Path | None
    method: str
    served: str
    task: str | None  # the manifest's task (None when the directory has no manifest or it names none)
    manifest: dict[str, Any] = field(default_factory=dict)

    @property
    def weight_bytes(self) -> int | None:
        """Bytes of the weight files on disk (the adapter file, or the whole checkpoint)."""
        if self.path is None:
            return None
        files = [self.path / WEIGHTS] if self.served != CHECKPOINT else sorted(self.path.glob("*.safetensors"))
        return sum(f.stat().st_size for f in files if f.is_file())


def _fold_ia3(model: Transformer, directory: Path, peft_config: dict[str, Any]) -> None:
    ff = peft_config.get("feedforward_modules") or []
    if isinstance(ff, str):
        raise ArtifactError(directory / PEFT_CONFIG, f"feedforward_modules={ff!r}: a regex is not supported; "
                                                     f"list the module names")
    ff_projs = {str(n).rsplit(".", 1)[-1] for n in ff}
    weights = directory / WEIGHTS
    for key, t in load_tensors(weights).items():
        m = KEY_RE.match(key)
        if m is None or m[4] != "ia3_l":
            raise ArtifactError(weights, f"tensor {key!r} is not an IA3 scaling vector of a decoder projection")
        layer, proj = int(m[1]), m[3]
        lin = model.linear(layer, proj)
        out_f, in_f = lin.weight.shape
        want = (1, in_f) if proj in ff_projs else (out_f, 1)
        if tuple(t.shape) != want:
            raise ArtifactError(weights, f"tensor {key!r} has shape {tuple(t.shape)}, expected {want}")
        with torch.no_grad():
            lin.weight.mul_(t.to(lin.weight.dtype))
            if lin.bias is not None and proj not in ff_projs:
                lin.bias.mul_(t[:, 0].to(lin.bias.dtype))


# peft type -> fold(model, directory, adapter_config) for peft types the engine cannot serve.
FOLDERS: dict[str, Callable[[Transformer, Path, dict[str, Any]], None]] = {"IA3": _fold_ia3}


def _peft_config(d: Path) -> dict[str, Any]:
    try:
        return json.loads((d / PEFT_CONFIG).read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(d / PEFT_CONFIG, f"not valid JSON ({e})") from None


def classify(d: Path) -> Tenant:
    """The tenant stored in directory `d` (raises naming the rule when it is none of the three forms)."""
    manifest = read_manifest(d) or {}
    task = manifest.get("task")
    if (d / PEFT_CONFIG).is_file():
        peft_type = _peft_config(d).get("peft_type")
        if peft_type in PEFT_FORMATS:
            return Tenant(d.name, d, PEFT_FORMATS[peft_type].kind, ADAPTER, task, manifest)
        if peft_type in FOLDERS:
            return Tenant(d.name, d, str(peft_type).lower(), FOLDED, task, manifest)
        raise ArtifactError(d / PEFT_CONFIG, f"peft_type={peft_type!r}: deltafleet evaluates "
                                             f"{sorted([*PEFT_FORMATS, *FOLDERS])}")
    if (d / "config.json").is_file() and any(d.glob("*.safetensors")):
        return Tenant(d.name, d, str(manifest.get("method", "full")), CHECKPOINT, task, manifest)
    if adapter_layout(d, manifest or None) is not None and any(d.glob("*.safetensors")):
        return Tenant(d.name, d, peek_config(d).kind, ADAPTER, task, manifest)
    raise DeltafleetError(f"{d}: not a tenant: needs {PEFT_CONFIG} (peft adapter), config.json + *.safetensors "
                          f"(full fine-tune) or {MANIFEST} + {WEIGHTS} (deltafleet adapter)")


def discover(directory: str | Path) -> list[Tenant]:
    """Every subdirectory of `directory` (sorted, hidden ones skipped) as a tenant named after it."""
    root = Path(directory)
    if not root.is_dir():
        raise DeltafleetError(f"{root}: adapters directory not found")
    return [classify(d) for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))]


def tenant_model(tenant: Tenant, base: str | Path, dtype: torch.dtype) -> Transformer:
    """The model a folded or checkpoint tenant runs as (fp32 folding, then cast to `dtype`)."""

    if tenant.served == CHECKPOINT:
        return load_model(tenant.path, dtype=dtype)[0]
    if tenant.served != FOLDED:
        raise ValueError(f"tenant {tenant.name!r} is served as {tenant.served!r}: it runs on the shared base")
    model, _ = load_model(base, dtype=torch.float32)
    config = _peft_config(tenant.path)
    FOLDERS[config["peft_type"]](model, tenant.path, config)
    return model.to(dtype)
