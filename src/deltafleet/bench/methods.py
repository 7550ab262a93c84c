"""`deltafleet bench methods`: the fine-tuning methods side by side on the zoo's tasks at matched steps.

For each (task, method): one `deltafleet train` run in a fresh child process (so its peak RSS is its own), at the
same steps, batch, precision and seed for every method and the learning rate of `METHOD_LRS` (the zoo's rates
for its short runs; PaFi and MEFT chosen the same way), then greedy exact-match accuracy on `test_examples` of the
task's test split, measured on the trained model itself (transformers' generate, so MEFT's two-stream network is
measured too). Reported per run: test accuracy, trainable parameters, stored bytes (the exported weight files),
peak RSS of the child (`ru_maxrss`: the fp32 model, optimizer state, activations) and training seconds.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deltafleet.bench.peer import cpu_info

# The zoo's rates for 80-step runs (`eval.zoo.ZOO_LRS`); PaFi's, HiWi's and MEFT's chosen here the same way (MEFT:
# 2e-3 / 6e-3 / 1.2e-2 gave 0.40 / 0.54 / 0.62 on sort; see README).
METHOD_LRS = {"lora": 2e-3, "road": 2e-2, "ia3": 1e-2, "pafi": 2e-3, "hiwi": 1e-2, "meft": 1.2e-2, "full": 5e-5}


@dataclass(frozen=True)
class MethodsConfig:
    base: str = "smollm2-135m"
    tasks: tuple[str, ...] = ("json-field", "sort")
    methods: tuple[str, ...] = ("lora", "road", "pafi", "hiwi", "meft", "full")
    steps: int = 80
    batch_size: int = 8
    test_examples: int = 50
    precision: str = "auto"
    seed: int = 0

    def __post_init__(self) -> None:
        unknown = [m for m in self.methods if m not in METHOD_LRS]
        if unknown:
            raise ValueError(f"methods: {unknown[0]!r} is not one of {sorted(METHOD_LRS)}")
        for name in ("steps", "batch_size", "test_examples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")


def run_one(spec: dict[str, Any]) -> dict[str, Any]:
    """One training run and its test accuracy, in this process (the child of `run`)."""
    from rich.console import Console

    from deltafleet.eval.core import validation_metrics
    from deltafleet.tasks import get_task
    from deltafleet.train.config import TrainConfig
    from deltafleet.train.recipe import train

    task = get_task(spec["task"])
    test = task.examples("test", n=min(spec["test_examples"], task.sizes.test), seed=0)

    def on_test(task, model, causal_lm, tokenizer, _val, batch_size, max_len, precision):
        return validation_metrics(task, model, causal_lm, tokenizer, test, batch_size, max_len, precision)

    cfg = TrainConfig(base=spec["base"], task=spec["task"], method=spec["method"], out=Path(spec["out"]),
                      steps=spec["steps"], batch_size=spec["batch_size"], lr=METHOD_LRS[spec["method"]],
                      precision=spec["precision"], seed=spec["seed"], save_every=0, eval_examples=1)
    t0 = time.perf_counter()
    result = train(cfg, console=Console(stderr=True), show_progress=False, validate=on_test)
    stored = sum(p.stat().st_size for p in Path(spec["out"]).glob("*.safetensors"))
    return {"task": spec["task"], "method": spec["method"], "steps": result.steps, "lr": cfg.lr,
            "test_accuracy": round(result.final_metrics.get("val_accuracy", float("nan")), 4),
            "test_loss": round(result.final_metrics.get("val_loss", float("nan")), 4),
            "trainable_params": result.trainable_params, "stored_bytes": stored,
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "train_seconds": round(result.train_seconds, 1), "wall_seconds": round(time.perf_counter() - t0, 1),
            "loss_first": round(result.losses[0], 4), "loss_last": round(result.losses[-1], 4)}


def run(cfg: MethodsConfig, log: Callable[[str], None] = print) -> dict[str, Any]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="deltafleet-methods-") as tmp:
        for task in cfg.tasks:
            for method in cfg.methods:
                spec = {**asdict(cfg), "task": task, "method": method, "out": str(Path(tmp) / f"{task}-{method}")}
                log(f"training {method} on {task} ({cfg.steps} steps)")
                code = "import json, sys; from deltafleet.bench.methods import run_one; " \
                       "print(json.dumps(run_one(json.loads(sys.argv[1]))))"
                proc = subprocess.run([sys.executable, "-c", code, json.dumps(spec)], capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"{method} on {task} failed (exit {proc.returncode}):\n{proc.stderr[-2000:]}")
                row = json.loads(proc.stdout.strip().splitlines()[-1])
                log(f"  test accuracy {row['test_accuracy']:.2f}, {row['trainable_params']:,} trainable, "
                    f"{row['stored_bytes'] / 1e6:.2f} MB stored, peak RSS {row['peak_rss_mb']:.0f} MB, "
                    f"{row['train_seconds']:.0f} s")
                rows.append(row)
    return {"config": {**asdict(cfg), "lrs": {m: METHOD_LRS[m] for m in cfg.methods}}, "cpu": _cpu(), "runs": rows,
            "summary": summarize(rows)}


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per method: mean test accuracy over the tasks, its difference from LoRA's, and peak RSS relative to LoRA's
    (means over tasks)."""
    by: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by.setdefault(r["method"], []).append(r)

    def mean(xs):
        return sum(xs) / len(xs)

    out = {m: {"mean_test_accuracy": round(mean([r["test_accuracy"] for r in rs]), 4),
               "mean_peak_rss_mb": round(mean([r["peak_rss_mb"] for r in rs]), 1),
               "trainable_params": rs[0]["trainable_params"], "stored_bytes": rs[0]["stored_bytes"]}
           for m, rs in by.items()}
    if "lora" in out:
        for s in out.values():
            s["accuracy_minus_lora"] = round(s["mean_test_accuracy"] - out["lora"]["mean_test_accuracy"], 4)
            s["peak_rss_over_lora"] = round(s["mean_peak_rss_mb"] / out["lora"]["mean_peak_rss_mb"], 3)
    return out


def _cpu() -> dict:
    """The CPU model and its SIMD flags (`bench.peer.cpu_info`, as the peer benchmark records them)."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpu_info(cpuinfo.read_text() if cpuinfo.exists() else "")
