"""CLI for `deltafleet bench engine` (registered on the `bench` group in deltafleet.cli)."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

console = Console()


def bench_engine_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16 (bf16 is slow on CPUs without native bf16)."),
    batch: int = typer.Option(32, min=1, help="Running batch size."),
    prompt_len: int = typer.Option(64, min=1, help="Prompt tokens per request."),
    max_tokens: int = typer.Option(32, min=2, help="Generated tokens per request."),
    rounds: int = typer.Option(2, min=1, help="Round-robin repetitions; figures are medians."),
    scenario: list[str] = typer.Option(None, help="Run only these scenarios (repeatable)."),
    quick: bool = typer.Option(False, "--quick", help="Short prompts and outputs, one round (< 2 min on 2 cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON only."),
) -> None:
    """Decode throughput of mixed multi-adapter batches vs the base model and peft; prints ratios and limits."""
    from deltafleet.eval.bench_engine import SCENARIOS, BenchConfig, quick_config, run

    unknown = sorted(set(scenario or []) - set(SCENARIOS))
    if unknown:
        raise typer.BadParameter(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}", param_hint="--scenario")
    common = {"base": base, "dtype": dtype, "batch": batch, "scenarios": scenario or list(SCENARIOS)}
    if quick:
        cfg = quick_config(**common)
    else:
        cfg = BenchConfig(**common, prompt_len=prompt_len, max_tokens=max_tokens, rounds=rounds)
    if as_json:
        print(json.dumps(run(cfg), indent=2))
        return
    with console.status("benchmarking") as status:
        rep = run(cfg, progress=lambda msg: status.update(f"benchmarking {msg}"))
    print_report(rep)


def print_report(rep: dict) -> None:
    c, hw = rep["config"], rep["hardware"]
    console.print(f"[bold]{c['base']}[/bold] {c['dtype']}, batch {c['batch']}, prompt {c['prompt_len']}, "
                  f"{c['max_tokens']} new tokens, {c['rounds']} round(s); {hw['threads']} threads, "
                  f"read bandwidth {hw['read_bandwidth_gb_s']:.1f} GB/s, grouped_mm {hw['grouped_mm']}")
    t = Table("scenario", "decode tok/s", "step ms", "TTFT ms", "adapters/step", "adapter MB/step", "RSS MB")
    for name, r in rep["scenarios"].items():
        t.add_row(name, f"{r['decode_tok_s']:.1f}", f"{r['step_ms']:.1f}", f"{r['ttft_ms']:.0f}",
                  f"{r['distinct_per_step']:.1f}", f"{r['adapter_bytes_per_step'] / 2**20:.0f}", f"{r['rss_mb']:.0f}")
    console.print(t)
    t = Table("ratio", "measured", "hardware limit", "fraction of limit", "target")
    for key, v in rep["ratios"].items():
        lim = rep["limits"].get(key)
        frac = rep["achieved_fraction_of_limit"].get(key)
        target = rep["targets"].get(key)
        t.add_row(key, f"{v:.3f}", "-" if lim is None else f"{lim:.3f}", "-" if frac is None else f"{frac:.2f}",
                  "-" if target is None else f">= {target}")
    console.print(t)
    console.print(f"peak RSS {rep['peak_rss_mb']:.0f} MB; KV cache {rep['kv_cache_mb']:.0f} MB; "
                  f"adapter slot pools {rep['adapter_pools_mb']:.0f} MB")
