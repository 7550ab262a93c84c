"""`deltafleet bench ...`: the benchmark commands (engine, serve, compress, lowbit). Each prints figures and ratios
from one run; the measuring code lives in `deltafleet.bench`. torch and the stages are imported inside the
commands: importing them costs about 1.9 s (torch 1.6 s), which `deltafleet --help` should not pay.
"""

from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import NoReturn

import typer
from rich.console import Console
from rich.table import Table

from deltafleet.cli.compress import ALLOC_PER_HELP, CALIB_HELP, PLAN_HELP, U_GROUPS_HELP, calibration
from deltafleet.cli.serve import resolve_dtype
from deltafleet.cli.support import fail
from deltafleet.errors import DeltafleetError

console = Console()
log_console = Console(stderr=True)  # progress lines: never mixed into --json output
bench_app = typer.Typer(help="Benchmarks that print figures and ratios from one run.", no_args_is_help=True)


def _fail(e: Exception) -> NoReturn:
    fail(console, e)


def bench_engine_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16 (bf16 is slow on CPUs without native bf16)."),
    adapter_dtype: str = typer.Option("bfloat16", help="Resident adapter pools: bfloat16 or float32 (compute stays "
                                      "in --dtype; bf16 halves the adapter bytes a step reads)."),
    batch: int = typer.Option(32, min=1, help="Running batch size."),
    prompt_len: int = typer.Option(64, min=1, help="Prompt tokens per request."),
    max_tokens: int = typer.Option(32, min=2, help="Generated tokens per request."),
    rounds: int = typer.Option(2, min=1, help="Round-robin repetitions; figures are medians."),
    scenario: list[str] = typer.Option(None, help="Run only these scenarios (repeatable)."),
    quick: bool = typer.Option(False, "--quick", help="Short prompts and outputs, one round (< 2 min on 2 cores)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON only."),
) -> None:
    """Decode throughput of mixed multi-adapter batches vs the base model and peft; prints ratios and limits."""
    from deltafleet.bench.engine import SCENARIOS, BenchConfig, quick_config, run

    unknown = sorted(set(scenario or []) - set(SCENARIOS))
    if unknown:
        raise typer.BadParameter(f"unknown scenario(s) {unknown}; known: {sorted(SCENARIOS)}", param_hint="--scenario")
    common = {"base": base, "dtype": dtype, "adapter_dtype": adapter_dtype, "batch": batch,
               "scenarios": scenario or list(SCENARIOS)}
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


