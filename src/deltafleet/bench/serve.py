"""`deltafleet bench serve`: load-test the HTTP server on loopback with mixed adapters.

1. Make `--adapters` random adapters for the base (LoRA r8, LoRA r16, RoAd; a load test needs no trained
   weights) in a temporary directory and start `deltafleet serve` on them as a subprocess.
2. Below the queue bound: `--clients` concurrent clients send `--requests` streaming chat requests in all,
   choosing the model (the base or an adapter) uniformly, then with Zipf popularity (weight 1/rank). Every
   request asks for exactly `--max-tokens` tokens (`ignore_eos`), so tokens/s compare across runs. Expected:
   zero errors.
3. Past the bound: `--bursts` bursts of `--burst` simultaneous requests against max_batch + max_queue places;
   the surplus gets HTTP 429 at once, the server stays up (/health) and its resident memory stays flat.
"""

from __future__ import annotations

import asyncio
import json
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
from dataclasses import asdict, dataclass, field
from pathlib import Path

from deltafleet.adapters import LoraConfig, RoadConfig, random_adapter, save_adapter
from deltafleet.models.config import ModelConfig
from deltafleet.models.loading import resolve_base

PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "List three prime numbers.",
    "Explain what a CPU does in one sentence.", "Translate 'good morning' into Spanish.",
    "What is 12 times 7?", "Name a famous painter.", "Give me a tip for learning to code.",
]


@dataclass
class Result:
    status: int
    latency: float
    ttft: float | None = None
    tokens: int = 0


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


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in [0, 100])."""
    if not values:
        return None
    s = sorted(values)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


def make_adapters(base: str, out: Path, n: int, seed: int = 0) -> list[str]:

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


async def one_request(client, url: str, model: str, prompt: str, max_tokens: int) -> Result:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    ttft, tokens = None, 0
    try:
        async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                await r.aread()
                return Result(r.status_code, time.perf_counter() - t0)
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return Result(599, time.perf_counter() - t0)
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                elif ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                    ttft = time.perf_counter() - t0
    except Exception:  # connection refused or reset: counted as an error, the benchmark goes on
        return Result(0, time.perf_counter() - t0)
    return Result(200, time.perf_counter() - t0, ttft, tokens)


def report(name: str, results: list[Result], seconds: float, models: Counter) -> PhaseReport:
    ok = [r for r in results if r.status == 200]
    errors = Counter(str(r.status) for r in results if r.status != 200)
    return PhaseReport(
        name=name, requests=len(results), ok=len(ok), errors=dict(errors), seconds=round(seconds, 2),
        requests_per_s=round(len(ok) / seconds, 3), output_tokens_per_s=round(sum(r.tokens for r in ok) / seconds, 1),
        latency_p50_s=percentile([r.latency for r in ok], 50), latency_p99_s=percentile([r.latency for r in ok], 99),
        ttft_p50_s=percentile([r.ttft for r in ok if r.ttft is not None], 50),
        ttft_p99_s=percentile([r.ttft for r in ok if r.ttft is not None], 99), models=dict(models),
    )


async def closed_loop(url: str, models: list[str], weights: list[float], clients: int, requests: int,
                      max_tokens: int, rng: random.Random) -> tuple[list[Result], float, Counter]:
    """`clients` workers, each sending its next request when the previous one ends, `requests` in all."""
    import httpx

    plan = [(rng.choices(models, weights)[0], rng.choice(PROMPTS)) for _ in range(requests)]
    queue: asyncio.Queue = asyncio.Queue()
    for item in plan:
        queue.put_nowait(item)
    results: list[Result] = []

    async def worker(client) -> None:
        while not queue.empty():
            model, prompt = queue.get_nowait()
            results.append(await one_request(client, url, model, prompt, max_tokens))

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0),
                                 limits=httpx.Limits(max_connections=clients)) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(clients)))
        elapsed = time.perf_counter() - t0
    return results, elapsed, Counter(m for m, _ in plan)


async def burst(url: str, models: list[str], n: int, max_tokens: int, rng: random.Random) -> tuple[list[Result], float]:
    import httpx

    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0),
                                 limits=httpx.Limits(max_connections=n)) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, rng.choice(models), rng.choice(PROMPTS),
                                                     max_tokens) for _ in range(n)))
        return list(results), time.perf_counter() - t0


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
              log=print) -> dict:
    import httpx
    import psutil

    rng = random.Random(seed)
    with tempfile.TemporaryDirectory(prefix="deltafleet-bench-") as tmp:
        adapters = make_adapters(base, Path(tmp), n_adapters, seed)
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
            models = ["base", *adapters]
            asyncio.run(closed_loop(url, models, [1.0] * len(models), min(clients, 4), min(4, requests), 4, rng))
            phases = []
            for name, weights in (("uniform", [1.0] * len(models)),
                                  ("zipf", [1.0 / (k + 1) for k in range(len(models))])):
                results, seconds, used = asyncio.run(closed_loop(url, models, weights, clients, requests, max_tokens,
                                                                 rng))
                phases.append(report(name, results, seconds, used))
                log(f"phase {name}: {phases[-1].ok}/{phases[-1].requests} ok in {seconds:.1f} s")
            rss = [server.memory_info().rss]
            overload = []
            for i in range(bursts):
                results, seconds = asyncio.run(burst(url, models, burst_size, max(2, max_tokens // 4), rng))
                rss.append(server.memory_info().rss)
                overload.append(report(f"burst {i + 1}", results, seconds, Counter()))
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
        "base": base, "dtype": dtype, "adapters": len(adapters), "clients": clients, "max_tokens": max_tokens,
        "max_batch": max_batch, "max_queue": max_queue, "cpu_count": os.cpu_count(),
        "phases": [asdict(p) for p in phases],
        "overload": {"burst": burst_size, "bursts": [asdict(p) for p in overload], "healthy_after": healthy,
                     "rss_mb": [round(r / 2**20, 1) for r in rss],
                     "rss_growth_mb": round((max(rss[1:]) - rss[0]) / 2**20, 1) if len(rss) > 1 else 0.0},
        "adapter_cache": {line.split()[0]: float(line.split()[1]) for line in metrics.splitlines()
                          if line.startswith("deltafleet_adapter_cache_")},
    }
