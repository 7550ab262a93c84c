"""The results table: one row per task, the base and every fine-tune method side by side, with their costs.

Input is an evaluation report (`EvalReport.to_dict()`); a tenant lands in column `method` of the row of each task
it was evaluated on (the broad fine-tune, trained on a mixture, in column `broad`).
"""

from __future__ import annotations

from typing import Any

from deltafleet.tasks import get_task
from deltafleet.tasks.mixture import MixtureTask

METHOD_ORDER = ("base", "lora", "road", "ia3", "full", "broad")


def _column(tenant: dict[str, Any]) -> str:

    task = tenant.get("task")
    if tenant["method"] == "full" and task is not None and isinstance(get_task(task), MixtureTask):
        return "broad"
    return tenant["method"]


def task_table(report: dict[str, Any]) -> list[dict[str, Any]]:
    """[{task, metric, cells: {column: {tenant, value, trainable_params, bytes, train_seconds, steps}}}]"""
    rows: dict[str, dict[str, Any]] = {}
    for name, t in report["tenants"].items():
        col = _column(t)
        for task, s in t["scores"].items():
            row = rows.setdefault(task, {"task": task, "metric": s["metric"], "n": s["n"], "cells": {}})
            key = col if col not in row["cells"] else f"{col}:{name}"
            row["cells"][key] = {"tenant": name, "value": s["value"], "trainable_params": t["trainable_params"],
                                 "bytes": t["bytes"], "train_seconds": t["train_seconds"], "steps": t["steps"]}
    return list(rows.values())


def _order(key: str) -> tuple[int, str]:
    head = key.split(":", 1)[0]
    return (METHOD_ORDER.index(head) if head in METHOD_ORDER else len(METHOD_ORDER), key)


def _fmt(value: float, metric: str) -> str:
    return f"{value:.2f}" if metric == "accuracy" else f"{value:.1f}"


def markdown(rows: list[dict[str, Any]]) -> str:
    """An accuracy table (task x method) and a cost table (task, method: params, bytes, time)."""
    cols = sorted({k for r in rows for k in r["cells"]}, key=_order)
    out = ["| task (metric, n) | " + " | ".join(cols) + " |", "|---|" + "---|" * len(cols)]
    for r in rows:
        cells = [_fmt(r["cells"][c]["value"], r["metric"]) if c in r["cells"] else "" for c in cols]
        out.append(f"| {r['task']} ({r['metric']}, {r['n']}) | " + " | ".join(cells) + " |")
    out += ["", "| task | method | tenant | score | trainable params | weight bytes | steps | train s |",
            "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for c in sorted(r["cells"], key=_order):
            if c == "base":
                continue
            x = r["cells"][c]
            out.append(f"| {r['task']} | {c.split(':', 1)[0]} | {x['tenant']} | {_fmt(x['value'], r['metric'])} | "
                       f"{_num(x['trainable_params'])} | {_num(x['bytes'])} | {_num(x['steps'])} | "
                       f"{_secs(x['train_seconds'])} |")
    return "\n".join(out) + "\n"


def _num(v: int | None) -> str:
    return "" if v is None else f"{v:,}"


def _secs(v: float | None) -> str:
    return "" if v is None else f"{v:.0f}"