def bench_serve_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    dtype: str = typer.Option("auto", help="auto, bfloat16 or float32."),
    adapters: int = typer.Option(8, min=1, help="Random adapters to serve (LoRA r8, LoRA r16, RoAd in turn)."),
    clients: int = typer.Option(8, min=1, help="Concurrent clients below the queue bound."),
    requests: int = typer.Option(64, min=1, help="Requests per closed-loop pattern (uniform, then Zipf) and per "
                                                 "open-loop rate (unless --duration)."),
    max_tokens: int = typer.Option(32, min=1, help="Output tokens per request (exactly: ignore_eos)."),
    max_batch: int = typer.Option(8, min=1, help="Server --max-batch."),
    max_queue: int = typer.Option(16, min=1, help="Server --max-queue."),
    rate: list[str] = typer.Option(None, help="Open loop: Poisson arrivals at this many requests/s, one phase "
                                              "per rate (repeatable or comma list; default 0.5,1,2)."),
    duration: float | None = typer.Option(None, min=0.001, help="Open loop: seconds of arrivals per rate "
                                                                "(default: --requests arrivals per rate)."),
    tenants: int | None = typer.Option(None, min=1, help="Open loop: adapters the model is drawn from with Zipf "
                                                         "popularity, plus the base (default: --adapters)."),
    slo_ttft_ms: float = typer.Option(2000.0, min=0.001, help="SLO for goodput: time to first token, ms."),
    slo_itl_ms: float = typer.Option(200.0, min=0.001, help="SLO for goodput: a request's mean inter-token "
                                                            "latency (time per chunk after the first), ms."),
    burst: int = typer.Option(96, min=1, help="Simultaneous requests per overload burst."),
    bursts: int = typer.Option(3, min=0, help="Overload bursts."),
    seed: int = typer.Option(0, help="Seed for adapters and the request mix."),
    quick: bool = typer.Option(False, "--quick", help="A run of under 2 minutes on 2 cores: 16 requests of 16 "
                                                      "tokens per pattern, 6 open-loop requests at 0.5/s, "
                                                      "2 bursts of 48."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Start the server on loopback, load it with mixed-adapter clients in closed and open loop (Poisson
    arrivals), then overload it past its queue bound."""
    import json

    from deltafleet.bench.loadgen import Slo
    from deltafleet.bench.serve import OpenLoopConfig, run_bench

    try:
        rates = tuple(float(x) for item in rate or ["0.5,1,2"] for x in item.split(",") if x.strip())
    except ValueError as e:
        raise typer.BadParameter(f"{rate}: not numbers of requests/s ({e})", param_hint="--rate") from None
    open_requests = requests
    if quick:
        requests, max_tokens, burst, bursts = 16, 16, 48, 2
        rates, open_requests, duration = (0.5,), 6, None
    try:
        open_cfg = OpenLoopConfig(rates=rates, requests=open_requests, duration=duration,
                                  tenants=adapters if tenants is None else tenants)
        slo = Slo(ttft_s=slo_ttft_ms / 1000, itl_s=slo_itl_ms / 1000)
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    out = Console()
    if not out.is_terminal:
        out = Console(width=132)

    def log(message: str) -> None:
        console.print(f"[dim]{message}[/dim]", soft_wrap=True)

    try:
        res = run_bench(base, resolve_dtype(dtype), adapters, clients, requests, max_tokens, max_batch, max_queue,
                        burst, bursts, seed, log=log, open_cfg=open_cfg, slo=slo)
    except (DeltafleetError, RuntimeError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(code=2) from None
    if as_json:
        out.print_json(json.dumps(res))
        return

    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"

    def cpu(v):
        return "-" if v is None else f"{v:.2f}"

    table = Table(title=f"bench serve: {res['base']} ({res['dtype']}), {res['adapters']} adapters + base, "
                        f"{res['clients']} clients, {res['max_tokens']} tokens/request, {res['cpu_count']} CPUs",
                  caption="e2e, TTFT, ITL: p50/p99 ms; CPU s: client (this process)/server, during the phase")
    for col in ("phase", "requests", "ok", "errors", "req/s", "out tok/s", "e2e ms", "TTFT ms", "ITL ms",
                "goodput/s", "CPU s"):
        table.add_column(col, justify="left" if col in ("phase", "errors") else "right")
    opened = res["open_loop"]["phases"] if res["open_loop"] else []
    for p in res["phases"] + opened + res["overload"]["bursts"]:
        table.add_row(p["name"], str(p["requests"]), str(p["ok"]),
                      ", ".join(f"{k}: {v}" for k, v in sorted(p["errors"].items())) or "0",
                      f"{p['requests_per_s']:.2f}", f"{p['output_tokens_per_s']:.1f}",
                      f"{ms(p['latency_p50_s'])}/{ms(p['latency_p99_s'])}",
                      f"{ms(p['ttft_p50_s'])}/{ms(p['ttft_p99_s'])}", f"{ms(p['itl_p50_s'])}/{ms(p['itl_p99_s'])}",
                      f"{p['goodput_rps']:.2f}", f"{cpu(p['client_cpu_s'])}/{cpu(p['server_cpu_s'])}")
    out.print(table)
    s = res["slo"]
    out.print(f"goodput: requests/s with TTFT <= {s['ttft_s'] * 1000:.0f} ms and mean ITL <= "
              f"{s['itl_s'] * 1000:.0f} ms; client: {res['client']}")
    if res["open_loop"]:
        ol = res["open_loop"]
        out.print(f"open loop: Poisson arrivals, Zipf (s={ol['zipf_s']:g}) over base + {ol['tenants']} tenants; "
                  + "; ".join(f"{p['name']}: offered {p['offered_rps']:.2f}/s, {p['slo_met']}/{p['requests']} met "
                              f"the SLO, send lag p99 {ms(p['send_lag_p99_s'])} ms" for p in ol["phases"]))
    o = res["overload"]
    out.print(f"overload: bursts of {o['burst']} against max_batch {res['max_batch']} + max_queue "
              f"{res['max_queue']}; server healthy after: {o['healthy_after']}; server RSS MB "
              f"{' -> '.join(str(r) for r in o['rss_mb'])} (growth {o['rss_growth_mb']} MB)")
    cache = res["adapter_cache"]
    out.print("adapter cache: " + ", ".join(f"{k.removeprefix('deltafleet_adapter_cache_').removesuffix('_total')} "
                                            f"{v:.0f}" for k, v in cache.items()))


def bench_compress_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory of the base."),
    finetuned: Path | None = typer.Option(None, help="Checkpoint directory of the full fine-tune."),
    synthetic: float | None = typer.Option(None, help="Instead of --finetuned: a synthetic fine-tune whose projection "
                                           "deltas have singular values decaying as k^-ALPHA (random singular vectors)"
                                           ", written under --out/synthetic-finetune."),
    synthetic_rel: float = typer.Option(0.03, help="With --synthetic: ||delta|| / ||W|| of every projection."),
    methods: str = typer.Option("delta-come,lowrank,bitdelta,dare", help="Comma-separated methods."),
    ratios: str = typer.Option("1/8,1/16,1/32,1/64,1/128,1/256", help="Comma-separated ratios."),
    out: Path = typer.Option(..., help="Output directory: frontier.md, frontier.png, frontier.json."),
    quantizer: str = typer.Option("gptq", help="delta-come quantizer: gptq or rtn."),
    plan: str = typer.Option("alloc", help=PLAN_HELP),
    alloc_per: str = typer.Option("shape", help=ALLOC_PER_HELP),
    u_groups: str = typer.Option("out", help=U_GROUPS_HELP),
    calib: str = typer.Option("shakespeare", help=CALIB_HELP),
    calib_seqs: int = typer.Option(16, min=1, help="Calibration sequences."),
    calib_len: int = typer.Option(128, min=2, help="Tokens per calibration / evaluation sequence."),
    eval_seqs: int = typer.Option(8, min=1, help="Held-out text sequences for the KL when --kl-on text."),
    task: str = typer.Option("", help="Comma-separated exact-match tasks for accuracy (mean over them) and gain "
                                     "kept (empty: KL and error only)."),
    examples: int = typer.Option(32, min=1, help="Test examples per task of --task."),
    kl_on: str = typer.Option("auto", help="KL measured on: task (test prompts + answers of --task), text (held-out "
                                         "--calib text after the calibration chunks), auto (task if --task)."),
) -> None:
    """Quality frontier: reconstruction error, mean KL vs the fine-tune, time (and accuracy) per method and ratio."""
    from deltafleet.compress import extract_deltas
    from deltafleet.compress.budget import parse_ratio
    from deltafleet.compress.frontier import run_frontier, task_sequences, write_frontier
    from deltafleet.compress.synthetic import write_synthetic_finetune
    from deltafleet.eval.core import task_accuracy
    from deltafleet.models.loading import load_model, load_tokenizer

    try:
        rs = [parse_ratio(r) for r in ratios.split(",")]
        if (finetuned is None) == (synthetic is None):
            raise DeltafleetError("give exactly one of --finetuned DIR and --synthetic ALPHA")
        if synthetic is not None:
            finetuned = write_synthetic_finetune(base, out / "synthetic-finetune", synthetic, synthetic_rel)
            console.print(f"synthetic fine-tune: singular values k^-{synthetic}, ||delta||/||W|| = {synthetic_rel}, "
                          f"in {finetuned}")
        ds = extract_deltas(base, finetuned)
        model = load_model(ds.base_path)[0]
        ids = calibration(ds.base_path, calib, calib_seqs, calib_len)
        tasks = [t.strip() for t in task.split(",") if t.strip()]
        kl_on = ("task" if tasks else "text") if kl_on == "auto" else kl_on
        if kl_on not in ("task", "text") or (kl_on == "task" and not tasks):
            raise DeltafleetError(f"kl_on={kl_on!r}: must be task (with --task), text or auto")
        if kl_on == "task":
            eval_ids = task_sequences(load_tokenizer(ds.base_path), tasks, examples)
            kl_desc = f"{examples} test prompts + answers of each of {', '.join(tasks)}"
        else:
            eval_ids = calibration(ds.base_path, calib, eval_seqs, calib_len, skip=calib_seqs)
            kl_desc = f"{eval_seqs} x {calib_len} held-out tokens of `{calib}`"
        accuracy = task_accuracy(load_tokenizer(ds.base_path), tasks, examples) if tasks else None
        out.mkdir(parents=True, exist_ok=True)
        partial = out / "frontier.partial.json"

        def save(points):
            partial.write_text(json.dumps([asdict(p) for p in points], indent=2))

        points = run_frontier(ds, model, [m.strip() for m in methods.split(",")], rs, ids, eval_ids,
                              {"quantizer": quantizer, "plan": plan, "u_groups": u_groups, "alloc_per": alloc_per},
                              accuracy,
                              log=console.print, on_point=save)
        header = (f"# Compression frontier\n\nbase `{base}`, fine-tune `{finetuned}`; KL on {kl_desc}; "
                  f"calibration {calib_seqs} x {calib_len} of `{calib}`; quantizer {quantizer}; delta-come plan {plan}"
                  + (f" per {alloc_per}" if plan == "alloc" else "")
                  + f", U grouped along {u_groups}"
                  + (f"; accuracy: mean over {', '.join(tasks)} of {examples} test examples each" if tasks else ""))
        path = write_frontier(points, out, header)
        partial.unlink(missing_ok=True)
    except (DeltafleetError, ValueError, OSError) as e:
        _fail(e)
    console.print(f"wrote {path}")


def lowbit_bench_command(
    base: list[str] = typer.Option(["smollm2-135m"], help="Embedded model name, checkpoint or quantized-base "
                                   "directory; repeat to compare bases in one run (ratios to the first)."),
    dtype: str = typer.Option("float32", help="Engine compute dtype: float32 or bfloat16."),
    kernel: str = typer.Option("native", help="Quantized-linear kernel: native, fast, reference or cached."),
    batch: int = typer.Option(8, help="Concurrent requests."),
    prompt_len: int = typer.Option(16, help="Prompt tokens per request."),
    max_tokens: int = typer.Option(16, help="Generated tokens per request."),
    adapters: int = typer.Option(0, min=0, help="Random tenants (half LoRA r16, half RoAd) the requests cycle over."),
    rounds: int = typer.Option(1, min=1, help="Measured runs per base (alternating bases); medians reported."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Engine decode throughput (tokens/s) on one or more bases, quantized or not, optionally with mixed tenants."""
    from deltafleet.bench.lowbit import compare, decode_throughput

    try:
        if len(base) == 1:
            rows = [decode_throughput(base[0], dtype, kernel, batch, prompt_len, max_tokens, adapters, rounds)]
            result = rows[0]
        else:
            result = compare(base, dtype, kernel, batch, prompt_len, max_tokens, adapters, rounds)
            rows = result["rows"]
    except (DeltafleetError, ValueError) as e:
        _fail(e)
    if as_json:
        typer.echo(json.dumps(result))
        return
    for row in rows:
        ratio = f", {row['vs_first']:.2f}x the first" if "vs_first" in row else ""
        console.print(f"{row['base']}: decode {row['decode_tokens_per_s']:.1f} tokens/s{ratio} (batch {batch}, "
                      f"{dtype}, {adapters} tenants, kernel {row['kernel']}); projection weights "
                      f"{row['projection_bytes']:,} bytes", highlight=False)


def print_report(rep: dict) -> None:
    c, hw = rep["config"], rep["hardware"]
    adapters = c.get("adapter_dtype", c["dtype"])
    console.print(f"[bold]{c['base']}[/bold] {c['dtype']} (adapters {adapters}), batch {c['batch']}, "
                  f"prompt {c['prompt_len']}, "
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
                  f"adapter slot pools {rep['adapter_pools_mb']:.0f} MB; "
                  f"prepacked base weights {rep.get('prepacked_weights_mb', 0):.0f} MB")
    hf = rep["scenarios"].get("peft32", {}).get("extra", {}).get("transformers_base_step_ms")
    if hf is not None:
        console.print(f"for scale: transformers' own base decode step (no adapters) {hf:.1f} ms")


def bench_memory_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    lengths: int = typer.Option(120, min=1, help="Distinct prompt lengths (8, 11, 14, ... tokens)."),
    every: int = typer.Option(20, min=1, help="Sample RSS every this many requests."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON only."),
) -> None:
    """Resident memory against the number of distinct prompt lengths, with and without bounded primitive caches
    and prefill buckets (each variant in a fresh process)."""
    from deltafleet.bench.memory import run

    try:
        res = run(base, dtype, lengths, every, log=lambda m: log_console.print(f"[dim]{m}[/dim]"))
    except (DeltafleetError, RuntimeError, OSError) as e:
        _fail(e)
    if as_json:
        console.print_json(json.dumps(res))
        return
    table = Table(title=f"bench memory: {res['base']} ({res['dtype']}), {res['lengths']} distinct prompt lengths, "
                        f"{res['cpu_count']} CPUs; RSS growth after warm-up, MB, every {res['every']} requests")
    for col in ("variant", "RSS at start MB", "growth MB", "final growth MB", "second pass MB", "seconds"):
        table.add_column(col, justify="left" if col in ("variant", "growth MB") else "right")
    for v in res["variants"]:
        table.add_row(v["variant"], f"{v['rss_start_mb']:.0f}", " ".join(f"{g:.0f}" for g in v["growth_mb"]),
                      f"{v['growth_mb'][-1]:.0f}", f"{v['second_pass_growth_mb']:.0f}", f"{v['seconds']:.1f}")
    console.print(table)


def bench_churn_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    dtype: str = typer.Option("float32", help="float32 or bfloat16."),
    cycles: int = typer.Option(1000, min=1, help="Load-use-unload cycles, each under a new adapter name."),
    workers: int = typer.Option(4, min=1, help="Clients churning adapters concurrently."),
    streams: int = typer.Option(2, min=0, help="Clients streaming to the steady tenants meanwhile."),
    slots: int = typer.Option(2, min=1, help="LoRA slots of the server (small: every cycle evicts)."),
    host_cache_mb: int = typer.Option(8, min=1, help="Host-memory adapter cache of the server, MB."),
    quick: bool = typer.Option(False, "--quick", help="100 cycles."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON only."),
) -> None:
    """Churn soak: thousands of adapters loaded, used and unloaded through the admin API with small slot and
    host-cache budgets while steady tenants stream; reports outcomes by code, hangs, slots and RSS at the end."""
    from deltafleet.bench.churn import run

    try:
        res = run(base, dtype, 100 if quick else cycles, workers, streams, slots=slots, host_cache_mb=host_cache_mb,
                  log=lambda m: log_console.print(f"[dim]{m}[/dim]"))
    except (DeltafleetError, RuntimeError, OSError) as e:
        _fail(e)
    if as_json:
        console.print_json(json.dumps(res))
        return
    console.print(f"bench churn: {res['cycles']} cycles in {res['seconds']} s ({res['cycles_per_s']}/s), "
                  f"{res['workers']} churn clients, {res['streams']} steady streams, {res['slots']} slots, "
                  f"host cache {res['host_cache_mb']} MB, {res['cpu_count']} CPUs", highlight=False)
    console.print(f"churn outcomes {res['churn_outcomes']}; steady outcomes {res['steady_outcomes']}; failures "
                  f"{res['failures'] or 0}; hung {res['hung']}", highlight=False)
    console.print(f"after: {res['adapters_listed_after']} adapters listed (the start-up scan's "
                  f"{res['adapters_scanned_at_start']}: {res['listing_equals_start']}), resident gauge "
                  f"{res['resident_gauge_after']} = resident rows {res['resident_rows_after']}; RSS "
                  f"{res['rss_start_mb']} -> {res['rss_end_mb']} MB ({res['rss_growth_mb']:+} MB)", highlight=False)


def bench_peer_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    dtype: list[str] = typer.Option(["auto"], help="deltafleet serve dtype(s): auto, bfloat16, float32; repeatable "
                                    "or comma-separated, one server run each."),
    gguf_type: list[str] = typer.Option([], help="llama.cpp model and LoRA GGUF type(s): f32, f16, bf16; "
                                        "repeatable or comma-separated (default: the precision of each --dtype)."),
    adapters: int = typer.Option(8, min=1, help="LoRA adapters (r16, alpha 32, all seven projections)."),
    clients: int = typer.Option(8, min=1, help="Concurrent clients (and deltafleet --max-batch, llama.cpp -np)."),
    requests_per_client: int = typer.Option(4, min=1, help="Requests each client sends per phase."),
    max_tokens: int = typer.Option(32, min=1, help="Output tokens per request (exactly: ignore_eos)."),
    llama_threads: int | None = typer.Option(None, min=1, help="llama-server -t and -tb (default: the CPU count)."),
    skip_llamacpp: bool = typer.Option(False, "--skip-llamacpp", help="Measure deltafleet only (no build)."),
    build_jobs: int = typer.Option(2, min=1, help="Compile jobs of the one-time llama.cpp build."),
    seed: int = typer.Option(0, help="Seed of the random adapters."),
    quick: bool = typer.Option(False, "--quick", help="1 request per client, 16 tokens: about 3 minutes on 2 "
                                                      "cores once llama.cpp is built."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """deltafleet's server against llama.cpp's llama-server: same LoRAs, prompts and clients, one after the other
    on this machine; greedy answers checked against transformers + peft first. Builds llama-server once (cached)."""
    from deltafleet.bench.peer import DTYPES, PeerConfig, parse_choices, quick_config, run
    from deltafleet.bench.peer_build import GGUF_TYPES

    try:
        dtypes = tuple(dict.fromkeys(resolve_dtype(d) for d in parse_choices(dtype, ("auto", *DTYPES), "--dtype")))
        kw = {"base": base, "dtypes": dtypes, "gguf_types": parse_choices(gguf_type, GGUF_TYPES, "--gguf-type"),
              "adapters": adapters, "clients": clients, "skip_llamacpp": skip_llamacpp, "build_jobs": build_jobs,
              "seed": seed, **({} if llama_threads is None else {"llama_threads": llama_threads})}
        cfg = (quick_config(**kw) if quick
               else PeerConfig(**kw, requests_per_client=requests_per_client, max_tokens=max_tokens))
    except ValueError as e:
        raise typer.BadParameter(str(e)) from None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=log_console) as bar:
        tasks: dict[str, int] = {}

        def progress(step: str, done: int, total: int) -> None:
            if step not in tasks:
                tasks[step] = bar.add_task(step, total=total or None)
            bar.update(tasks[step], completed=done, total=total or None)

        try:
            rep = run(cfg, log=lambda m: bar.console.print(f"[dim]{m}[/dim]", highlight=False), progress=progress)
        except (DeltafleetError, RuntimeError, OSError) as e:
            _fail(e)
    if as_json:
        console.print_json(json.dumps(rep))
    else:
        print_peer_report(rep, console if console.is_terminal else Console(width=140))
    if rep["failures"]:
        for f in rep["failures"]:
            log_console.print(f"[bold red]FAILED:[/bold red] {f}", highlight=False)
        raise typer.Exit(code=1)


def print_peer_report(rep: dict, out: Console) -> None:
    c, cpu = rep["config"], rep["cpu"]
    flags = " ".join(f for f, on in cpu["flags"].items() if on)
    out.print(f"CPU: {cpu['model']} ({cpu['count']} CPUs; {flags}); "
              + ", ".join(f"{k} {v}" for k, v in rep["versions"].items()), highlight=False)

    def ms(v):
        return "-" if v is None else f"{v:.0f}"

    table = Table(title=f"bench peer: {c['base']}, {c['adapters']} LoRA r16 adapters, {c['clients']} clients x "
                        f"{c['requests_per_client']} requests, {c['prompt_tokens']}-token prompts, "
                        f"{c['max_tokens']} new tokens, greedy, streamed")
    for col in ("server", "phase", "ok", "out tok/s", "TTFT p50 ms", "TTFT p99 ms", "ITL p50 ms", "ITL p99 ms"):
        table.add_column(col, justify="left" if col in ("server", "phase") else "right")
    for r in rep["runs"]:
        for phase, f in r["phases"].items():
            table.add_row(r["label"], phase, f"{f['ok']}/{f['requests']}",
                          "-" if f["output_tok_s"] is None else f"{f['output_tok_s']:.1f}", ms(f["ttft_p50_ms"]),
                          ms(f["ttft_p99_ms"]), ms(f["itl_p50_ms"]), ms(f["itl_p99_ms"]))
    out.print(table)
    ratios = rep["ratios"]
    for key, what in (("mixed_over_base", "mixed / base (out tok/s)"),
                      ("ttft_p99_mixed_over_base", "mixed / base (TTFT p99)"),
                      ("served_base_over_engine", "served base / in-process engine (out tok/s)")):
        if ratios.get(key):
            out.print(f"{what}: " + ", ".join(f"{k} {v}" for k, v in ratios[key].items()), highlight=False)
    for pair, per_phase in ratios["deltafleet_over_llamacpp"].items():
        out.print(f"{pair} (out tok/s): " + ", ".join(f"{p} {v}" for p, v in per_phase.items()), highlight=False)
    ref = rep["reference"]
    out.print(f"correctness vs transformers + peft fp32 ({ref['check_tokens']} greedy tokens per case; adapters "
              f"change the base's answer in {ref['adapters_change_answer']}):", highlight=False)
    for r in rep["runs"]:
        cr = r["correctness"]
        diverged = [f"{x['adapter'] or 'base'} from token {x['first_divergence']} (reference margin "
                    f"{x['reference_margin']}{', a near tie' if x['near_tie'] else ''})" for x in cr["cases"]
                    if x["first_divergence"] is not None]
        extra = ("" if "base_equals_zero_scales" not in cr
                 else f"; base = all LoRA scales 0: {cr['base_equals_zero_scales']}")
        style = "bold red" if cr["first_token_mismatch"] else ("yellow" if diverged else "green")
        out.print(f"  {r['label']}: [{style}]{cr['exact']}/{cr['of']} exact[/{style}]"
                  + (f" (diverged: {'; '.join(diverged)})" if diverged else "") + extra
                  + f"; start-up {r['startup_s']} s, RSS {r['rss_mb']:.0f} MB", highlight=False)


def bench_methods_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    tasks: str = typer.Option("json-field,sort", help="Comma-separated tasks."),
    methods: str = typer.Option("lora,road,pafi,hiwi,meft,full", help="Comma-separated training methods."),
    steps: int = typer.Option(80, min=1, help="Optimizer steps of every run."),
    batch_size: int = typer.Option(8, min=1, help="Examples per step."),
    test_examples: int = typer.Option(50, min=1, help="Test examples scored per run."),
    precision: str = typer.Option("auto", help="auto, bf16 or fp32 (the recipe's)."),
    results: Path | None = typer.Option(None, help="Also write the JSON report here."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON only."),
) -> None:
    """Fine-tuning methods side by side at matched steps: test accuracy, trainable parameters, stored bytes, peak
    RSS (one child process per run) and training time."""
    from deltafleet.bench.methods import MethodsConfig, run

    try:
        cfg = MethodsConfig(base=base, tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                            methods=tuple(m.strip() for m in methods.split(",") if m.strip()), steps=steps,
                            batch_size=batch_size, test_examples=test_examples, precision=precision)
        rep = run(cfg, log=lambda m: log_console.print(f"[dim]{m}[/dim]"))
    except (DeltafleetError, RuntimeError, ValueError, OSError) as e:
        _fail(e)
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(rep, indent=2) + "\n")
    if as_json:
        console.print_json(json.dumps(rep))
        return
    table = Table(title=f"bench methods: {cfg.steps} steps, batch {cfg.batch_size}, {rep['cpu']['model']}")
    for col in ("task", "method", "lr", "test acc", "trainable", "stored MB", "peak RSS MB", "train s"):
        table.add_column(col, justify="left" if col in ("task", "method") else "right")
    for r in rep["runs"]:
        table.add_row(r["task"], r["method"], f"{r['lr']:g}", f"{r['test_accuracy']:.2f}",
                      f"{r['trainable_params']:,}", f"{r['stored_bytes'] / 1e6:.2f}", f"{r['peak_rss_mb']:.0f}",
                      f"{r['train_seconds']:.0f}")
    console.print(table)
    for m, s in rep["summary"].items():
        console.print(f"{m}: mean test accuracy {s['mean_test_accuracy']:.3f}"
                      + (f" ({s['accuracy_minus_lora']:+.3f} vs LoRA), peak RSS {s['peak_rss_over_lora']:.2f}x "
                         f"LoRA's" if "accuracy_minus_lora" in s else ""), highlight=False)


