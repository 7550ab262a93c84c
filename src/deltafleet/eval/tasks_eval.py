"""`deltafleet eval`: every tenant of an adapters directory on its task, all together through the engine.

    tenants  = discover(adapters dir)  (+ the bare base, row "base", on every task evaluated)
    tasks    = a tenant's manifest task (a mixture task: each member), filtered by --tasks (mixtures expanded);
               a tenant without a manifest task is evaluated on every --tasks task
    examples = task.examples(split, n=min(--examples, split size), seed)  (the same for every tenant)

Exact-match tasks: every (tenant, example) pair becomes one greedy `Request` (stop at the end-of-turn token only,
at most the longest answer + 4 tokens), interleaved round-robin across tenants, and all requests of the shared
base go to ONE `Engine.generate` call, so continuous batching mixes tenants in every batch. The answer is the
generated tokens decoded without special tokens, scored by the task (whitespace-normalised exact match).
Tenants the engine cannot serve as an adapter (IA3, folded into a copy of the base; full fine-tunes) run the
same way on an engine of their own, one per such tenant.

Perplexity tasks (Shakespeare): the answer tokens of each example, teacher-forced through our model with the
tenant's adapter hook (`Adapter.hook()`); ppl = exp(total answer NLL / answer tokens), as in `tasks.base`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deltafleet.adapters import Adapter, load_adapter
from deltafleet.dtypes import DTYPES
from deltafleet.errors import DeltafleetError
from deltafleet.eval.core import (
    adapters_engine_config,
    answer_budget,
    answer_nll,
    engine_generate,
    score,
    transformer_logits,
)
from deltafleet.eval.tenants import ADAPTER, BASE, Tenant, discover, tenant_model
from deltafleet.models.llama import ProjectionHook, Transformer
from deltafleet.models.loading import load_model, load_tokenizer, resolve_base
from deltafleet.serve.engine import Engine
from deltafleet.store.fingerprint import base_fingerprint
from deltafleet.tasks import SPLITS, TASKS, Example, end_of_turn_id, get_task, prompt_ids
from deltafleet.tasks.mixture import MixtureTask


@dataclass(frozen=True)
class EvalConfig:
    """base: embedded name or checkpoint; adapters: directory of tenants (None: the base only)."""

    base: str
    adapters: Path | None = None
    tasks: tuple[str, ...] | None = None
    examples: int = 100
    split: str = "test"
    seed: int = 0
    dtype: str = "float32"
    max_batch: int = 32
    include_base: bool = True
    ppl_batch_size: int = 8
    max_seq_len: int = 512

    def __post_init__(self) -> None:
        if self.adapters is not None:
            object.__setattr__(self, "adapters", Path(self.adapters))
        if self.tasks is not None:
            object.__setattr__(self, "tasks", tuple(self.tasks))
            for t in self.tasks:
                get_task(t)
        for name in ("examples", "max_batch", "ppl_batch_size", "max_seq_len"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name}={v!r}: must be a positive integer")
        if self.split not in SPLITS:
            raise ValueError(f"split={self.split!r}: must be one of {SPLITS}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r}: must be one of {sorted(DTYPES)}")
        if self.adapters is None and not self.include_base:
            raise ValueError("include_base=False needs an adapters directory: nothing to evaluate")


@dataclass
class TaskScore:
    """metric: "accuracy" (exact match) or "perplexity"; predictions: generated answers (exact match only)."""

    task: str
    metric: str
    value: float
    n: int
    predictions: list[str] = field(default_factory=list)


@dataclass
class TenantResult:
    tenant: Tenant
    tasks: tuple[str, ...]
    scores: dict[str, TaskScore] = field(default_factory=dict)
    trainable_params: int | None = None

    def to_dict(self) -> dict[str, Any]:
        m = self.tenant.manifest
        return {"method": self.tenant.method, "served": self.tenant.served,
                "path": None if self.tenant.path is None else str(self.tenant.path), "task": self.tenant.task,
                "trainable_params": self.trainable_params, "bytes": self.tenant.weight_bytes,
                "train_seconds": m.get("train_seconds"), "steps": m.get("steps"),
                "scores": {t: {"metric": s.metric, "value": s.value, "n": s.n} for t, s in self.scores.items()}}


@dataclass
class EvalReport:
    config: EvalConfig
    results: list[TenantResult]
    skipped: list[str]  # tenants with no task left after --tasks
    engines: list[dict[str, Any]]  # per engine run: tenants, requests, generated tokens, seconds
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        c = self.config
        return {"base": c.base, "adapters": None if c.adapters is None else str(c.adapters), "split": c.split,
                "examples": c.examples, "seed": c.seed, "dtype": c.dtype,
                "tenants": {r.tenant.name: r.to_dict() for r in self.results}, "skipped": self.skipped,
                "engines": self.engines, "seconds": round(self.seconds, 3)}


def expand(task_name: str) -> tuple[str, ...]:
    """A task, or a mixture task's members."""
    task = get_task(task_name)
    return task.member_names() if isinstance(task, MixtureTask) else (task_name,)


