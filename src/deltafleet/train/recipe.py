"""The fine-tuning recipe: one linear function, torchtune style, on transformers + peft.

    load base (fp32 weights; a quantized base gives its dequantized weights) and tokenizer
    -> make it trainable (method) -> AdamW
    -> [resume: restore trainable weights, optimizer state and progress from OUT/checkpoints]
    -> for each step: batch_size * grad_accum train examples in chat format; loss = mean NLL over the
       answer tokens of the step (prompt and padding masked); forward in `precision` (bf16 autocast by
       default); clip; lr = linear warmup then linear decay; AdamW step; checkpoint every save_every steps
    -> checkpoint -> validation metrics on a small subset -> export + manifest `deltafleet.json`.

Ctrl-C is deferred to the next safe point (after a micro-batch, never inside an optimizer step): the run then
saves a checkpoint, exports what it has (manifest `completed: false`, no metrics) and returns; a second
Ctrl-C interrupts at once. `--resume` continues from the latest checkpoint with the same data order, so the
result equals an uninterrupted run's up to floating-point noise.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from deltafleet.errors import DeltafleetError
from deltafleet.models.loading import load_tokenizer, resolve_base
from deltafleet.quant.base import hf_causal_lm, is_quantized_base
from deltafleet.store.fingerprint import base_fingerprint
from deltafleet.store.manifest import read_manifest, write_manifest
from deltafleet.tasks import encode_example, end_of_turn_id, get_task
from deltafleet.train import checkpoint as ckpt
from deltafleet.train.config import TrainConfig
from deltafleet.train.data import PRECISION_CONTEXTS, answer_nll, collate, example_indices
from deltafleet.train.methods import METHODS


@dataclass(frozen=True)
class TrainResult:
    out: Path
    steps: int  # optimizer steps completed in all (resumed runs included)
    completed: bool  # False when interrupted before cfg.steps
    losses: list[float]  # per step, from step 1
    final_metrics: dict[str, float]
    train_seconds: float
    tokens_per_second: float
    trainable_params: int


def lr_at(step: int, total: int, warmup: int, peak: float) -> float:
    """Learning rate of optimizer step `step` (0-based): linear warmup to `peak` over `warmup` steps, then
    linear decay reaching 0 after the last step."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * max(0.0, (total - step) / max(1, total - warmup))


class DeferredInterrupt:
    """Within the block, the first SIGINT only sets `requested`; `check()` raises KeyboardInterrupt at a safe
    point. A second SIGINT raises at once. Outside the main thread signals cannot be caught: a no-op there."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)

    def check(self) -> None:
        if self.requested:
            raise KeyboardInterrupt

    def __enter__(self) -> DeferredInterrupt:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def _progress_bar(console: Console, enabled: bool) -> Progress:
    return Progress(TextColumn("[bold]train"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tok_s]:.0f} tok/s"),
                    TimeElapsedColumn(), TimeRemainingColumn(), console=console, disable=not enabled)


Validator = Callable[..., dict[str, float]]
"""validate(task, model, causal_lm, tokenizer, val_examples, batch_size, max_len, precision) -> metrics; the
evaluation core's `deltafleet.eval.core.validation_metrics` is the one `deltafleet train` passes."""