def bench_route_command(
    tenants: int = typer.Option(10_000, min=1, help="Tenants, Zipf-popular."),
    zipf: float = typer.Option(1.0, help="Zipf exponent of tenant popularity."),
    replicas: str = typer.Option("4,8,16,32,64", help="Replica counts to simulate, comma-separated."),
    slots: int = typer.Option(32, min=1, help="Resident tenants per replica (LRU)."),
    batch: int = typer.Option(32, min=1, help="Requests a replica runs at once."),
    requests_per_replica: int = typer.Option(2000, min=1, help="Simulated requests per replica."),
    utilization: float = typer.Option(0.7, help="Offered load over the fleet's capacity, in (0, 1)."),
    service_s: float = typer.Option(2.0, help="Seconds one request runs once started."),
    cold_load_s: float | None = typer.Option(None, help="Seconds a miss waits for its tenant; default: measured "
                                             "now (p99 of loading a SmolLM2 LoRA r16 into slot buffers)."),
    spill: int = typer.Option(16, min=1, help="affinity: load gap at which a hot tenant spreads to another replica."),
    policies: str = typer.Option("random,least_loaded,affinity", help="Routing policies, comma-separated."),
    plot_path: Path | None = typer.Option(None, "--plot", help="Write the miss/latency/imbalance plot (PNG)."),
    seed: int = typer.Option(0, help="Seed of arrivals and tenants."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON only."),
) -> None:
    """Simulate routing many tenants over many replicas (no Ray): miss rate, imbalance, latency tail per policy."""
    from deltafleet.bench.route import RouteConfig, measure_cold_load, plot, run

    measured = None
    try:
        if cold_load_s is None:
            measured = measure_cold_load()
            cold_load_s = measured["p99_s"]
        cfg = RouteConfig(tenants=tenants, zipf=zipf, replicas=tuple(int(r) for r in replicas.split(",")),
                          slots=slots, batch=batch, requests_per_replica=requests_per_replica,
                          utilization=utilization, service_s=service_s, cold_load_s=cold_load_s, spill=spill,
                          policies=tuple(policies.split(",")), seed=seed)
        rep = run(cfg)
    except (DeltafleetError, ValueError) as e:
        _fail(e)
    rep["cold_load_measured"] = measured
    if plot_path is not None:
        plot(rep, plot_path)
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
        return
    console.print(f"{tenants} tenants (Zipf {zipf}), {slots} slots and {batch} seats per replica, utilization "
                  f"{utilization}, cold load {cold_load_s * 1e3:.0f} ms" + (" (measured p99)" if measured else ""))
    table = Table("replicas", "policy", "miss rate", "imbalance", "p50 s", "p99 s", "p99.9 s", "mean wait s")
    for r in rep["rows"]:
        table.add_row(str(r["replicas"]), r["policy"], f"{r['miss_rate']:.3f}", f"{r['imbalance']:.2f}",
                      f"{r['latency_p50_s']:.3f}", f"{r['latency_p99_s']:.3f}", f"{r['latency_p999_s']:.3f}",
                      f"{r['mean_wait_s']:.3f}")
    console.print(table)


def bench_cluster_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    dtype: str = typer.Option("auto", help="auto, bfloat16 or float32."),
    replicas: int = typer.Option(2, min=1, help="Engine replicas."),
    tenants: int = typer.Option(24, min=1, help="Random LoRA r8 tenants."),
    slots: int = typer.Option(4, min=1, help="LoRA slots per replica."),
    requests: int = typer.Option(96, min=1, help="Requests per policy (Zipf-popular tenants)."),
    clients: int = typer.Option(8, min=1, help="Concurrent openai clients."),
    max_tokens: int = typer.Option(16, min=1, help="Tokens generated per request."),
    policies: str = typer.Option("affinity,least_loaded,random", help="Router policies, comma-separated."),
    recovery_s: float = typer.Option(30.0, min=0.0, help="Seconds of the replica-kill phase (0: skip it)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON only."),
) -> None:
    """The Ray Serve application on this machine: slot-miss rate, throughput and latency per routing policy, then a
    replica killed mid-stream (requests lost, restart time)."""
    from deltafleet.bench.cluster import ClusterBenchConfig, run
    from deltafleet.bench.peer import this_cpu

    cfg = ClusterBenchConfig(base=base, dtype=resolve_dtype(dtype), replicas=replicas, tenants=tenants, slots=slots,
                             requests=requests, clients=clients, max_tokens=max_tokens,
                             policies=tuple(policies.split(",")), recovery_s=recovery_s)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Ray's driver prints cluster events to stdout
            rep = run(cfg, log=(lambda _: None) if as_json else (lambda m: console.print(m, highlight=False)))
    except (DeltafleetError, ValueError) as e:
        _fail(e)
    rep["cpu"] = this_cpu()
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
        return
    table = Table("policy", "miss rate", "vs affinity", "requests per replica", "tokens/s", "p50 s", "p99 s",
                  "errors")
    for p, r in rep["policies"].items():
        table.add_row(p, f"{r['miss_rate']:.3f}", f"{r.get('miss_rate_vs_affinity', float('nan')):.2f}x",
                      " / ".join(str(v) for v in r["requests_per_replica"].values()), f"{r['tokens_per_s']:.1f}",
                      f"{r['latency_p50_s']:.2f}", f"{r['latency_p99_s']:.2f}", str(r["errors"] or "-"))
    console.print(table)
    if "recovery" in rep:
        console.print(f"recovery: {rep['recovery']}", highlight=False)


