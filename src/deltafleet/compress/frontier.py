"""The quality frontier: every method at every ratio, measured against the uncompressed fine-tune.

For each (method, ratio): mean relative reconstruction error of the compressed modules, mean KL(p_ft || p_c)
of next-token distributions on held-out sequences (the test split's prompt + answer of the given tasks, or text
disjoint from the calibration text), compression time, and optionally exact-match accuracy on one or more tasks
(greedy; the mean over tasks) with the share of the fine-tune's gain over the base kept:
gain kept = (acc_c - acc_base) / (acc_ft - acc_base). The compressed model is the base with the compressed
artifact merged: every projection and table reconstructed, the exact gains, and any other exact extras (biases).
`bytes` counts all of it but the extras (none for a Llama). Two reference rows: `finetuned` (KL 0) and
`no-delta` (the base with those extras only: what dropping the whole delta costs). A (method, ratio) a method
cannot reach (bitdelta below 1/16) is recorded with its reason and skipped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import Tensor

from deltafleet.adapters import merge_adapter
from deltafleet.compress.delta import DeltaSet, apply_extras, projection_name
from deltafleet.compress.methods import CompressSettings
from deltafleet.compress.pipeline import compress_deltas
from deltafleet.errors import DeltafleetError
from deltafleet.models.llama import Transformer
from deltafleet.tasks import encode_example, get_task

REFERENCES = ("finetuned", "no-delta")  # the uncompressed fine-tune, and the base with only its exact extras


@dataclass
class Point:
    method: str
    ratio: float
    bytes: int | None = None
    rel_error: float | None = None
    kl: float | None = None
    seconds: float | None = None
    accuracy: float | None = None
    gain_kept: float | None = None
    skipped: str | None = None


EvalIds = Tensor | Sequence[Tensor]
"""Held-out token ids: one (N, T) batch, or several batches of different lengths (task sequences)."""


def _batches(ids: EvalIds) -> list[Tensor]:
    return [ids] if isinstance(ids, Tensor) else list(ids)


@torch.no_grad()
def log_probs(model: Transformer, ids: EvalIds) -> list[Tensor]:
    """Next-token log-probabilities per batch: [(N_i, T_i, V)]."""
    return [torch.log_softmax(model(b).float(), -1) for b in _batches(ids)]


@torch.no_grad()
def mean_kl(model: Transformer, ids: EvalIds, ref_logprobs: Tensor | Sequence[Tensor]) -> float:
    """Mean over all tokens of KL(ref || model); batch i of ids (N_i, T_i), ref_logprobs[i] (N_i, T_i, V)."""
    refs = [ref_logprobs] if isinstance(ref_logprobs, Tensor) else list(ref_logprobs)
    total, count = 0.0, 0
    for b, ref in zip(_batches(ids), refs, strict=True):
        logp = torch.log_softmax(model(b).float(), -1)
        kl = (ref.exp() * (ref - logp)).sum(-1)
        total, count = total + float(kl.sum()), count + kl.numel()
    return total / count


def task_sequences(tokenizer, tasks: Sequence[str], n: int, split: str = "test") -> list[Tensor]:
    """The first `n` examples of `split` of each task as chat-formatted prompt + answer token ids, grouped into
    batches of equal length (no padding): the held-out task prompts the KL is measured on."""

    by_len: dict[int, list[list[int]]] = {}
    for name in tasks:
        for ex in get_task(name).examples(split, n=n):
            e = encode_example(tokenizer, ex)
            seq = [*e.prompt_ids, *e.answer_ids]
            by_len.setdefault(len(seq), []).append(seq)
    if not by_len:
        raise DeltafleetError(f"tasks={list(tasks)!r}: no {split} examples")
    return [torch.tensor(v) for _, v in sorted(by_len.items())]


def _weights(model: Transformer, ds: DeltaSet) -> dict[str, Tensor]:
    return {projection_name(*k): model.module(*k).weight.data.clone() for k in (*ds.deltas, *ds.gains)}


def _restore(model: Transformer, ds: DeltaSet, saved: dict[str, Tensor]) -> None:
    for k in (*ds.deltas, *ds.gains):
        model.module(*k).weight.data = saved[projection_name(*k)].clone()


def run_frontier(ds: DeltaSet, model: Transformer, methods: Sequence[str], ratios: Sequence[float],
                 calib_ids: Tensor | None, eval_ids: EvalIds, settings: dict | None = None,
                 accuracy: Callable[[Transformer], float] | None = None,
                 log: Callable[[str], None] = lambda _: None,
                 on_point: Callable[[list[Point]], None] = lambda _: None) -> list[Point]:
    """`model`: the base (fp32), modified in place during the run and restored after. `on_point(points so far)`
    runs after each measured point (the CLI saves them, so a long run interrupted keeps what it measured)."""
    saved = _weights(model, ds)
    old_extras = apply_extras(model, ds.extras)
    try:
        for k, d in (*ds.deltas.items(), *ds.gains.items()):  # the fine-tune itself: the reference
            model.module(*k).weight.data += d
        ref = log_probs(model, eval_ids)
        acc_ft = accuracy(model) if accuracy else None
        _restore(model, ds, saved)
        acc_base = accuracy(model) if accuracy else None  # the base, with the fine-tune's extras
        points = [Point("finetuned", 1.0, kl=0.0, rel_error=0.0, accuracy=acc_ft, gain_kept=1.0 if accuracy else None),
                  Point("no-delta", 0.0, bytes=0, rel_error=1.0, kl=mean_kl(model, eval_ids, ref), accuracy=acc_base,
                        gain_kept=0.0 if accuracy else None)]
        log(f"reference: KL(finetuned || base, no delta) = {points[1].kl:.3e}")
        for method in methods:
            for ratio in ratios:
                p = Point(method, ratio)
                try:
                    s = CompressSettings(method, ratio=ratio, **(settings or {}))
                    apply_extras(model, old_extras)  # calibrate on the plain base
                    c = compress_deltas(ds, s, model, calib_ids)
                    apply_extras(model, ds.extras)
                except DeltafleetError as e:
                    apply_extras(model, ds.extras)
                    p.skipped = str(e)
                    points.append(p)
                    log(f"{method} @ {ratio:.5g}: skipped ({e})")
                    on_point(points)
                    continue
                merge_adapter(model, c.adapter)
                p.bytes, p.rel_error, p.seconds = c.bytes, c.mean_rel_error, c.seconds
                p.kl = mean_kl(model, eval_ids, ref)
                if accuracy:
                    p.accuracy = accuracy(model)
                    gain = acc_ft - acc_base
                    p.gain_kept = (p.accuracy - acc_base) / gain if abs(gain) > 1e-9 else None
                _restore(model, ds, saved)
                points.append(p)
                on_point(points)
                log(f"{method} @ {ratio:.5g}: rel_error {p.rel_error:.4f}, KL {p.kl:.3e}, {p.seconds:.1f} s"
                    + (f", accuracy {p.accuracy:.3f}" if p.accuracy is not None else ""))
        return points
    finally:
        _restore(model, ds, saved)
        apply_extras(model, old_extras)


def write_frontier(points: list[Point], out: str | Path, header: str) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps([asdict(p) for p in points], indent=2))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    measured = [p for p in points if p.kl is not None and p.method not in REFERENCES]
    refs = {p.method: p for p in points if p.method in REFERENCES}
    cols = [("kl", "mean KL(ft || compressed)"), ("rel_error", "mean relative error")]
    if any(p.gain_kept is not None for p in measured):
        cols.append(("gain_kept", "share of the fine-tune's accuracy gain kept"))
    fig, axes = plt.subplots(1, len(cols), figsize=(4.5 * len(cols), 3.5))
    for ax, (field, label) in zip(axes, cols, strict=True):
        for method in dict.fromkeys(p.method for p in measured):
            pts = sorted((p.ratio, getattr(p, field)) for p in measured if p.method == method)
            ax.plot([1 / r for r, _ in pts], [v for _, v in pts], marker="o", label=method)
        ref = refs.get("no-delta")
        if ref is not None and getattr(ref, field) is not None and field != "rel_error":
            ax.axhline(getattr(ref, field), color="k", ls=":", lw=1, label="no delta")
        if field == "gain_kept":
            ax.axhline(GAIN_TARGET, color="r", ls="--", lw=1, label=f"{GAIN_TARGET:.0%} of the gain")
        ax.set_xscale("log", base=2)
        if field != "gain_kept":
            ax.set_yscale("log")
        ax.set_xlabel("compression (1 / ratio)")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=100)
    plt.close(fig)
    lines = [header, "", "![frontier](frontier.png)", "",
             "| method | ratio | bytes | mean rel. error | mean KL | accuracy | gain kept | seconds |",
             "|---|---|---|---|---|---|---|---|"]

    def f(v, fmt):
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt)

    for p in points:
        if p.skipped:
            lines.append(f"| {p.method} | 1/{1 / p.ratio:.0f} | skipped: {p.skipped} | | | | | |")
            continue
        ratio = "" if p.method in REFERENCES else f"1/{1 / p.ratio:.0f}"
        lines.append(f"| {p.method} | {ratio} | {f(p.bytes, ',')} | {f(p.rel_error, '.4f')} | {f(p.kl, '.3e')} | "
                     f"{f(p.accuracy, '.3f')} | {f(p.gain_kept, '.2f')} | {f(p.seconds, '.1f')} |")
    lines += ["", *summary_lines(points)]
    (out / "frontier.md").write_text("\n".join(lines) + "\n")
    return out / "frontier.md"


GAIN_TARGET = 0.95  # the issue's quality bar: a compressed delta keeps 95% of the fine-tune's accuracy gain


def summary(points: Sequence[Point]) -> dict:
    """The issue's frontier targets from measured points: per method the smallest ratio that still keeps
    GAIN_TARGET of the gain (None: none does), and per ratio the method with the lowest KL."""
    measured = [p for p in points if p.kl is not None and p.method not in REFERENCES]
    smallest: dict[str, float | None] = {}
    for method in dict.fromkeys(p.method for p in measured):
        keep = [p.ratio for p in measured if p.method == method and p.gain_kept is not None
                and p.gain_kept >= GAIN_TARGET]
        smallest[method] = min(keep) if keep else None
    lowest_kl = {}
    for ratio in sorted({p.ratio for p in measured}, reverse=True):
        at = [p for p in measured if p.ratio == ratio]
        lowest_kl[ratio] = min(at, key=lambda p: p.kl).method
    return {"smallest_ratio_keeping_gain": smallest, "lowest_kl_method": lowest_kl}


def summary_lines(points: Sequence[Point]) -> list[str]:
    s = summary(points)
    out = [f"Smallest ratio keeping {GAIN_TARGET:.0%} of the gain: " + ", ".join(
        f"{m} {'none' if r is None else f'1/{1 / r:.0f}'}" for m, r in s["smallest_ratio_keeping_gain"].items())]
    out.append("Lowest KL per ratio: " + ", ".join(f"1/{1 / r:.0f} {m}" for r, m in s["lowest_kl_method"].items()))
    return out