def train(cfg: TrainConfig, *, console: Console | None = None, show_progress: bool = True,
          on_step: Callable[[int, float], None] = lambda step, loss: None,
          validate: Validator | None = None) -> TrainResult:
    """Run (or resume) one training run; `on_step(step, loss)` is called after every optimizer step. At the end,
    `validate` (if given) measures the run on the task's validation examples; its metrics go in the manifest."""
    from transformers import AutoModelForCausalLM

    console = console or Console()
    method = METHODS[cfg.method]
    task = get_task(cfg.task)

    # Base model, tokenizer, data.
    base_path = resolve_base(cfg.base, progress=lambda m: console.print(f"[dim]{m}[/dim]"))
    tokenizer = load_tokenizer(base_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
    train_examples = task.examples("train", seed=cfg.seed)
    val_examples = task.examples("val", n=min(cfg.eval_examples, task.sizes.val), seed=cfg.seed)
    run = {"base_fingerprint": base_fingerprint(base_path), "task": cfg.task, "method": cfg.method,
           "hyperparameters": cfg.hyperparameters()}
    if not cfg.resume and ckpt.latest_checkpoint(cfg.out) is not None:
        raise DeltafleetError(f"{cfg.out}: holds checkpoints of an earlier run; pass --resume to continue it "
                              f"or choose another --out")

    # Model and optimizer.
    torch.manual_seed(cfg.seed)  # adapter initialisation (LoRA's A) is seeded
    if is_quantized_base(base_path):  # frozen dequantized (fake-quantized) projections: QLoRA's numerics
        causal_lm = hf_causal_lm(base_path, dtype=torch.float32)
    else:
        causal_lm = AutoModelForCausalLM.from_pretrained(str(base_path), dtype=torch.float32)
    model = method.prepare(causal_lm, cfg)  # peft injects its layers into causal_lm in place and wraps it
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    progress = ckpt.Progress()
    if cfg.resume and (last := ckpt.latest_checkpoint(cfg.out)) is not None:
        progress = ckpt.load_checkpoint(last, params, optimizer, run)
        console.print(f"[dim]resumed from {last} (step {progress.step}/{cfg.steps})[/dim]")
    elif cfg.resume:
        console.print(f"[dim]no checkpoint in {cfg.out}: starting at step 0[/dim]")

    # The loop.
    per_step = cfg.batch_size * cfg.grad_accum
    session_tokens, session_seconds = 0, 0.0
    completed = True
    with DeferredInterrupt() as interrupt, _progress_bar(console, show_progress) as bar:
        bar_task = bar.add_task("train", total=cfg.steps, completed=progress.step,
                                loss=progress.losses[-1] if progress.losses else float("nan"), tok_s=0.0)
        try:
            while progress.step < cfg.steps:
                t0 = time.perf_counter()
                model.train()
                indices = example_indices(len(train_examples), cfg.seed, progress.step * per_step, per_step)
                encoded = [encode_example(tokenizer, train_examples[i]) for i in indices]
                micro = [collate(encoded[j : j + cfg.batch_size], pad_id, cfg.max_seq_len)
                         for j in range(0, per_step, cfg.batch_size)]
                n_answer = sum(b.n_answer_tokens for b in micro)
                optimizer.zero_grad(set_to_none=True)
                step_loss = 0.0
                for batch in micro:
                    with PRECISION_CONTEXTS[cfg.precision]():
                        nll = answer_nll(causal_lm, batch)
                    (nll / n_answer).backward()
                    step_loss += float(nll.detach()) / n_answer
                    interrupt.check()
                if cfg.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(params.values(), cfg.max_grad_norm)
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(progress.step, cfg.steps, cfg.warmup_steps, cfg.lr)
                optimizer.step()

                dt = time.perf_counter() - t0
                tokens = sum(b.n_tokens for b in micro)
                progress.step += 1
                progress.losses.append(step_loss)
                progress.train_seconds += dt
                progress.tokens += tokens
                session_tokens += tokens
                session_seconds += dt
                bar.update(bar_task, completed=progress.step, loss=step_loss, tok_s=session_tokens / session_seconds)
                on_step(progress.step, step_loss)
                if cfg.save_every and progress.step % cfg.save_every == 0 and progress.step < cfg.steps:
                    ckpt.save_checkpoint(cfg.out, params, optimizer, progress, run)
                interrupt.check()
        except KeyboardInterrupt:
            completed = False
            console.print(f"[yellow]interrupted at step {progress.step}/{cfg.steps}: saving a checkpoint; "
                          f"continue with --resume[/yellow]")
    ckpt.save_checkpoint(cfg.out, params, optimizer, progress, run)

    # Validation and export.
    metrics: dict[str, float] = {}
    if completed and val_examples and validate is not None:
        with console.status("validating"):
            metrics = validate(task, model, causal_lm, tokenizer, val_examples, cfg.batch_size, cfg.max_seq_len,
                               cfg.precision)
    fmt = method.export(model, tokenizer, cfg.out)
    trainable = sum(p.numel() for p in params.values())
    manifest: dict[str, Any] = {
        "kind": method.kind,
        "base_fingerprint": run["base_fingerprint"], "base_model": cfg.base, "task": cfg.task,
        "method": cfg.method, "hyperparameters": run["hyperparameters"], "steps": progress.step,
        "completed": completed, "final_metrics": metrics, "trainable_params": trainable,
        "train_seconds": round(progress.train_seconds, 3),
        "train_loss": {"first": progress.losses[0] if progress.losses else None,
                       "last": progress.losses[-1] if progress.losses else None},
    }
    exported = read_manifest(cfg.out) or {}  # an export may write its own fields (e.g. a tenant's typed config)
    exported = {k: v for k, v in exported.items() if k not in ("schema_version", "format")}
    write_manifest(cfg.out, fmt, {**exported, **manifest})
    return TrainResult(out=cfg.out, steps=progress.step, completed=completed, losses=list(progress.losses),
                       final_metrics=metrics, train_seconds=progress.train_seconds,
                       tokens_per_second=progress.tokens / max(progress.train_seconds, 1e-9),
                       trainable_params=trainable)
