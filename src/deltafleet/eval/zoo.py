"""The zoo: the fine-tunes of the embedded SmolLM2 that later stages (delta compression, low-bit base) measure
against, built by `deltafleet zoo build` with the training recipe, one run per entry.

Plan (`ZooPlan`, a typed dataclass): for each selected task one run per adapter method (LoRA, RoAd, IA3); for
each of the `full_tasks` (at least 3) also a full fine-tune; and one broad full fine-tune on `all-tasks` (every
exact-match task jointly, `tasks.mixture`), trained for more steps so that its delta is far from low-rank.

Resumable and cached: entry `name` trains into `OUT/name`; an entry whose manifest says `completed` with the
planned steps is skipped, one with checkpoints but no finished manifest is resumed (`TrainConfig.resume`, same
data order). Ctrl-C stops the current entry at a safe point (the recipe saves a checkpoint) and ends the build;
rerunning the command continues. OUT defaults to the cache directory (`$DELTAFLEET_CACHE_DIR/zoo/<base>`), never
the repository.

Energy profile of each full fine-tune: per projection type (q, k, v, o, gate, up, down), the fraction of
sum_layers ||dW||_F^2 held by each layer's top-k singular values (dW = W_finetuned - W_base), k in 8, 32, 128,
the median over layers of the number of singular values holding 90% of a layer's energy, and ||dW||_F / ||W||_F.
Written to `OUT/energy.json` and `OUT/energy.md`. A delta is "nearly low-rank" when top-32 holds most of it.
"""

from __future__ import annotations

import contextlib
import json
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from deltafleet.errors import DeltafleetError
from deltafleet.eval.core import validation_metrics
from deltafleet.models.config import PROJECTIONS
from deltafleet.models.loading import read_checkpoint_tensors, resolve_base
from deltafleet.store.cache import cache_dir
from deltafleet.store.manifest import read_manifest
from deltafleet.tasks import get_task
from deltafleet.tasks.mixture import ALL_TASKS
from deltafleet.train.checkpoint import latest_checkpoint
from deltafleet.train.config import TrainConfig
from deltafleet.train.recipe import train

ADAPTER_METHODS = ("lora", "road", "ia3")
ENERGY_KS = (8, 32, 128)
PLAN_FILE = "zoo.json"
# Seconds per optimizer step (batch 8, ~60-token examples) measured with `deltafleet train` on this project's
# 2-core AVX2 CPU in fp32 (LoRA on json-field / sort: 3.5 / 4.5 s); used only for the runtime estimate.
SECONDS_PER_STEP = {"lora": 4.0, "road": 3.8, "ia3": 3.5, "full": 6.0}
# Learning rates of the zoo's short runs (80-150 steps). The recipe's defaults are the papers' for long runs;
# LoRA at its default 3e-4 reached 0.03 accuracy on addition after 60 steps, at 2e-3 json-field reached 1.00
# and sort 0.59 after 40 steps (measured here). RoAd keeps the paper's ratio of about 10x LoRA's rate.
ZOO_LRS = (("lora", 2e-3), ("road", 2e-2), ("ia3", 1e-2), ("full", 5e-5))
_WEIGHT_RE = re.compile(r"^model\.layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.weight$")


@dataclass(frozen=True)
class ZooEntry:
    name: str
    task: str
    method: str
    steps: int


