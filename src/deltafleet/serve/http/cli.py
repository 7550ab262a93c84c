"""`deltafleet serve`: the OpenAI-compatible multi-tenant server. Heavy imports happen inside the command."""

from __future__ import annotations

import ipaddress
import logging
import time
from pathlib import Path

import typer
from rich.console import Console

from deltafleet.errors import DeltafleetError

console = Console(stderr=True)


def resolve_dtype(dtype: str) -> str:
    """`auto`: bfloat16 where the CPU multiplies bf16 natively (or on a GPU), else float32 (about 10x faster
    than emulated bf16 on a 2-core AVX2 CPU)."""
    if dtype != "auto":
        return dtype
    from deltafleet.train.config import native_bf16

    return "bfloat16" if native_bf16() else "float32"


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def serve_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    adapters: Path | None = typer.Option(None, help="Adapters root: one adapter per subdirectory, named after it."),
    host: str = typer.Option("127.0.0.1", help="Interface to listen on."),
    port: int = typer.Option(8000, min=0, max=65535, help="TCP port (0: any free port)."),
    dtype: str = typer.Option("auto", help="auto, bfloat16 or float32 (auto: bf16 only with native CPU bf16)."),
    adapter_dtype: str | None = typer.Option(None, help="Resident adapters' dtype: bfloat16 or float32 (default: "
                                             "--dtype's; bfloat16 under float32 halves adapter memory traffic)."),
    prepack: bool = typer.Option(True, help="On a float32 model, run the base matmuls on weights reordered once "
                                 "for oneDNN (faster decode; one more copy of the weights in memory)."),
    config: Path | None = typer.Option(None, help="Tenancy TOML: API keys, their adapters, admin keys."),
    model_name: str | None = typer.Option(None, help="Public name of the base model (default: --base's name)."),
    max_batch: int = typer.Option(16, min=1, help="Running sequences at most."),
    max_model_len: int = typer.Option(2048, min=8, help="Prompt + generated tokens per sequence."),
    max_queue: int = typer.Option(256, min=1, help="Waiting requests at most; more get HTTP 429."),
    shutdown_deadline: float = typer.Option(30.0, min=0.0, help="Seconds running requests get on shutdown."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve the base model and every adapter in --adapters through an OpenAI-compatible HTTP API."""
    from deltafleet.serve.http.app import create_app
    from deltafleet.serve.http.server import bind, make_server
    from deltafleet.serve.http.tenancy import Tenancy

    try:
        tenancy = Tenancy.from_file(config) if config is not None else Tenancy()
        if tenancy.open and not is_loopback(host):
            console.print(f"[yellow]warning:[/yellow] no --config: the server is open to anyone who can reach "
                          f"{host}:{port}")
        dt = resolve_dtype(dtype)
        t0 = time.perf_counter()
        with console.status(f"loading {base} ({dt})"):
            gateway = build_gateway(base, adapters, dt, model_name, max_batch=max_batch,
                                    max_model_len=max_model_len, max_queue=max_queue, adapter_dtype=adapter_dtype,
                                    prepack=prepack)
        console.print(f"loaded {gateway.model_name} in {time.perf_counter() - t0:.1f} s ({dt}); "
                      f"{len(gateway.adapter_names())} adapters; tenancy: "
                      f"{'open (no --config)' if tenancy.open else f'{len(tenancy.entries)} keys'}")
        sock = bind(host, port)
    except (DeltafleetError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(code=2) from None
    logging.getLogger("deltafleet.serve").setLevel(log_level.upper())
    server = make_server(create_app(gateway, tenancy), gateway, shutdown_deadline, log_level=log_level,
                         access_log=True)
    console.print(f"serving on http://{host}:{sock.getsockname()[1]} (Ctrl-C drains and stops)")
    server.run(sockets=[sock])
    console.print("stopped")


def build_gateway(base: str, adapters: Path | None, dtype: str, model_name: str | None = None, **engine_kw):
    """The engine-backed gateway (imports torch)."""
    from deltafleet.serve.engine import EngineConfig
    from deltafleet.serve.http.engine_gateway import EngineGateway

    try:
        cfg = EngineConfig(dtype=dtype, **engine_kw)
    except ValueError as e:
        raise DeltafleetError(str(e)) from None
    return EngineGateway.from_pretrained(base, adapters, cfg, model_name)


def bench_serve_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    dtype: str = typer.Option("auto", help="auto, bfloat16 or float32."),
    adapters: int = typer.Option(8, min=1, help="Random adapters to serve (LoRA r8, LoRA r16, RoAd in turn)."),
    clients: int = typer.Option(8, min=1, help="Concurrent clients below the queue bound."),
    requests: int = typer.Option(64, min=1, help="Requests per pattern (uniform, then Zipf)."),
    max_tokens: int = typer.Option(32, min=1, help="Output tokens per request (exactly: ignore_eos)."),
    max_batch: int = typer.Option(8, min=1, help="Server --max-batch."),
    max_queue: int = typer.Option(16, min=1, help="Server --max-queue."),
    burst: int = typer.Option(96, min=1, help="Simultaneous requests per overload burst."),
    bursts: int = typer.Option(3, min=0, help="Overload bursts."),
    seed: int = typer.Option(0, help="Seed for adapters and the request mix."),
    quick: bool = typer.Option(False, "--quick", help="A run of under 2 minutes on 2 cores: 16 requests of 16 "
                                                      "tokens per pattern, 2 bursts of 48."),
    as_json: bool = typer.Option(False, "--json", help="Print the figures as JSON."),
) -> None:
    """Start the server on loopback, load it with mixed-adapter clients, then overload it past its queue bound."""
    import json

    from rich.table import Table

    from deltafleet.serve.http.bench import run_bench

    if quick:
        requests, max_tokens, burst, bursts = 16, 16, 48, 2
    out = Console()
    if not out.is_terminal:
        out = Console(width=132)

    def log(message: str) -> None:
        console.print(f"[dim]{message}[/dim]", soft_wrap=True)

    try:
        res = run_bench(base, resolve_dtype(dtype), adapters, clients, requests, max_tokens, max_batch, max_queue,
                        burst, bursts, seed, log=log)
    except (DeltafleetError, RuntimeError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(code=2) from None
    if as_json:
        out.print_json(json.dumps(res))
        return

    def ms(v):
        return "-" if v is None else f"{v * 1000:.0f}"

    table = Table(title=f"bench serve: {res['base']} ({res['dtype']}), {res['adapters']} adapters + base, "
                        f"{res['clients']} clients, {res['max_tokens']} tokens/request, {res['cpu_count']} CPUs")
    for col in ("phase", "requests", "ok", "errors", "req/s", "out tok/s", "p50 ms", "p99 ms", "TTFT p50 ms",
                "TTFT p99 ms"):
        table.add_column(col, justify="left" if col in ("phase", "errors") else "right")
    for p in res["phases"] + res["overload"]["bursts"]:
        table.add_row(p["name"], str(p["requests"]), str(p["ok"]),
                      ", ".join(f"{k}: {v}" for k, v in sorted(p["errors"].items())) or "0",
                      f"{p['requests_per_s']:.2f}", f"{p['output_tokens_per_s']:.1f}", ms(p["latency_p50_s"]),
                      ms(p["latency_p99_s"]), ms(p["ttft_p50_s"]), ms(p["ttft_p99_s"]))
    out.print(table)
    o = res["overload"]
    out.print(f"overload: bursts of {o['burst']} against max_batch {res['max_batch']} + max_queue "
              f"{res['max_queue']}; server healthy after: {o['healthy_after']}; server RSS MB "
              f"{' -> '.join(str(r) for r in o['rss_mb'])} (growth {o['rss_growth_mb']} MB)")
    cache = res["adapter_cache"]
    out.print("adapter cache: " + ", ".join(f"{k.removeprefix('deltafleet_adapter_cache_').removesuffix('_total')} "
                                            f"{v:.0f}" for k, v in cache.items()))


def serve_demo_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    dtype: str = typer.Option("auto", help="auto, bfloat16 or float32."),
) -> None:
    """The multi-tenant demo: train two small tenant adapters (once, cached), serve them with the base model,
    send every tenant's requests at once through the openai client, print the answers, drain the server."""
    from deltafleet.serve.http.demo import run_demo

    try:
        out = Console()
        run_demo(base, resolve_dtype(dtype), out if out.is_terminal else Console(width=150))
    except DeltafleetError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(code=2) from None
