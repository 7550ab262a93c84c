"""The `eval` group (`eval_app`: `deltafleet eval ...` and `deltafleet eval ppl ...`) and the `zoo` group
(`zoo_app`: `deltafleet zoo build`). Heavy imports (torch, transformers) happen inside the commands (see
`cli.main`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from deltafleet.cli.support import fail

console = Console()






# ----------------------------------------------------------------------------------------------- eval, zoo
def _fail(e: Exception) -> NoReturn:
    fail(console, e)


def _command_line(ctx: typer.Context) -> str:
    """The command as typed, rebuilt from the parsed options (options left at their default are omitted)."""
    import shlex

    words = ["deltafleet", *ctx.command_path.split()[1:]]
    for param in ctx.command.params:
        value = ctx.params.get(param.name)
        if param.name == "ctx" or value is None or value == param.default or not param.opts:
            continue
        flag = max(param.opts, key=len)
        words += [flag] if param.is_flag else [flag, str(value)]
    return " ".join(shlex.quote(w) for w in words)


eval_app = typer.Typer(help="Evaluate the base and every tenant adapter on its task (see `eval ppl` for text files).",
                       invoke_without_command=True)


@eval_app.callback(invoke_without_command=True)
def eval_command(
    ctx: typer.Context,
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    adapters: Path | None = typer.Option(
        None, help="Directory of tenants, one per subdirectory: peft/deltafleet adapters, IA3, full fine-tunes."),
    tasks: str | None = typer.Option(
        None, help="Comma-separated tasks: keep only these; tenants whose manifest names no task run on all."),
    examples: int = typer.Option(100, min=1, help="Test examples per task (seeded; fewer if the split is smaller)."),
    split: str = typer.Option("test", help="test, val or train."),
    seed: int = typer.Option(0, help="Seed of the examples drawn."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16 (slow on CPUs without native bf16)."),
    max_batch: int = typer.Option(32, min=1, help="Engine: running sequences per batch."),
    no_base: bool = typer.Option(False, "--no-base", help="Skip the base model's row."),
    results: Path | None = typer.Option(None, help="Also write the results table (JSON, with the command) here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON only."),
) -> None:
    """Exact-match accuracy (perplexity for open-text tasks) of the base and every tenant, all tenants mixed in the
    same engine batches."""
    if ctx.invoked_subcommand is not None:
        return
    from deltafleet.errors import DeltafleetError
    from deltafleet.eval.results import markdown, task_table
    from deltafleet.eval.tasks_eval import EvalConfig, evaluate

    try:
        cfg = EvalConfig(base=base, adapters=adapters, examples=examples, split=split, seed=seed, dtype=dtype,
                         max_batch=max_batch, include_base=not no_base,
                         tasks=None if tasks is None else tuple(t.strip() for t in tasks.split(",") if t.strip()))
        if as_json:
            report = evaluate(cfg)
        else:
            with console.status("evaluating") as status:
                report = evaluate(cfg, progress=lambda m: status.update(f"evaluating: {m}"))
    except (DeltafleetError, ValueError) as e:
        _fail(e)
    d = report.to_dict()
    rows = task_table(d)
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps({"command": _command_line(ctx), "table": rows, "eval": d}, indent=2) + "\n")
    if as_json:
        print(json.dumps(d, indent=2))
        return
    console.print(markdown(rows), highlight=False, markup=False, soft_wrap=True)
    for e in d["engines"]:
        console.print(f"engine run: {len(e['tenants'])} tenant(s), {e['requests']} requests, "
                      f"{e['generated_tokens']} tokens in {e['seconds']:.1f} s ({e['tokens_per_s']:.1f} tokens/s)",
                      highlight=False)
    if d["skipped"]:
        console.print(f"skipped (no selected task): {', '.join(d['skipped'])}", highlight=False)
    console.print(f"{d['seconds']:.1f} s in all", highlight=False)


@eval_app.command("ppl")
def eval_ppl_command(
    text: Path = typer.Option(..., exists=True, dir_okay=False, help="UTF-8 text file."),
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    adapter: Path | None = typer.Option(None, help="Adapter directory (LoRA, RoAd, low-rank, IA3)."),
    window: int = typer.Option(256, min=1, help="Tokens per window."),
    stride: int | None = typer.Option(None, min=1, help="Tokens between window starts (default: window)."),
    max_windows: int | None = typer.Option(None, min=1, help="Score only the first N windows."),
    batch_size: int = typer.Option(8, min=1, help="Windows per forward."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    as_json: bool = typer.Option(False, "--json", help="Print the result as JSON only."),
) -> None:
    """Held-out perplexity of a text file under the base, or the base with an adapter."""
    import time

    from deltafleet.adapters import load_adapter
    from deltafleet.dtypes import parse_dtype
    from deltafleet.errors import DeltafleetError
    from deltafleet.eval.perplexity import perplexity
    from deltafleet.eval.tenants import ADAPTER, classify, tenant_model
    from deltafleet.models.loading import load_model, load_tokenizer, resolve_base
    from deltafleet.store.fingerprint import base_fingerprint

    try:
        t0 = time.perf_counter()
        torch_dtype = parse_dtype(dtype)
        base_path = resolve_base(base)
        tokenizer = load_tokenizer(base_path)
        hook = None
        tenant = classify(adapter) if adapter is not None else None
        if tenant is not None and tenant.served != ADAPTER:
            model = tenant_model(tenant, base_path, torch_dtype)
        else:
            model, _ = load_model(base_path, dtype=torch_dtype)
            if tenant is not None:
                a = load_adapter(adapter, model.config, base_fingerprint(base_path))
                hook = a.to(torch_dtype).hook(model.config)
        out = perplexity(model, tokenizer, text.read_text(encoding="utf-8"), hook=hook, window=window, stride=stride,
                         max_windows=max_windows, batch_size=batch_size)
    except (DeltafleetError, ValueError) as e:
        _fail(e)
    out = {"base": base, "adapter": None if adapter is None else str(adapter), "text": str(text), "window": window,
           "stride": stride or window, **out, "seconds": round(time.perf_counter() - t0, 3)}
    if as_json:
        print(json.dumps(out, indent=2))
        return
    console.print(f"perplexity {out['ppl']:.3f} over {out['tokens']:,} tokens ({out['windows']} windows of "
                  f"{window}, stride {out['stride']}; mean NLL {out['nll'] / out['tokens']:.4f} nats) "
                  f"in {out['seconds']:.1f} s", highlight=False)


zoo_app = typer.Typer(help="The zoo of fine-tunes that later stages measure against.", no_args_is_help=True)


@zoo_app.command("build")
def zoo_build_command(
    out: Path | None = typer.Option(None, help="Zoo directory (default: the cache, $DELTAFLEET_CACHE_DIR/zoo/BASE)."),
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    tasks: str | None = typer.Option(None, help="Comma-separated subset of the plan's tasks."),
    steps: int | None = typer.Option(None, min=1, help="Every run at N steps (the broad one at 2N): a quick zoo."),
    no_broad: bool = typer.Option(False, "--no-broad", help="Skip the broad fine-tune on all tasks."),
    batch_size: int = typer.Option(8, min=1, help="Examples per step."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan, its status and estimated time only."),
) -> None:
    """Train the zoo (LoRA, RoAd, IA3 per task, full fine-tunes, one broad full fine-tune): resumable and cached;
    then write each full fine-tune's singular-value energy profile (energy.json, energy.md)."""
    import warnings

    from transformers.utils import logging as hf_logging

    from deltafleet.errors import DeltafleetError
    from deltafleet.eval.zoo import ZooPlan, build, default_out, entry_status, scaled

    try:
        plan = scaled(ZooPlan(base=base, batch_size=batch_size),
                      tasks=None if tasks is None else [t.strip() for t in tasks.split(",") if t.strip()],
                      steps=steps, **({"broad_steps": 0} if no_broad else {}))
        out = out or default_out(base)
        t = Table("entry", "task", "method", "steps", "status")
        for e in plan.entries():
            t.add_row(e.name, e.task, e.method, str(e.steps), entry_status(out, e))
        console.print(t)
        console.print(f"zoo {out}; estimated training time {plan.estimated_seconds() / 3600:.1f} h "
                      f"(2-core CPU, fp32), less the cached entries", highlight=False)
        if dry_run:
            return
        hf_logging.disable_progress_bar()
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing.*", category=FutureWarning)
        report = build(plan, out, console=console, progress=lambda m: console.print(f"[bold]{m}[/bold]"))
    except (DeltafleetError, ValueError) as e:
        _fail(e)
    for name, status in report.statuses.items():
        console.print(f"{name}: {status}", highlight=False)
    if not report.completed:
        console.print("[yellow]interrupted: rerun the same command to continue[/yellow]")
        raise typer.Exit(code=130)
    console.print((out / "energy.md").read_text(), highlight=False, markup=False)
    console.print(f"wrote {out} in {report.seconds:.0f} s; evaluate it with: deltafleet eval --base {base} "
                  f"--adapters {out}", highlight=False)
