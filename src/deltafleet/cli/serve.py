"""`deltafleet serve`: the OpenAI-compatible multi-tenant server. Heavy imports happen inside the command."""

from __future__ import annotations

import ipaddress
import logging
import signal
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
    host_cache_gb: float = typer.Option(4.0, min=0.001, help="Host memory for loaded adapters (GiB; LRU)."),
    preload_adapters: bool = typer.Option(False, help="Read every adapter of --adapters into host memory in the "
                                          "background from start-up, until --host-cache-gb is full (a request then "
                                          "waits only for its slot copy); requests' own loads go first."),
    max_body_bytes: int = typer.Option(4 * 1024 * 1024, min=1, help="Request bodies over this many bytes get HTTP "
                                       "413 before they are read in full."),
    shutdown_deadline: float = typer.Option(30.0, min=0.0, help="Seconds running requests get on shutdown."),
    primitive_cache: int = typer.Option(64, min=1, help="oneDNN primitives kept per cache (one per matmul shape; "
                                        "bounds memory however many prompt lengths arrive; see `bench memory`)."),
    log_level: str = typer.Option("info", help="uvicorn log level."),
    ray: bool = typer.Option(False, "--ray", help="Scale out on Ray Serve: --replicas engine replicas of the base "
                             "behind one OpenAI-compatible ingress, requests routed by adapter affinity."),
    replicas: int = typer.Option(2, min=1, help="With --ray: engine replicas (each its own slots and host cache)."),
    ray_address: str | None = typer.Option(None, help="With --ray: a running Ray cluster to deploy on (default: "
                                           "$RAY_ADDRESS, else a local cluster started here)."),
    threads_per_replica: int | None = typer.Option(None, min=1, help="With --ray: torch threads per engine replica "
                                                   "(default on a local cluster: the cores / --replicas)."),
) -> None:
    """Serve the base model and every adapter in --adapters through an OpenAI-compatible HTTP API."""
    if ray:
        serve_ray(base, adapters, host, port, resolve_dtype(dtype), config, model_name, replicas, ray_address,
                  threads_per_replica, max_body_bytes,
                  dict(max_batch=max_batch, max_model_len=max_model_len, max_queue=max_queue,
                       adapter_dtype=adapter_dtype, prepack=prepack, pafi_density=pafi_density,
                       host_cache_bytes=int(host_cache_gb * 2**30), preload_adapters=preload_adapters))
        return
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
                                    prepack=prepack, pafi_density=pafi_density,
                                    host_cache_bytes=int(host_cache_gb * 2**30), preload_adapters=preload_adapters)
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


def cluster_config(base: str, adapters: Path | None, dtype: str, config: Path | None, model_name: str | None,
                   replicas: int, threads: int | None, max_body_bytes: int, engine_kw: dict):
    """The Ray Serve application's config, every part checked here (a bad value fails now, not in each replica)."""
    import tomllib

    from deltafleet.models.loading import resolve_base
    from deltafleet.serve.cluster.app import ClusterConfig
    from deltafleet.serve.cluster.replica import ClusterSpec
    from deltafleet.serve.http.tenancy import Tenancy

    tenancy = None
    if config is not None:
        Tenancy.from_file(config)  # the file's rule, named, before anything starts
        tenancy = tomllib.loads(config.read_text(encoding="utf-8"))
    if adapters is not None and not adapters.is_dir():
        raise DeltafleetError(f"{adapters}: adapters directory not found")
    base_path = resolve_base(base)
    spec = ClusterSpec(str(base_path), str(adapters.resolve()) if adapters else None,
                       model_name or Path(str(base)).expanduser().name, tuple(dict(dtype=dtype, **engine_kw).items()),
                       threads)
    try:
        spec.engine_config()
    except ValueError as e:
        raise DeltafleetError(str(e)) from None
    return ClusterConfig(spec, replicas=replicas, tenancy=tenancy, max_body_bytes=max_body_bytes)


def serve_ray(base: str, adapters: Path | None, host: str, port: int, dtype: str, config: Path | None,
              model_name: str | None, replicas: int, address: str | None, threads: int | None, max_body_bytes: int,
              engine_kw: dict) -> None:
    """`deltafleet serve --ray`: deploy, print the URL, run until Ctrl-C, then delete the application."""
    try:
        cfg = cluster_config(base, adapters, dtype, config, model_name, replicas, threads, max_body_bytes, engine_kw)
        with console.status(f"starting Ray Serve: {replicas} engine replicas of {base} ({dtype})"):
            from deltafleet.serve.cluster.launch import start

            t0 = time.perf_counter()
            launched = start(cfg, host, port, address)
    except DeltafleetError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(code=2) from None
    console.print(f"{replicas} engine replicas ready in {time.perf_counter() - t0:.1f} s; serving on {launched.url} "
                  f"(Ray Serve; Ctrl-C stops)")
    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, interrupt)  # also when started in the background (SIGINT ignored there)
    signal.signal(signal.SIGTERM, interrupt)  # what a process manager sends
    try:
        while True:
            time.sleep(1.0)
    except KeyboardInterrupt:
        console.print("stopping")
    finally:
        launched.stop()
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
    ray: bool = typer.Option(False, "--ray", help="Serve through the Ray Serve application (`serve --ray`)."),
    replicas: int = typer.Option(2, min=1, help="With --ray: engine replicas."),
) -> None:
    """The multi-tenant demo: train two small tenant adapters (once, cached), serve them with the base model,
    send every tenant's requests at once through the openai client, print the answers, drain the server."""
    from deltafleet.bench.serve_demo import run_demo

    try:
        out = Console()
        run_demo(base, resolve_dtype(dtype), out if out.is_terminal else Console(width=150), replicas if ray else 0)
    except DeltafleetError as e:
        console.print(f"[red]error:[/red] {e}")
        raise typer.Exit(code=2) from None
