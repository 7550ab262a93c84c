"""`deltafleet bench serve`: load-test the HTTP server on loopback with mixed adapters.

1. Make random adapters for the base (LoRA r8, LoRA r16, RoAd in turn; a load test needs no trained weights) in
   a temporary directory and start `deltafleet serve` on them as a subprocess.
2. Closed loop, below the queue bound: `--clients` concurrent clients send `--requests` streaming chat requests
   in all, choosing the model (the base or one of `--adapters` adapters) uniformly, then with Zipf popularity
   (weight 1/rank). Every request asks for exactly `--max-tokens` tokens (`ignore_eos`), so tokens/s compare
   across runs. Expected: zero errors.
3. Open loop, per `--rate`: requests arrive as a Poisson process of that rate (`--requests` of them, or all
   those of `--duration` seconds) and are sent at their arrival times whatever has been answered; the model is
   drawn with Zipf popularity over the base and `--tenants` adapters. Errors are counted by status; goodput
   counts the requests that met the SLO (`loadgen.Slo`).
4. Past the bound: `--bursts` bursts of `--burst` simultaneous requests against max_batch + max_queue places;
   the surplus gets HTTP 429 at once, the server stays up (/health) and its resident memory stays flat.

The client is `loadgen.stream_chat` (raw HTTP/1.1 + SSE over asyncio, JSON parsed only where a figure needs it);
each phase reports the CPU seconds of this process (the client) and of the server, so a reader can see which one
was busy.
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deltafleet.adapters import LoraConfig, RoadConfig, random_adapter, save_adapter
from deltafleet.bench.loadgen import (
    Result,
    Slo,
    chat_request,
    closed_loop,
    gaps,
    open_loop,
    percentile,
    poisson_arrivals,
    status_label,
    stream_chat,
    zipf_weights,
)
from deltafleet.models.config import ModelConfig
from deltafleet.models.loading import resolve_base

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain what a CPU does in one sentence.", "Translate 'good morning' into Spanish.",
    "What is 12 times 7?", "Name a famous painter.", "Give me a tip for learning to code.",
]
CLIENT = ("raw HTTP/1.1 + SSE over asyncio, one connection per request; JSON parsed only up to the first content "
          "chunk, for the usage chunk and for errors")


@dataclass(frozen=True)
class OpenLoopConfig:
    """Open-loop phases: one per rate (requests/s), Poisson arrivals, Zipf (exponent zipf_s) over the base and
    `tenants` adapters; each phase sends `requests` requests, or, with `duration`, those arriving in that many s."""

    rates: tuple[float, ...]
    requests: int = 64
    duration: float | None = None
    tenants: int = 8
    zipf_s: float = 1.0

    def __post_init__(self) -> None:
        if not self.rates or not all(r > 0 and math.isfinite(r) for r in self.rates):
            raise ValueError(f"OpenLoopConfig.rates={self.rates}: need one or more positive, finite requests/s")
        if self.requests < 1:
            raise ValueError(f"OpenLoopConfig.requests={self.requests}: must be >= 1")
        if self.duration is not None and not self.duration > 0:
            raise ValueError(f"OpenLoopConfig.duration={self.duration}: must be > 0 seconds (or None)")
        if self.tenants < 1:
            raise ValueError(f"OpenLoopConfig.tenants={self.tenants}: must be >= 1")
        if self.zipf_s < 0:
            raise ValueError(f"OpenLoopConfig.zipf_s={self.zipf_s}: must be >= 0")


@dataclass
class PhaseReport:
    name: str
    requests: int
    ok: int
    errors: dict[str, int]
    seconds: float
    requests_per_s: float
    output_tokens_per_s: float
    latency_p50_s: float | None
    latency_p99_s: float | None
    ttft_p50_s: float | None
    ttft_p99_s: float | None
    models: dict[str, int] = field(default_factory=dict)
    itl_p50_s: float | None = None  # over every inter-chunk gap of every successful request
    itl_p99_s: float | None = None
    slo_met: int = 0
    goodput_rps: float = 0.0  # requests meeting the SLO per second of the phase
    client_cpu_s: float | None = None  # CPU time of this process (the client) during the phase
    server_cpu_s: float | None = None
    offered_rps: float | None = None  # open loop: arrivals / the span they were drawn over
    send_lag_p99_s: float | None = None  # open loop: how late after its arrival time a request was sent


def make_adapters(base: str, out: Path, n: int, seed: int = 0) -> list[str]:
    """`n` random adapters for `base` under `out`, named tenant{i}-{kind}: LoRA r8 (all seven projections),
    LoRA r16 (q/v/o), RoAd road_1, in turn."""
    cfg = ModelConfig.from_file(resolve_base(base) / "config.json")
    all7 = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    kinds = [("lora-r8", LoraConfig(r=8, alpha=16.0, targets=all7)),
             ("lora-r16", LoraConfig(r=16, alpha=32.0, targets=("q_proj", "v_proj", "o_proj"))),
             ("road", RoadConfig(variant="road_1", group_size=64, targets=all7))]
    names = []
    for i in range(n):
        label, acfg = kinds[i % len(kinds)]
        name = f"tenant{i}-{label}"
        save_adapter(random_adapter(cfg, acfg, seed=seed + i), out / name, model_cfg=cfg)
        names.append(name)
    return names


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def report(name: str, results: list[Result], seconds: float, models: Counter, slo: Slo = Slo(), *,
           client_cpu_s: float | None = None, server_cpu_s: float | None = None, offered_rps: float | None = None,
           lags: Sequence[float] = ()) -> PhaseReport:
    """The figures of one phase from its requests as the client saw them."""
    ok = [r for r in results if r.status == 200]
    errors = Counter(status_label(r.status) for r in results if r.status != 200)
    seconds = max(seconds, 1e-9)
    ttfts = [r.ttft for r in ok if r.ttft is not None]
    itls = [g for r in ok for g in gaps(r.chunks)]
    met = sum(slo.met(r) for r in results)

    def cpu(v):
        return None if v is None else round(v, 2)

    return PhaseReport(
        name=name, requests=len(results), ok=len(ok), errors=dict(errors), seconds=round(seconds, 2),
        requests_per_s=round(len(ok) / seconds, 3), output_tokens_per_s=round(sum(r.tokens for r in ok) / seconds, 1),
        latency_p50_s=percentile([r.latency for r in ok], 50), latency_p99_s=percentile([r.latency for r in ok], 99),
        ttft_p50_s=percentile(ttfts, 50), ttft_p99_s=percentile(ttfts, 99), models=dict(models),
        itl_p50_s=percentile(itls, 50), itl_p99_s=percentile(itls, 99), slo_met=met,
        goodput_rps=round(met / seconds, 3), client_cpu_s=cpu(client_cpu_s), server_cpu_s=cpu(server_cpu_s),
        offered_rps=None if offered_rps is None else round(offered_rps, 3), send_lag_p99_s=percentile(lags, 99),
    )


def chat_body(model: str, prompt: str, max_tokens: int) -> dict:
    """A streaming chat request for exactly `max_tokens` tokens, ending with a usage chunk."""
    return {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


class Target:
    """The server under test: builds request bytes for a model and sends them with the light client."""

    def __init__(self, host: str, port: int, max_tokens: int, rng: random.Random, timeout: float = 600.0):
        self.host, self.port, self.max_tokens, self.rng, self.timeout = host, port, max_tokens, rng, timeout

    def plan(self, models: Sequence[str], max_tokens: int | None = None) -> list[bytes]:
        """One request per entry of `models`, each with a random prompt, encoded before the phase starts."""
        n = self.max_tokens if max_tokens is None else max_tokens
        return [chat_request(self.host, self.port, chat_body(m, self.rng.choice(PROMPTS), n)) for m in models]

    async def send(self, request: bytes) -> Result:
        return await stream_chat(self.host, self.port, request, self.timeout)


def measured(run: Callable[[], object],
             server_cpu: Callable[[], float] | None = None) -> tuple[object, float, float | None]:
    """`run()` (an asyncio entry point) -> (its value, CPU s of this process (the client), CPU s of the server
    (None without `server_cpu`, its cumulative CPU s)) spent while it ran."""
    c0, s0 = time.process_time(), server_cpu() if server_cpu else 0.0
    value = asyncio.run(run())
    return value, time.process_time() - c0, server_cpu() - s0 if server_cpu else None


def run_open_loop(target: Target, models: list[str], cfg: OpenLoopConfig, slo: Slo,
                  server_cpu: Callable[[], float] | None = None, log=print) -> list[PhaseReport]:
    """One open-loop phase per rate of `cfg` against `target`; models[0] is the most popular."""
    weights = zipf_weights(len(models), cfg.zipf_s)
    phases = []
    for rate in cfg.rates:
        if cfg.duration is None:
            arrivals = poisson_arrivals(rate, target.rng, count=cfg.requests)
        else:
            arrivals = poisson_arrivals(rate, target.rng, duration=cfg.duration)
        span = cfg.duration if cfg.duration is not None else (arrivals[-1] if arrivals else 0.0)
        chosen = target.rng.choices(models, weights, k=len(arrivals))
        plan = target.plan(chosen)
        (results, seconds, lags), client_cpu, server_cpu_s = measured(
            lambda a=arrivals, p=plan: open_loop(target.send, a, p), server_cpu)
        phases.append(report(f"rate {rate:g}/s", results, seconds, Counter(chosen), slo, client_cpu_s=client_cpu,
                             server_cpu_s=server_cpu_s, offered_rps=len(arrivals) / span if span else 0.0,
                             lags=lags))
        p = phases[-1]
        log(f"open loop {rate:g}/s: {p.ok}/{p.requests} ok, {p.slo_met} met the SLO, in {seconds:.1f} s "
            f"(client CPU {client_cpu:.2f} s)")
    return phases


def wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 600.0) -> None:
    import httpx

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode} before becoming healthy")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server at {url} did not become healthy in {timeout:.0f} s")


def run_bench(base: str, dtype: str, n_adapters: int, clients: int, requests: int, max_tokens: int,
              max_batch: int, max_queue: int, burst_size: int, bursts: int, seed: int,
              log=print, open_cfg: OpenLoopConfig | None = None, slo: Slo = Slo()) -> dict:
    """Serve `n_adapters` random adapters (max(n_adapters, open_cfg.tenants) with open-loop phases) from a
    subprocess and run the closed-loop phases, the open-loop phases of `open_cfg`, then the bursts."""
    import httpx
    import psutil

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="deltafleet-bench-") as tmp:
        adapters = make_adapters(base, Path(tmp), max(n_adapters, open_cfg.tenants if open_cfg else 0), seed)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        cmd = [sys.executable, "-m", "deltafleet.cli", "serve", "--base", base, "--adapters", tmp, "--port", str(port),
               "--dtype", dtype, "--max-batch", str(max_batch), "--max-queue", str(max_queue),
               "--max-model-len", "512", "--log-level", "warning", "--model-name", "base"]
        env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            t0 = time.perf_counter()
            wait_healthy(url, proc)
            log(f"server up in {time.perf_counter() - t0:.1f} s: {base} ({dtype}), {len(adapters)} adapters, "
                f"max_batch {max_batch}, max_queue {max_queue}")
            server = psutil.Process(proc.pid)

            def server_cpu() -> float:
                t = server.cpu_times()
                return t.user + t.system

            target = Target("127.0.0.1", port, max_tokens, rng)
            models = ["base", *adapters[:n_adapters]]
            warm = target.plan(rng.choices(models, k=min(4, requests)), 4)
            asyncio.run(closed_loop(target.send, warm, min(clients, 4)))
            phases = []
            for name, weights in (("uniform", [1.0] * len(models)),
                                  ("zipf", zipf_weights(len(models)))):
                chosen = rng.choices(models, weights, k=requests)
                plan = target.plan(chosen)
                (results, seconds), client_cpu, server_cpu_s = measured(
                    lambda p=plan: closed_loop(target.send, p, clients), server_cpu)
                phases.append(report(name, results, seconds, Counter(chosen), slo, client_cpu_s=client_cpu,
                                     server_cpu_s=server_cpu_s))
                log(f"phase {name}: {phases[-1].ok}/{phases[-1].requests} ok in {seconds:.1f} s "
                    f"(client CPU {client_cpu:.2f} s)")
            opened = [] if open_cfg is None else run_open_loop(
                target, ["base", *adapters[:open_cfg.tenants]], open_cfg, slo, server_cpu, log)
            rss = [server.memory_info().rss]
            overload = []
            for i in range(bursts):
                plan = target.plan(rng.choices(models, k=burst_size), max(2, max_tokens // 4))
                (results, seconds), client_cpu, server_cpu_s = measured(
                    lambda p=plan: closed_loop(target.send, p, len(p)), server_cpu)
                rss.append(server.memory_info().rss)
                overload.append(report(f"burst {i + 1}", results, seconds, Counter(), slo, client_cpu_s=client_cpu,
                                       server_cpu_s=server_cpu_s))
                log(f"burst {i + 1}: {overload[-1].ok} ok, errors {overload[-1].errors}")
            healthy = httpx.get(f"{url}/health", timeout=5).status_code == 200
            metrics = httpx.get(f"{url}/metrics", timeout=5).text
        finally:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
    return {
        "base": base, "dtype": dtype, "adapters": n_adapters, "clients": clients, "max_tokens": max_tokens,
        "max_batch": max_batch, "max_queue": max_queue, "cpu_count": os.cpu_count(), "client": CLIENT,
        "slo": {"ttft_s": slo.ttft_s, "itl_s": slo.itl_s, "itl": "per-request mean inter-chunk gap"},
        "phases": [asdict(p) for p in phases],
        "open_loop": None if open_cfg is None else {
            "tenants": open_cfg.tenants, "zipf_s": open_cfg.zipf_s, "requests": open_cfg.requests,
            "duration_s": open_cfg.duration, "rates": list(open_cfg.rates), "phases": [asdict(p) for p in opened]},
        "overload": {"burst": burst_size, "bursts": [asdict(p) for p in overload], "healthy_after": healthy,
                     "rss_mb": [round(r / 2**20, 1) for r in rss],
                     "rss_growth_mb": round((max(rss[1:]) - rss[0]) / 2**20, 1) if len(rss) > 1 else 0.0},
        "adapter_cache": {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                          if line.startswith("deltafleet_adapter_cache_")},
    }
