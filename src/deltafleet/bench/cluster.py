"""`deltafleet bench cluster`: the Ray Serve application (`deltafleet serve --ray`) measured on this machine.

1. Routing: for each policy (affinity, least_loaded, random) the application is deployed with `replicas` engine
   replicas of the base, each with `slots` LoRA slots, over `tenants` random LoRA r8 tenants (all seven
   projections); `requests` chat-free completions (Zipf-popular tenants, `clients` concurrent openai clients,
   `max_tokens` each, greedy) go through the ingress. Reported per policy: the slot-miss rate (adapter copies into
   a slot over adapter requests, from the replicas' counters), requests per replica, generated tokens/s, latency
   p50/p99.
2. Recovery (affinity): the same clients stream requests for `recovery_s` seconds; after a third of it the replica
   holding the most tenants is killed (SIGKILL, as a crash). Reported: requests answered and failed while it was
   down (lost: the requests that failed, all of them in flight on the killed replica), the seconds until Ray
   restarted it and it reported again, and until it held a tenant in a slot again (tenants return on demand).

Replicas share this machine's cores (threads split between them): the figures compare policies within one run;
they are not a multi-node measurement.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import openai

from deltafleet.adapters import LoraConfig, random_adapter, save_adapter
from deltafleet.bench.loadgen import percentile, zipf_choices
from deltafleet.bench.serve import free_port
from deltafleet.models.config import PROJECTIONS, ModelConfig
from deltafleet.models.loading import resolve_base
from deltafleet.serve.cluster.app import ClusterConfig
from deltafleet.serve.cluster.launch import reporting_replicas, start
from deltafleet.serve.cluster.replica import ClusterSpec


@dataclass(frozen=True)
class ClusterBenchConfig:
    base: str = "smollm2-135m"
    dtype: str = "float32"
    replicas: int = 2
    tenants: int = 24
    slots: int = 4
    requests: int = 96
    clients: int = 8
    max_tokens: int = 16
    zipf: float = 1.0
    policies: tuple[str, ...] = ("affinity", "least_loaded", "random")
    recovery_s: float = 30.0
    seed: int = 0


def make_tenants(base: str, root: Path, n: int) -> list[str]:
    cfg = ModelConfig.from_file(resolve_base(base) / "config.json")
    names = [f"tenant-{i:03d}" for i in range(n)]
    for i, name in enumerate(names):
        save_adapter(random_adapter(cfg, LoraConfig(r=8, alpha=16.0, targets=PROJECTIONS), seed=100 + i),
                     root / name, model_cfg=cfg)
    return names


async def _drive(url: str, tenants: list[str], clients: int, max_tokens: int, until=None) -> list[dict]:
    """Send `tenants` (one request each, in order) from `clients` workers; with `until` (a monotonic deadline),
    cycle through them until then. One record per request: tenant, start, end, ok, error, tokens."""
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
    queue = list(reversed(tenants))
    records: list[dict] = []

    async def worker(w: int):
        i = w
        while True:
            if until is None:
                if not queue:
                    return
                tenant = queue.pop()
            else:
                if time.monotonic() >= until:
                    return
                tenant = tenants[i % len(tenants)]
                i += clients
            t0 = time.monotonic()
            rec = {"tenant": tenant, "start": t0, "ok": False, "error": None, "tokens": 0}
            try:
                r = await client.completions.create(model=tenant, prompt=f"Request {i} for {tenant}:",
                                                    max_tokens=max_tokens, temperature=0,
                                                    extra_body={"ignore_eos": True})
                rec["ok"], rec["tokens"] = True, r.usage.completion_tokens
            except openai.APIError as e:
                rec["error"] = type(e).__name__
            rec["end"] = time.monotonic()
            records.append(rec)

    try:
        await asyncio.gather(*(worker(w) for w in range(clients)))
    finally:
        await client.close()
    return records


def _cache_totals(stats_by_replica: dict[str, dict]) -> dict[str, float]:
    hits = sum(s["adapter_cache"].get("hits", 0) for s in stats_by_replica.values())
    misses = sum(s["adapter_cache"].get("misses", 0) for s in stats_by_replica.values())
    return {"hits": hits, "misses": misses, "miss_rate": misses / max(hits + misses, 1)}


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 3)


def _summary(records: list[dict], wall: float) -> dict:
    ok = [r for r in records if r["ok"]]
    latencies = [r["end"] - r["start"] for r in ok]
    errors: dict[str, int] = {}
    for r in records:
        if not r["ok"]:
            errors[r["error"]] = errors.get(r["error"], 0) + 1
    return {"requests": len(records), "ok": len(ok), "errors": errors,
            "tokens_per_s": round(sum(r["tokens"] for r in ok) / wall, 2),
            "latency_p50_s": _round(percentile(latencies, 50)), "latency_p99_s": _round(percentile(latencies, 99))}


def _recovery(url: str, names: list[str], cfg: ClusterBenchConfig, rng: random.Random) -> dict:
    stream = zipf_choices(names, 4096, rng, cfg.zipf)
    before = reporting_replicas()
    victim = max(before, key=lambda r: (before[r].get("resident_adapters", 0), r))
    pid = before[victim]["pid"]
    t0 = time.monotonic()
    kill_at = t0 + cfg.recovery_s / 3
    marks: dict[str, float] = {}

    async def killer():
        await asyncio.sleep(kill_at - time.monotonic())
        os.kill(pid, signal.SIGKILL)
        marks["killed"] = time.monotonic()
        while time.monotonic() < t0 + cfg.recovery_s:
            await asyncio.sleep(0.25)
            now = await asyncio.to_thread(reporting_replicas)
            fresh = {r: s for r, s in now.items() if s.get("pid") != pid}
            if len(fresh) == cfg.replicas and "restarted" not in marks:
                marks["restarted"] = time.monotonic()
            new = [s for r, s in fresh.items() if s.get("pid") not in {b.get("pid") for b in before.values()}]
            if new and new[0].get("resident_adapters", 0) > 0:
                marks["resident_again"] = time.monotonic()
                return

    async def both():
        records, _ = await asyncio.gather(_drive(url, stream, cfg.clients, cfg.max_tokens,
                                                 until=t0 + cfg.recovery_s), killer())
        return records

    records = asyncio.run(both())
    killed = marks["killed"]
    down_until = marks.get("restarted", float("inf"))
    during = [r for r in records if r["start"] < down_until and r["end"] > killed]
    return {"killed_replica": victim, "kill_at_s": round(killed - t0, 2),
            "in_flight_anywhere_at_kill": sum(r["start"] < killed < r["end"] for r in records),
            "during_restart": {"ok": sum(r["ok"] for r in during), "failed": sum(not r["ok"] for r in during)},
            "lost": sum(not r["ok"] for r in records), "requests_total": len(records),
            "restart_s": round(marks["restarted"] - killed, 2) if "restarted" in marks else None,
            "resident_again_s": round(marks["resident_again"] - killed, 2) if "resident_again" in marks else None}


def run(cfg: ClusterBenchConfig, log=lambda _: None) -> dict:
    rng = random.Random(cfg.seed)
    report: dict = {"config": asdict(cfg), "policies": {}}
    with tempfile.TemporaryDirectory(prefix="deltafleet-cluster-") as tmp:
        root = Path(tmp)
        names = make_tenants(cfg.base, root, cfg.tenants)
        stream = zipf_choices(names, cfg.requests, rng, cfg.zipf)
        report["distinct_tenants_requested"] = len(set(stream))
        engine = dict(dtype=cfg.dtype, max_batch=8, max_model_len=512, lora_slots=cfg.slots, max_lora_rank=8,
                      delta_slots=0, road_slots=0, pafi_slots=0, hiwi_slots=0)
        spec = ClusterSpec(str(resolve_base(cfg.base)), str(root), None, tuple(engine.items()))
        for policy in cfg.policies:
            log(f"{policy}: deploying {cfg.replicas} replicas")
            launched = start(ClusterConfig(spec, replicas=cfg.replicas, policy=policy, stats_period_s=0.5),
                             port=free_port())
            try:
                log(f"{policy}: {cfg.requests} requests over {len(set(stream))} tenants, {cfg.clients} clients")
                t0 = time.perf_counter()
                records = asyncio.run(_drive(launched.url, stream, cfg.clients, cfg.max_tokens))
                wall = time.perf_counter() - t0
                time.sleep(1.2)  # one more report from every replica
                stats = reporting_replicas()
                row = _summary(records, wall) | _cache_totals(stats)
                row["requests_per_replica"] = {r: s["finished"] for r, s in sorted(stats.items())}
                report["policies"][policy] = row
                if policy == "affinity" and cfg.recovery_s > 0:
                    log(f"recovery: streaming {cfg.recovery_s:.0f} s, killing the busiest replica after a third")
                    report["recovery"] = _recovery(launched.url, names, cfg, rng)
            finally:
                launched.stop()
    policies = report["policies"]
    if "affinity" in policies:
        for row in policies.values():
            row["miss_rate_vs_affinity"] = round(row["miss_rate"] / max(policies["affinity"]["miss_rate"], 1e-9), 2)
    return report
