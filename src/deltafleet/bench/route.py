"""`deltafleet bench route`: a discrete-event simulation of routing many tenants over many replicas of the base
(no Ray, no model): slot-miss rate, load imbalance and the latency tail that misses cause, for each policy of
`serve.routing.ROUTERS`.

Model. `tenants` tenants with Zipf popularity (exponent `zipf`: tenant k is requested with weight 1 / k^zipf);
requests arrive as one Poisson stream at `utilization` of the fleet's capacity (replicas x `batch` seats /
`service_s`). Each of `replicas` replicas runs at most `batch` requests at once (the engine's running batch; more
wait in its FIFO queue) and holds `slots` resident tenants (LRU; a tenant with a running request is never evicted;
`slots >= batch`, so a seat always finds an evictable slot). A request whose tenant is not resident on its replica
when it starts is a miss: it first waits `cold_load_s` (disk -> host -> slot) while holding its seat, then runs
`service_s`. A policy sees, at arrival, each replica's resident-or-queued tenants, free slots and load
(`serve.routing.ReplicaView`).

Figures per (policy, replica count), leaving out the first `warmup` of the requests (they fill an empty fleet): miss
rate (misses / requests), imbalance (the busiest replica's request count
over the mean), latency p50 / p99 / p99.9 (arrival to finish) and mean queue wait.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import random
import statistics
from collections import OrderedDict, deque
from dataclasses import asdict, dataclass, field
from typing import Any

from deltafleet.serve.routing import ROUTERS, ReplicaView


@dataclass(frozen=True)
class RouteConfig:
    tenants: int = 10_000
    zipf: float = 1.0
    replicas: tuple[int, ...] = (4, 8, 16, 32, 64)
    slots: int = 32
    batch: int = 32
    requests_per_replica: int = 2_000
    utilization: float = 0.7
    service_s: float = 2.0
    cold_load_s: float = 0.05
    spill: int = 16
    policies: tuple[str, ...] = ("random", "least_loaded", "affinity")
    warmup: float = 0.2
    seed: int = 0

    def __post_init__(self) -> None:
        if self.slots < self.batch:
            raise ValueError(f"slots={self.slots} < batch={self.batch}: a replica must hold its whole batch's tenants")
        if not 0 <= self.warmup < 1:
            raise ValueError(f"warmup={self.warmup}: the fraction of requests left out must be in [0, 1)")
        if not 0 < self.utilization < 1:
            raise ValueError(f"utilization={self.utilization}: must be in (0, 1)")
        for name in ("tenants", "slots", "batch", "requests_per_replica", "spill"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not self.replicas or min(self.replicas) < 1:
            raise ValueError(f"replicas={self.replicas}: must be one or more counts >= 1")
        unknown = [p for p in self.policies if p not in ROUTERS]
        if unknown:
            raise ValueError(f"policies: unknown {unknown}; known {sorted(ROUTERS)}")


@dataclass
class _Replica:
    slots: int
    resident: OrderedDict = field(default_factory=OrderedDict)  # tenant -> running count, LRU order
    queue: deque = field(default_factory=deque)  # (arrival, tenant, request index)
    queued: dict = field(default_factory=dict)  # tenant -> waiting count
    running: int = 0
    served: int = 0

    def view(self, tenant: int) -> ReplicaView:
        holds = tenant in self.resident or tenant in self.queued
        return ReplicaView(holds, self.slots - len(self.resident), self.running + len(self.queue))

    def admit(self, tenant: int) -> bool:
        """Make `tenant` resident for a starting request; True on a miss (it had to be loaded)."""
        miss = tenant not in self.resident
        if miss:
            if len(self.resident) >= self.slots:
                victim = next(t for t, n in self.resident.items() if n == 0)  # LRU among the idle
                del self.resident[victim]
            self.resident[tenant] = 0
        self.resident[tenant] += 1
        self.resident.move_to_end(tenant)
        return miss


def zipf_cdf(n: int, s: float) -> list[float]:
    weights = [1.0 / (k + 1) ** s for k in range(n)]
    total = sum(weights)
    return list(itertools.accumulate(w / total for w in weights))


def simulate(cfg: RouteConfig, policy: str, replicas: int) -> dict[str, Any]:
    """One run of the model above; returns its figures."""
    rng = random.Random(f"{cfg.seed}-{replicas}")  # the same arrivals and tenants for every policy
    route_rng = random.Random(cfg.seed + 1)
    router = ROUTERS[policy]
    cdf = zipf_cdf(cfg.tenants, cfg.zipf)
    fleet = [_Replica(cfg.slots) for _ in range(replicas)]
    rate = cfg.utilization * replicas * cfg.batch / cfg.service_s
    n_requests = cfg.requests_per_replica * replicas
    events: list[tuple[float, int, int, int]] = []  # (time, order, kind 0 = arrival / 1 = finish, replica)
    order = itertools.count()
    t = 0.0
    arrivals = []
    for _ in range(n_requests):
        t += rng.expovariate(rate)
        arrivals.append((t, min(bisect.bisect_left(cdf, rng.random()), cfg.tenants - 1)))
    for i, (at, _) in enumerate(arrivals):
        heapq.heappush(events, (at, next(order), 0, i))
    finishing: dict[int, tuple[int, int, float, int]] = {}  # event order -> (replica, tenant, arrival, index)
    latencies, waits, misses = [], [], 0
    first = int(cfg.warmup * n_requests)  # requests before this index fill the empty fleet: not counted

    def start(r: int, now: float) -> None:
        nonlocal misses
        rep = fleet[r]
        while rep.queue and rep.running < cfg.batch:
            arrived, tenant, idx = rep.queue.popleft()
            rep.queued[tenant] -= 1
            if not rep.queued[tenant]:
                del rep.queued[tenant]
            miss = rep.admit(tenant)
            rep.running += 1
            if idx >= first:
                misses += miss
                waits.append(now - arrived)
            end = now + cfg.service_s + (cfg.cold_load_s if miss else 0.0)
            key = next(order)
            finishing[key] = (r, tenant, arrived, idx)
            heapq.heappush(events, (end, key, 1, r))

    while events:
        now, key, kind, ref = heapq.heappop(events)
        if kind == 0:
            arrived, tenant = arrivals[ref]
            r = router([rep.view(tenant) for rep in fleet], route_rng, cfg.spill)
            rep = fleet[r]
            rep.queue.append((arrived, tenant, ref))
            rep.queued[tenant] = rep.queued.get(tenant, 0) + 1
            rep.served += 1
            start(r, now)
        else:
            r, tenant, arrived, idx = finishing.pop(key)
            rep = fleet[r]
            rep.running -= 1
            rep.resident[tenant] -= 1
            if idx >= first:
                latencies.append(now - arrived)
            start(r, now)
    latencies.sort()

    def pct(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))]

    served = [rep.served for rep in fleet]
    return {"policy": policy, "replicas": replicas, "requests": n_requests, "counted": n_requests - first,
            "miss_rate": misses / (n_requests - first),
            "imbalance": max(served) / statistics.mean(served), "latency_p50_s": pct(0.5),
            "latency_p99_s": pct(0.99), "latency_p999_s": pct(0.999), "mean_wait_s": statistics.mean(waits),
            "distinct_resident": sum(len(rep.resident) for rep in fleet)}


def measure_cold_load(base: str = "smollm2-135m", repeats: int = 20) -> dict[str, float]:
    """Seconds to make one LoRA r16 tenant (all seven projections) of `base` ready from its files: read and validate
    it (`adapters.load_adapter`) and copy it into slot-shaped bf16 buffers, as the engine does on a miss; p50 and
    p99 over `repeats` loads (the files are in the page cache after the first)."""
    import tempfile
    import time
    from pathlib import Path

    import torch

    from deltafleet.adapters import LoraConfig, load_adapter, random_adapter, save_adapter
    from deltafleet.models.config import PROJECTIONS, ModelConfig
    from deltafleet.models.loading import resolve_base

    cfg = ModelConfig.from_file(resolve_base(base) / "config.json")
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        save_adapter(random_adapter(cfg, LoraConfig(r=16, alpha=16.0, targets=PROJECTIONS), seed=0), tmp,
                     model_cfg=cfg)
        for _ in range(repeats):
            t0 = time.perf_counter()
            a = load_adapter(Path(tmp), cfg)
            for params in a.params.values():
                for t in params.values():
                    torch.empty(t.shape, dtype=torch.bfloat16).copy_(t)
            times.append(time.perf_counter() - t0)
    times.sort()
    return {"p50_s": times[len(times) // 2], "p99_s": times[min(len(times) - 1, int(0.99 * len(times)))],
            "repeats": repeats}


def run(cfg: RouteConfig, progress=lambda msg: None) -> dict[str, Any]:
    rows = []
    for replicas in cfg.replicas:
        for policy in cfg.policies:
            progress(f"{policy} x {replicas} replicas")
            rows.append(simulate(cfg, policy, replicas))
    return {"config": asdict(cfg), "rows": rows}


def plot(report: dict[str, Any], path) -> None:
    """Miss rate, p99 latency and imbalance against the replica count, one line per policy."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cfg = report["config"]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for ax, key, title in zip(axes, ("miss_rate", "latency_p99_s", "imbalance"),
                              ("slot-miss rate", "latency p99 (s)", "busiest replica / mean"), strict=True):
        for policy in cfg["policies"]:
            rows = [r for r in report["rows"] if r["policy"] == policy]
            ax.plot([r["replicas"] for r in rows], [r[key] for r in rows], marker="o", label=policy)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("replicas")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{cfg['tenants']} tenants, Zipf {cfg['zipf']}, {cfg['slots']} slots and {cfg['batch']} seats per "
                 f"replica, utilization {cfg['utilization']}, cold load {cfg['cold_load_s'] * 1e3:.0f} ms", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