@dataclass(frozen=True)
class ZooPlan:
    """tasks: every task gets one run per `adapter_methods`; full_tasks (a subset) also a full fine-tune;
    broad_steps > 0 adds the broad full fine-tune `broad-full` on all-tasks; lrs: (method, learning rate) pairs,
    a method left out trains at the recipe's default."""

    base: str = "smollm2-135m"
    tasks: tuple[str, ...] = ("json-field", "sort", "reverse-words")
    full_tasks: tuple[str, ...] = ("json-field", "sort", "reverse-words")
    adapter_methods: tuple[str, ...] = ADAPTER_METHODS
    adapter_steps: int = 80
    full_steps: int = 80
    broad_steps: int = 150
    lrs: tuple[tuple[str, float], ...] = ZOO_LRS
    batch_size: int = 8
    seed: int = 0
    precision: str = "auto"
    save_every: int = 25
    eval_examples: int = 16
    min_full_tasks: int = 3

    def __post_init__(self) -> None:
        for name in ("tasks", "full_tasks", "adapter_methods"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        object.__setattr__(self, "lrs", tuple((str(m), float(lr)) for m, lr in self.lrs))
        for m, lr in self.lrs:
            if m not in (*ADAPTER_METHODS, "full") or not lr > 0:
                raise ValueError(f"lrs: ({m!r}, {lr!r}) needs a method of {(*ADAPTER_METHODS, 'full')} and lr > 0")
        for t in self.tasks:
            task = get_task(t)
            if task.kind != "exact_match":
                raise ValueError(f"tasks: {t!r} is a {task.kind} task; the zoo's tasks are exact_match")
        if not set(self.full_tasks) <= set(self.tasks):
            raise ValueError(f"full_tasks={self.full_tasks!r}: must be a subset of tasks={self.tasks!r}")
        if len(self.full_tasks) < min(self.min_full_tasks, len(self.tasks)):
            raise ValueError(f"full_tasks={self.full_tasks!r}: the zoo needs full fine-tunes on at least "
                             f"{min(self.min_full_tasks, len(self.tasks))} tasks")
        unknown = [m for m in self.adapter_methods if m not in ADAPTER_METHODS]
        if unknown:
            raise ValueError(f"adapter_methods: {unknown[0]!r} is not one of {ADAPTER_METHODS}")
        for name in ("adapter_steps", "full_steps", "batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name}={v!r}: must be a positive integer")
        if not isinstance(self.broad_steps, int) or self.broad_steps < 0:
            raise ValueError(f"broad_steps={self.broad_steps!r}: must be an integer >= 0 (0: no broad fine-tune)")

    def entries(self) -> list[ZooEntry]:
        out = []
        for t in self.tasks:
            out += [ZooEntry(f"{t}-{m}", t, m, self.adapter_steps) for m in self.adapter_methods]
            if t in self.full_tasks:
                out.append(ZooEntry(f"{t}-full", t, "full", self.full_steps))
        if self.broad_steps:
            out.append(ZooEntry("broad-full", ALL_TASKS, "full", self.broad_steps))
        return out

    def estimated_seconds(self) -> float:
        return sum(SECONDS_PER_STEP[e.method] * e.steps * self.batch_size / 8 for e in self.entries())


def scaled(plan: ZooPlan, *, tasks: Sequence[str] | None = None, steps: int | None = None,
           **changes: Any) -> ZooPlan:
    """A copy of `plan` restricted to `tasks` (full fine-tunes kept where the task stays) and, with `steps`,
    every run at `steps` steps (the broad one at 2 x steps): the scaled-down plans of tests and quick checks."""
    d = asdict(plan) | changes
    if tasks is not None:
        d["tasks"] = tuple(tasks)
        d["full_tasks"] = tuple(t for t in tasks if t in plan.full_tasks) or tuple(tasks)[: plan.min_full_tasks]
    if steps is not None:
        d.update(adapter_steps=steps, full_steps=steps, broad_steps=2 * steps if d["broad_steps"] else 0)
    return ZooPlan(**d)


def default_out(base: str) -> Path:

    return cache_dir() / "zoo" / Path(base).name


def entry_status(out: Path, entry: ZooEntry) -> str:
    """done (finished manifest with the planned steps), partial (checkpoints to resume) or missing."""

    d = out / entry.name
    manifest = read_manifest(d) if d.is_dir() else None
    if manifest and manifest.get("completed") and manifest.get("steps") == entry.steps:
        return "done"
    return "partial" if latest_checkpoint(d) is not None else "missing"


# ----------------------------------------------------------------------------------------------- energy
@contextlib.contextmanager
def _one_thread():
    """LAPACK's threaded eigensolvers crawl on an oversubscribed CPU (one 1536 x 576 delta: 21 s with 2 threads
    while other jobs ran, 0.3 s with 1), and one thread is fast enough here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def squared_singular_values(delta: torch.Tensor) -> torch.Tensor:
    """sigma_i^2 of `delta`, descending: eigenvalues of the smaller Gram matrix (fp64), clamped at 0."""
    d = delta.double()
    gram = d @ d.T if d.shape[0] <= d.shape[1] else d.T @ d
    return torch.linalg.eigvalsh(gram).flip(0).clamp_min(0)


def delta_energy(delta: torch.Tensor, ks: Sequence[int] = ENERGY_KS) -> dict[str, Any]:
    """Singular-value energy of one delta matrix: total ||dW||_F^2, energy in the top-k for each k, and the
    number of singular values holding 90% of the energy."""
    with _one_thread():
        s2 = squared_singular_values(delta)
    total = float(s2.sum())
    cum = torch.cumsum(s2, 0)
    rank90 = int(torch.searchsorted(cum, 0.9 * cum[-1]).item()) + 1 if total > 0 else 0
    return {"total": total, "top": {k: float(cum[min(k, len(cum)) - 1]) for k in ks}, "rank_90": rank90}


def energy_profile(base: dict[str, torch.Tensor], tuned: dict[str, torch.Tensor],
                   ks: Sequence[int] = ENERGY_KS) -> dict[str, Any]:
    """Per projection type over all layers (see the module docstring); key "all" pools every projection."""
    per: dict[str, list[tuple[dict[str, Any], float]]] = {}
    for key, w in base.items():
        m = _WEIGHT_RE.match(key)
        if m is None or m[2] not in PROJECTIONS:
            continue
        if key not in tuned:
            raise DeltafleetError(f"fine-tune lacks tensor {key!r}")
        per.setdefault(m[2], []).append((delta_energy(tuned[key].float() - w.float(), ks), float(w.double().norm())))
    if not per:
        raise DeltafleetError("no decoder projection weights found (expected model.layers.N.*.<proj>.weight)")

    def summarise(items: list[tuple[dict[str, Any], float]]) -> dict[str, Any]:
        total = sum(e["total"] for e, _ in items)
        return {**{f"top{k}": (sum(e["top"][k] for e, _ in items) / total if total else 0.0) for k in ks},
                "rank_90_median": statistics.median(e["rank_90"] for e, _ in items),
                "rel_norm": (total / sum(n * n for _, n in items)) ** 0.5, "layers": len(items)}

    out = {proj: summarise(per[proj]) for proj in PROJECTIONS if proj in per}
    out["all"] = summarise([x for items in per.values() for x in items])
    return out


def checkpoint_energy(base_dir: Path, tuned_dir: Path, ks: Sequence[int] = ENERGY_KS) -> dict[str, Any]:

    return energy_profile(read_checkpoint_tensors(base_dir)[0], read_checkpoint_tensors(tuned_dir)[0], ks)


def energy_markdown(profiles: dict[str, dict[str, Any]], ks: Sequence[int] = ENERGY_KS) -> str:
    head = ["fine-tune", "projection", *(f"top-{k}" for k in ks), "rank for 90% (median)", "‖ΔW‖/‖W‖"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, prof in profiles.items():
        for proj, p in prof.items():
            lines.append(f"| {name} | {proj} | " + " | ".join(f"{p[f'top{k}']:.3f}" for k in ks)
                         + f" | {p['rank_90_median']:g} | {p['rel_norm']:.2e} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- build
@dataclass
class BuildReport:
    out: Path
    statuses: dict[str, str]  # entry -> cached | trained | interrupted | pending
    energy: dict[str, dict[str, Any]]
    seconds: float

    @property
    def completed(self) -> bool:
        return all(s in ("cached", "trained") for s in self.statuses.values())


def build(plan: ZooPlan, out: Path, *, console=None, show_progress: bool = True,
          progress: Callable[[str], None] = lambda _: None) -> BuildReport:
    """Train every missing entry of `plan` into `out` (resuming partial ones), then write the energy profiles."""

    t0 = time.perf_counter()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    entries = plan.entries()
    (out / PLAN_FILE).write_text(json.dumps({"plan": asdict(plan), "entries": [asdict(e) for e in entries]},
                                            indent=2))
    statuses = {e.name: "pending" for e in entries}
    for i, e in enumerate(entries):
        status = entry_status(out, e)
        if status == "done":
            statuses[e.name] = "cached"
            continue
        d = out / e.name
        progress(f"[{i + 1}/{len(entries)}] {e.name}: {e.method} on {e.task}, {e.steps} steps"
                 + (" (resuming)" if status == "partial" else ""))
        cfg = TrainConfig(base=plan.base, task=e.task, method=e.method, out=d, steps=e.steps,
                          batch_size=plan.batch_size, precision=plan.precision, seed=plan.seed,
                          lr=dict(plan.lrs).get(e.method),
                          save_every=plan.save_every, eval_examples=plan.eval_examples,
                          resume=latest_checkpoint(d) is not None)
        result = train(cfg, console=console, show_progress=show_progress, validate=validation_metrics)
        if not result.completed:
            statuses[e.name] = "interrupted"
            return BuildReport(out, statuses, {}, time.perf_counter() - t0)
        statuses[e.name] = "trained"

    base_dir = resolve_base(plan.base)
    energy = {}
    for e in entries:
        if e.method == "full":
            progress(f"energy profile of {e.name}")
            energy[e.name] = checkpoint_energy(base_dir, out / e.name)
    (out / "energy.json").write_text(json.dumps({"ks": list(ENERGY_KS), "profiles": energy}, indent=2))
    (out / "energy.md").write_text(energy_markdown(energy))
    return BuildReport(out, statuses, energy, time.perf_counter() - t0)
