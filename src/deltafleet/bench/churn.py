"""`deltafleet bench churn`: tenants coming and going through the HTTP admin API while others stream.

One server in this process (the real app over the real engine, on loopback), with small budgets: `slots` LoRA
slots, no other pools, a host cache of `host_cache_mb`. Under the adapters root, `distinct` small random LoRA
directories (r=4 on q_proj and v_proj; the weights repeat every `distinct` cycles, the names never do).

- steady tenants: the base and `steady` adapters registered at start, `streams` clients streaming greedy chat
  requests to them the whole time;
- churn: `workers` clients, each repeating `POST /v1/adapters` (a new name), one chat request to it,
  `DELETE /v1/adapters/{name}`, `cycles` cycles in all.

Every request must end in 200 or a documented error (a 4xx with an OpenAI error body; 429 when the server is
full); any other outcome, a 5xx, or a request that runs past `timeout` is counted as a failure. At the end the
adapter listing is the start-up scan's again, the resident-slot gauge equals the listing's resident rows, and
RSS is compared with its value after warm-up.
"""

from __future__ import annotations

import asyncio
import os
import random
import tempfile
import time
from collections import Counter
from pathlib import Path

import httpx
import psutil

from deltafleet.adapters import LoraConfig, random_adapter, save_adapter
from deltafleet.models.config import ModelConfig
from deltafleet.models.loading import resolve_base
from deltafleet.serve.engine import EngineConfig
from deltafleet.serve.http.app import create_app
from deltafleet.serve.http.engine_gateway import EngineGateway
from deltafleet.serve.http.server import BackgroundServer

PROMPT = [{"role": "user", "content": "Name a colour."}]


def _chat(model: str, max_tokens: int, stream: bool) -> dict:
    return {"model": model, "messages": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": stream}


async def _stream(client: httpx.AsyncClient, model: str, max_tokens: int) -> str:
    async with client.stream("POST", "/v1/chat/completions", json=_chat(model, max_tokens, True)) as r:
        if r.status_code != 200:
            await r.aread()
            return str(r.status_code)
        async for line in r.aiter_lines():
            if line.startswith("data: {") and '"error"' in line:
                return "stream-error"
    return "200"


def _outcome(r: httpx.Response) -> str:
    if r.status_code < 400:
        return str(r.status_code)
    documented = r.status_code < 500 and isinstance(r.json().get("error"), dict)
    return str(r.status_code) if documented else f"{r.status_code}-undocumented"


def run(base: str = "smollm2-135m", dtype: str = "float32", cycles: int = 1000, workers: int = 4, streams: int = 2,
        steady: int = 2, slots: int = 2, distinct: int = 16, host_cache_mb: int = 8, max_tokens: int = 2,
        timeout: float = 120.0, log=lambda _: None) -> dict:
    rng = random.Random(0)
    cfg = ModelConfig.from_file(resolve_base(base) / "config.json")
    acfg = LoraConfig(r=4, alpha=8.0, targets=("q_proj", "v_proj"))
    proc = psutil.Process()
    with tempfile.TemporaryDirectory(prefix="deltafleet-churn-") as tmp:
        root = Path(tmp)
        for i in range(distinct):
            save_adapter(random_adapter(cfg, acfg, seed=i), root / f"pool-a{i}", model_cfg=cfg)
        for i in range(steady):
            save_adapter(random_adapter(cfg, acfg, seed=1000 + i), root / f"steady{i}", model_cfg=cfg)
        engine_cfg = EngineConfig(dtype=dtype, max_batch=8, max_model_len=256, lora_slots=slots, delta_slots=0,
                                  road_slots=0, max_lora_rank=4, host_cache_bytes=host_cache_mb << 20,
                                  max_queue=256)
        gateway = EngineGateway.from_pretrained(base, root, engine_cfg, "base")  # scans root: pool-a*, steady*
        scanned = sorted(gateway.engine.adapters.names())
        server = BackgroundServer(create_app(gateway), gateway).start()
        outcomes: Counter = Counter()
        steady_outcomes: Counter = Counter()
        hung = 0
        done = asyncio.Event()

        async def one(coro, tally: Counter) -> None:
            nonlocal hung
            try:
                tally[await asyncio.wait_for(coro, timeout)] += 1
            except TimeoutError:
                hung += 1
            except httpx.HTTPError as e:
                tally[f"transport:{type(e).__name__}"] += 1

        async def admin(client, method: str, url: str, **kw) -> str:
            return _outcome(await client.request(method, url, **kw))

        async def churn_worker(client, ids: list[int]) -> None:
            for c in ids:
                name = f"churn{c}"
                await one(admin(client, "POST", "/v1/adapters", json={"name": name, "path": f"pool-a{c % distinct}"}),
                          outcomes)
                await one(_stream(client, name, max_tokens), outcomes)
                await one(admin(client, "DELETE", f"/v1/adapters/{name}"), outcomes)

        async def steady_client(client) -> None:
            models = ["base", *(f"steady{i}" for i in range(steady))]
            while not done.is_set():
                await one(_stream(client, rng.choice(models), max_tokens), steady_outcomes)

        async def main() -> tuple[float, float, float]:
            async with httpx.AsyncClient(base_url=server.url, timeout=httpx.Timeout(timeout, connect=10.0)) as client:
                for i in range(steady):  # warm-up: every steady adapter resident once, then the baseline RSS
                    await _stream(client, f"steady{i}", max_tokens)
                await churn_worker(client, [-1 - i for i in range(min(slots + 1, 4))])
                rss0 = proc.memory_info().rss
                t0 = time.perf_counter()
                streamers = [asyncio.create_task(steady_client(client)) for _ in range(streams)]
                await asyncio.gather(*(churn_worker(client, list(range(w, cycles, workers))) for w in range(workers)))
                done.set()
                await asyncio.gather(*streamers)
                return rss0, time.perf_counter() - t0, proc.memory_info().rss

        try:
            log(f"{cycles} load-use-unload cycles by {workers} clients, {streams} steady streams, {slots} slots")
            rss0, seconds, rss1 = asyncio.run(main())
            listing = httpx.get(f"{server.url}/v1/adapters", timeout=10).json()["data"]
            metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
        finally:
            server.stop()
    gauge = next((float(line.split()[-1]) for line in metrics.splitlines()
                  if line.startswith("deltafleet_resident_adapters")), None)
    resident_rows = sum(1 for a in listing if a.get("state") == "resident")
    bad = {k: v for k, v in (outcomes + steady_outcomes).items() if not k.isdigit() or k.startswith("5")}
    return {
        "base": base, "dtype": dtype, "cycles": cycles, "workers": workers, "streams": streams, "slots": slots,
        "host_cache_mb": host_cache_mb, "distinct_weights": distinct, "seconds": round(seconds, 1),
        "cycles_per_s": round(cycles / seconds, 2), "churn_outcomes": dict(outcomes),
        "steady_outcomes": dict(steady_outcomes), "failures": bad, "hung": hung,
        "adapters_listed_after": len(listing), "adapters_scanned_at_start": len(scanned),
        "listing_equals_start": sorted(a["id"] for a in listing) == scanned, "resident_gauge_after": gauge,
        "resident_rows_after": resident_rows, "rss_start_mb": round(rss0 / 2**20, 1),
        "rss_end_mb": round(rss1 / 2**20, 1), "rss_growth_mb": round((rss1 - rss0) / 2**20, 1),
        "cpu_count": os.cpu_count(),
    }