def bench_density_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    dtype: str = typer.Option("auto", help="auto, bfloat16 or float32."),
    tenants: str = typer.Option("100,1000", help="Tenant counts, comma-separated (equal thirds of LoRA r16, RoAd, "
                                "compressed full fine-tunes at 1/64)."),
    requests: int = typer.Option(256, min=1, help="Requests per stream (Zipf-popular tenants)."),
    rounds: int = typer.Option(2, min=1, help="Paired rounds (tenants, then the base) per tenant count."),
    host_cache_gb: float = typer.Option(8.0, min=0.0, help="Host cache of loaded tenants (GiB)."),
    loader_threads: int = typer.Option(1, min=1, help="The engine's adapter loader threads."),
    tiers: str = typer.Option("preloaded,disk", help="Where tenants start, comma-separated: preloaded (read into "
                              "host memory before the stream, as S-LoRA holds all adapters in main memory) and/or "
                              "disk (read when first requested). The top-level figures are the first tier's."),
    root: Path | None = typer.Option(None, help="Where the tenants are written (kept for later runs; default: "
                                     "$DELTAFLEET_CACHE_DIR/density-tenants)."),
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON only."),
) -> None:
    """Tenant density: N tenants registered on one engine (disk -> host cache -> slots), a Zipf stream with batch 32:
    bytes per tenant, slot misses, cold-load time, throughput against the base, RSS."""
    from deltafleet.bench.density import DensityConfig, run
    from deltafleet.bench.peer import this_cpu
    from deltafleet.store.cache import cache_dir

    cfg = DensityConfig(base=base, dtype=resolve_dtype(dtype), tenants=tuple(int(t) for t in tenants.split(",")),
                        requests=requests, rounds=rounds, host_cache_gb=host_cache_gb, loader_threads=loader_threads,
                        tiers=tuple(t.strip() for t in tiers.split(",") if t.strip()))
    try:
        rep = run(cfg, root or cache_dir() / "density-tenants",
                  log=(lambda _: None) if as_json else (lambda m: console.print(m, highlight=False)))
    except (DeltafleetError, ValueError) as e:
        _fail(e)
    rep["cpu"] = this_cpu()
    if as_json:
        typer.echo(json.dumps(rep, indent=2))
        return
    table = Table("tenants", "tier", "bytes/tenant disk (lora/road/ft)", "slot misses", "host loads",
                  "to host p50/p99 s", "slot copy p99 s", "vs base", "RSS GiB")
    for r in rep["rows"]:
        b = r["bytes_per_tenant"]
        table.add_row(str(r["tenants"]), r["tier"],
                      " / ".join(f"{b[k]['disk'] / 1e6:.2f} MB" for k in ("lora", "road", "ft")),
                      f"{r['slot_miss_rate']:.3f}", str(r["host_loads"]),
                      f"{r['cold_load_to_host_p50_s']} / {r['cold_load_to_host_p99_s']}", str(r["slot_copy_p99_s"]),
                      f"{r['throughput_vs_base']:.2f}x", f"{r['peak_rss_gb']:.2f}")
    console.print(table)


bench_app.command("engine")(bench_engine_command)
bench_app.command("serve")(bench_serve_command)
bench_app.command("compress")(bench_compress_command)
bench_app.command("lowbit")(lowbit_bench_command)
bench_app.command("memory")(bench_memory_command)
bench_app.command("churn")(bench_churn_command)
bench_app.command("peer")(bench_peer_command)
bench_app.command("methods")(bench_methods_command)
bench_app.command("route")(bench_route_command)
bench_app.command("cluster")(bench_cluster_command)
bench_app.command("density")(bench_density_command)