def tenant_tasks(tenant: Tenant, selected: Sequence[str] | None) -> tuple[str, ...]:
    if tenant.task is None:
        if selected is None:
            raise DeltafleetError(f"tenant {tenant.name!r}: its manifest names no task; pass --tasks")
        return tuple(selected)
    own = expand(tenant.task)
    return own if selected is None else tuple(t for t in own if t in selected)


class _Run:
    """The shared state of one evaluation: tokenizer, examples per task, and the results being filled."""

    def __init__(self, cfg: EvalConfig, tokenizer, progress: Callable[[str], None]):
        self.cfg, self.tok, self.progress = cfg, tokenizer, progress
        self.eot = end_of_turn_id(tokenizer)
        self._examples: dict[str, list[Example]] = {}
        self._prompts: dict[str, list[list[int]]] = {}
        self._max_tokens: dict[str, int] = {}
        self.engines: list[dict[str, Any]] = []

    def examples(self, task: str) -> list[Example]:
        if task not in self._examples:
            t = get_task(task)
            n = min(self.cfg.examples, t.sizes[self.cfg.split])
            self._examples[task] = t.examples(self.cfg.split, n=n, seed=self.cfg.seed)
        return self._examples[task]

    def prompts(self, task: str) -> tuple[list[list[int]], int]:
        if task not in self._prompts:
            exs = self.examples(task)
            self._prompts[task] = [prompt_ids(self.tok, ex.prompt) for ex in exs]
            self._max_tokens[task] = answer_budget(self.tok, exs)
        return self._prompts[task], self._max_tokens[task]

    def run_engine(self, model: Transformer, adapters: dict[str, Adapter], rows: list[tuple[TenantResult, str | None]]):
        """Exact-match tasks of every row through one engine; `rows` pairs a result with its adapter name."""
        jobs = [(r, name, t) for r, name in rows for t in r.tasks if get_task(t).kind == "exact_match"]
        if not jobs:
            return
        longest = max(len(p) + self.prompts(t)[1] for _, _, t in jobs for p in self.prompts(t)[0])
        engine = Engine(model, self.tok, adapters_engine_config(adapters, self.cfg.dtype, self.cfg.max_batch,
                                                                longest))
        for name, adapter in adapters.items():
            engine.add_adapter(name, adapter)
        prompts, slots = [], []
        for i in range(max(len(self.examples(t)) for _, _, t in jobs)):  # round-robin: batches mix tenants
            for r, name, t in jobs:
                task_prompts, max_tokens = self.prompts(t)
                if i < len(task_prompts):
                    prompts.append((task_prompts[i], max_tokens, name))
                    slots.append((r, t))
        self.progress(f"generating {len(prompts)} answers for {len({id(r) for r, _, _ in jobs})} tenant(s)")
        t0 = time.perf_counter()
        try:
            outputs = engine_generate(engine, prompts, self.eot)
        finally:
            engine.adapters.shutdown()
        seconds = time.perf_counter() - t0
        answers: dict[tuple[int, str], list[str]] = {}
        for (r, t), out in zip(slots, outputs, strict=True):
            answers.setdefault((id(r), t), []).append(self.tok.decode(out, skip_special_tokens=True))
        for r, _, t in jobs:
            preds = answers[(id(r), t)]
            r.scores[t] = TaskScore(t, "accuracy", score(get_task(t), preds, self.examples(t)), len(preds), preds)
        generated = sum(len(o) for o in outputs)
        self.engines.append({"tenants": [r.tenant.name for r, _ in rows], "requests": len(prompts),
                             "generated_tokens": generated, "seconds": round(seconds, 3),
                             "tokens_per_s": round(generated / max(seconds, 1e-9), 1)})

    def run_perplexity(self, model: Transformer, result: TenantResult, hook: ProjectionHook | None) -> None:
        for t in result.tasks:
            if get_task(t).kind != "perplexity":
                continue
            self.progress(f"perplexity of {result.tenant.name} on {t}")
            exs = self.examples(t)
            nll, n = answer_nll(transformer_logits(model, hook), self.tok, exs, self.cfg.ppl_batch_size,
                                self.cfg.max_seq_len)
            result.scores[t] = TaskScore(t, "perplexity", math.exp(nll / n), len(exs))


