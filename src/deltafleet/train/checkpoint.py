"""Resumable training checkpoints, with no pickle anywhere (no torch.save, no torch.load).

A checkpoint is a directory `OUT/checkpoints/step-NNNNNNNN/` holding
- `trainable.safetensors`: every parameter that requires grad, by its `named_parameters` name;
- `optimizer.safetensors`: the optimizer's per-parameter state tensors, keyed `state.{index}.{name}`
  (AdamW: `step`, `exp_avg`, `exp_avg_sq`), the index being the parameter's position in `param_names`;
- `state.json`: schema version, `param_names`, the optimizer's param groups and non-tensor state (JSON
  scalars), and the run's progress (`step`, per-step `losses`, `train_seconds`, `tokens`) and identity
  (`run`: base fingerprint, task, method, hyperparameters), which a resumed run must match.
It is written to a temporary directory and renamed into place, so an interrupted save leaves the previous
checkpoint intact; older checkpoints are then removed.

Files are read with `safetensors` itself (which never unpickles): `store.safetensors_io.load_tensors` refuses
any file whose 8-byte header length starts with byte 0x80 as a pickle, which a valid safetensors file does
whenever its header length is 128 mod 256.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from deltafleet.errors import ArtifactError, DeltafleetError
from deltafleet.store.safetensors_io import save_tensors

SCHEMA_VERSION = 1
CHECKPOINTS = "checkpoints"
PREFIX = "step-"


@dataclass
class Progress:
    """Where a run stands; saved with every checkpoint."""

    step: int = 0
    losses: list[float] = field(default_factory=list)  # mean answer-token loss of each step so far
    train_seconds: float = 0.0
    tokens: int = 0  # non-padding tokens processed by all steps so far


def checkpoint_dirs(out: Path) -> list[Path]:
    root = Path(out) / CHECKPOINTS
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX)),
                  key=lambda p: int(p.name[len(PREFIX):]))


def latest_checkpoint(out: Path) -> Path | None:
    dirs = checkpoint_dirs(out)
    return dirs[-1] if dirs else None


def save_checkpoint(out: Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    progress: Progress, run: dict[str, Any]) -> Path:
    """Write checkpoint `step-{progress.step}` and delete older ones; returns its directory."""
    root = Path(out) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    names = list(params)
    opt = optimizer.state_dict()
    tensors, scalars = {}, {}
    for index, state in opt["state"].items():
        for k, v in state.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{index}.{k}"] = v
            else:
                scalars[f"state.{index}.{k}"] = v
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in opt["param_groups"]]
    meta = {"schema_version": SCHEMA_VERSION, "param_names": names, "param_groups": groups,
            "optimizer_scalars": scalars, "step": progress.step, "losses": progress.losses,
            "train_seconds": progress.train_seconds, "tokens": progress.tokens, "run": run}
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        save_tensors({n: p.detach() for n, p in params.items()}, tmp / "trainable.safetensors")
        save_tensors(tensors, tmp / "optimizer.safetensors")
        (tmp / "state.json").write_text(json.dumps(meta, indent=1))
        final = root / f"{PREFIX}{progress.step:08d}"
        if final.exists():
            shutil.rmtree(final)
        tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    for old in checkpoint_dirs(out):
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return final


def _load(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, SafetensorError) as e:
        raise ArtifactError(path, f"unreadable checkpoint tensors ({e})") from None


def load_checkpoint(ckpt: Path, params: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer,
                    run: dict[str, Any]) -> Progress:
    """Copy the checkpoint into `params` (in place) and `optimizer`; refuse one made by a different run."""
    state_path = ckpt / "state.json"
    try:
        meta = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ArtifactError(state_path, f"unreadable checkpoint state ({e})") from None
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ArtifactError(state_path, f"schema_version={meta.get('schema_version')!r}; expected {SCHEMA_VERSION}")
    for k in sorted(set(run) | set(meta["run"])):
        if meta["run"].get(k) != run.get(k):
            raise DeltafleetError(f"{state_path}: cannot resume: {k}={meta['run'].get(k)!r} in the checkpoint, "
                                  f"{run.get(k)!r} now; use the same settings or another --out")
    if meta["param_names"] != list(params):
        raise ArtifactError(state_path, "trainable parameter names differ from the model's")
    saved = _load(ckpt / "trainable.safetensors")
    with torch.no_grad():
        for name, p in params.items():
            if saved[name].shape != p.shape:
                raise ArtifactError(ckpt / "trainable.safetensors",
                                    f"{name}: shape {tuple(saved[name].shape)}, model has {tuple(p.shape)}")
            p.copy_(saved[name])
    opt_tensors = _load(ckpt / "optimizer.safetensors")
    state: dict[int, dict[str, Any]] = {}
    for key, v in [*opt_tensors.items(), *meta["optimizer_scalars"].items()]:
        _, index, name = key.split(".", 2)
        state.setdefault(int(index), {})[name] = v
    optimizer.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
    return Progress(step=meta["step"], losses=list(meta["losses"]), train_seconds=meta["train_seconds"],
                    tokens=meta["tokens"])
