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
    """`auto`: bfloat16 where the CPU multiplies bf16 in hardware (avx512_bf16 or AMX: `dtypes.native_bf16`), else
    float32 (about 10x faster than emulated bf16 on a 2-core AVX2 CPU)."""
    if dtype != "auto":
        return dtype
    from deltafleet.dtypes import native_bf16  # imports torch (1.6 s): only when `auto` must be resolved

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
    prepack: bool = typer.Option(True, help="On a float32 or bfloat16 CPU model, run the base matmuls on weights "
                                 "reordered once for oneDNN (faster decode; one more copy of the weights in memory)."),
    pafi_density: float = typer.Option(0.02, min=1e-6, max=1.0, help="Mask density of the PaFi tenants served "
                                       "(they share the base's mask of this density)."),
    config: Path | None = typer.Option(None, help="Tenancy TOML: API keys, their adapters, admin keys."),
    model_name: str | None = typer.Option(None, help="Public name of the base model (default: --base's name)."),
    max_batch: int = typer.Option(16, min=1, help="Running sequences at most."),
    max_model_len: int = typer.Option(2048, min=8, help="Prompt + generated tokens per sequence."),
    max_queue: int = typer.Option(256, min=1, help="Waiting requests at most; more get HTTP 429."),
    max_body_bytes: int = typer.Option(4 * 1024 * 1024, min=1, help="Request bodies over this many bytes get HTTP "
                                       "413 before they are read in full."),
    shutdown_deadline: float = typer.Option(30.0, min=0.0, help="Seconds running requests get on shutdown."),
    primitive_cache: int = typer.Option(64, min=1, help="oneDNN primitives kept per cache (one per matmul shape; "
                                        "bounds memory however many prompt lengths arrive; see `bench memory`)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
) -> None:
    """Serve the base model and every adapter in --adapters through an OpenAI-compatible HTTP API."""
    from deltafleet.models.prepack import bound_primitive_caches

    bound_primitive_caches(primitive_cache)  # before the first matmul: the caches read it once
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
                                    prepack=prepack, pafi_density=pafi_density)
        console.print(f"loaded {gateway.model_name} in {time.perf_counter() - t0:.1f} s ({dt}); "
                      f"{len(gateway.adapter_names())} adapters; tenancy: "
                      f"{'open (no --config)' if tenancy.open else f'{len(tenancy.entries)} keys'}")
        sock = bind(host, port)
    except (DeltafleetError, OSError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(code=2) from None
    logging.getLogger("deltafleet.serve").setLevel(log_level.upper())
    server = make_server(create_app(gateway, tenancy, max_body_bytes=max_body_bytes), gateway, shutdown_deadline,
                         log_level=log_level, access_log=True)
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




def serve_demo_command(
    base: str = typer.Option("smollm2-135m", help="Embedded model name or checkpoint directory."),
    dtype: str = typer.Option("auto", help="auto, bfloat16 or float32."),
) -> None:
    """The multi-tenant demo: train two small tenant adapters (once, cached), serve them with the base model,
    send every tenant's requests at once through the openai client, print the answers, drain the server."""
    from deltafleet.bench.serve_demo import run_demo

    try:
        out = Console()
        run_demo(base, resolve_dtype(dtype), out if out.is_terminal else Console(width=150))
    except DeltafleetError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(code=2) from None