def evaluate(cfg: EvalConfig, progress: Callable[[str], None] = lambda _: None) -> EvalReport:
    """Evaluate the base and every tenant of `cfg.adapters` (see the module docstring)."""
    t0 = time.perf_counter()
    base_path = resolve_base(cfg.base, progress)
    tokenizer = load_tokenizer(base_path)
    tenants = discover(cfg.adapters) if cfg.adapters is not None else []
    selected = None if cfg.tasks is None else tuple(dict.fromkeys(m for t in cfg.tasks for m in expand(t)))
    results, skipped = [], []
    for tenant in tenants:
        tasks = tenant_tasks(tenant, selected)
        if tasks:
            results.append(TenantResult(tenant, tasks, trainable_params=tenant.manifest.get("trainable_params")))
        else:
            skipped.append(tenant.name)
    if cfg.include_base:
        if results:
            base_tasks = tuple(dict.fromkeys(t for r in results for t in r.tasks))
        else:
            base_tasks = selected or tuple(n for n, t in TASKS.items() if not isinstance(t, MixtureTask))
        base = Tenant(BASE, None, BASE, BASE, None)
        results.insert(0, TenantResult(base, base_tasks, trainable_params=0))
    if not results:
        raise DeltafleetError(f"no tenant of {cfg.adapters} has a task among {list(cfg.tasks or [])}")
    run = _Run(cfg, tokenizer, progress)
    dtype = DTYPES[cfg.dtype]

    # The shared base: the base row and every adapter tenant, in one engine.
    shared = [r for r in results if r.tenant.served in (ADAPTER, BASE)]
    if shared:
        progress(f"loading {base_path.name}")
        model, _ = load_model(base_path, dtype=dtype)
        fingerprint = base_fingerprint(base_path)
        adapters: dict[str, Adapter] = {}
        for r in shared:
            if r.tenant.served == ADAPTER:
                a = load_adapter(r.tenant.path, model.config, expected_fingerprint=fingerprint)
                adapters[r.tenant.name] = a
                if r.trainable_params is None:
                    r.trainable_params = a.num_params
        run.run_engine(model, adapters, [(r, r.tenant.name if r.tenant.served == ADAPTER else None) for r in shared])
        for r in shared:
            a = adapters.get(r.tenant.name)
            run.run_perplexity(model, r, None if a is None else a.to(dtype).hook(model.config))
        del model, adapters

    # Tenants that run as models of their own (folded IA3, full fine-tunes): one engine each.
    for r in results:
        if r.tenant.served in (ADAPTER, BASE):
            continue
        progress(f"loading {r.tenant.name} ({r.tenant.served})")
        model = tenant_model(r.tenant, base_path, dtype)
        run.run_engine(model, {}, [(r, None)])
        run.run_perplexity(model, r, None)
        del model
    return EvalReport(cfg, results, skipped, run.engines, time.perf_counter() - t0)
