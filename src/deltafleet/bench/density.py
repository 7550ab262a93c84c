"""`deltafleet bench density`: how many tenants one machine holds, and what serving them costs.

Tenants of three kinds in equal thirds, written to disk once: LoRA r16 on all seven projections (bf16, peft format),
RoAd (`road_1`, group 64, all seven projections) and compressed whole fine-tunes at 1/64 (`ft`: Delta-CoMe's
`qlowrank` kind with the band plan `compress` uses at 1/64 over the whole delta, i.e. the projections and the
embedding / LM-head table, plus exact fp16 gain deltas for all RMSNorms; random codes and scales). Weights are
random draws of each kind's own initialiser (non-trivial), so every tenant's bytes are real and distinct.

For each N (e.g. 100 and 1000) and tier (`TIERS`) one engine registers the first N tenants (disk tier), keeps loaded
ones in its host cache (LRU, `host_cache_gb`; with `preloaded`, every tenant is read into it before the stream,
`AdapterManager.preload`) and copies the tenants a step needs into slots (32 per kind). A stream of `requests` requests
with Zipf(`zipf`)-popular tenants runs with batch 32 (a request whose tenant is not in host memory waits while the
loader thread reads it (prefetch starts at submission), the running batch goes on), alternated with the same stream on
the base alone, `rounds` times (tenants first in even rounds, the base first in odd ones); 32 closed-loop clients (each
sends its next request when its last one ends) keep the batch full.

Reported per N: bytes per tenant of each kind (on disk and in host memory), slot-miss rate, host-cache misses, the
time from a request for a tenant not in host memory to the tenant being there (`to_host`, p50/p99: the read,
queueing behind other loads included) and of the copy into a slot (`to_slot`; `cold_load_p99_s` is the sum of the
two p99s), decode throughput with tenants over the base's (paired rounds), and the process's peak RSS.
"""

from __future__ import annotations

import random
import resource
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch

from deltafleet.adapters import LoraConfig, RoadConfig, random_adapter, save_adapter
from deltafleet.adapters.adapter import Adapter
from deltafleet.adapters.qlowrank import QLowRankConfig
from deltafleet.adapters.qlowrank.config import shape_key
from deltafleet.bench.loadgen import percentile, zipf_choices
from deltafleet.compress.budget import module_budgets, plan_ranks, resolve_plan
from deltafleet.errors import DeltafleetError
from deltafleet.models.config import GAIN_NORMS, PROJECTIONS, TABLES, ModelConfig
from deltafleet.models.loading import load_model, load_tokenizer, resolve_base
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams

KINDS = ("lora", "road", "ft")


@dataclass(frozen=True)
class DensityConfig:
    base: str = "smollm2-135m"
    dtype: str = "bfloat16"
    tenants: tuple[int, ...] = (100, 1000)
    batch: int = 32
    slots: int = 32  # per kind
    requests: int = 256
    prompt_len: int = 16
    max_tokens: int = 16
    zipf: float = 1.0
    rounds: int = 2
    ratio: float = 1 / 64
    host_cache_gb: float = 8.0
    loader_threads: int = 1
    tiers: tuple[str, ...] = ("preloaded", "disk")
    seed: int = 0

    def __post_init__(self) -> None:
        bad = [t for t in self.tiers if t not in TIERS]
        if not self.tiers or bad:
            raise ValueError(f"tiers={self.tiers!r}: each must be one of {TIERS}")


TIERS = ("preloaded", "disk")
"""Where a tenant is when the stream starts: `preloaded` (every tenant read into host memory first, as S-LoRA keeps
all adapters in main memory; a request then waits only for its slot copy) or `disk` (read when first requested)."""


def kind_configs(cfg: ModelConfig, ratio: float) -> dict[str, object]:
    """Each kind's config; `ft`'s band plan fills the whole-delta budgets `compress` gives at `ratio`."""
    keys = [k for k in cfg.module_keys() if k[1] in (*PROJECTIONS, *TABLES)]
    gains = sum(2 * cfg.hidden_size for k in cfg.module_keys() if k[1] in GAIN_NORMS)
    budgets = module_budgets({k: cfg.module_shape(k[1]) for k in keys}, {k for k in keys if k[1] in TABLES}, gains,
                             ratio)
    shapes = {cfg.module_shape(k[1]): b for k, b in budgets.items()}
    bands = tuple((shape_key(o, i), plan_ranks(o, i, b, resolve_plan("auto", ratio), 128, "out"))
                  for (o, i), b in sorted(shapes.items()))
    return {"lora": LoraConfig(r=16, alpha=16.0, targets=PROJECTIONS),
            "road": RoadConfig(variant="road_1", group_size=64, targets=PROJECTIONS),
            "ft": QLowRankConfig(targets=PROJECTIONS, bands=bands, group_size=128, u_groups="out")}


def tenant_names(n: int) -> list[tuple[str, str]]:
    """(name, kind) of tenants 0..n-1: kinds in turn, so any prefix holds equal thirds."""
    return [(f"{KINDS[i % 3]}-{i:04d}", KINDS[i % 3]) for i in range(n)]


def write_tenants(base: str, root: Path, n: int, ratio: float, log=lambda _: None) -> list[tuple[str, str]]:
    """Write the tenants missing under `root` (kept between runs); returns (name, kind) of all n."""
    path = resolve_base(base)
    cfg = ModelConfig.from_file(path / "config.json")
    configs = kind_configs(cfg, ratio)
    names = tenant_names(n)
    todo = [(i, name, kind) for i, (name, kind) in enumerate(names) if not (root / name).is_dir()]
    for j, (i, name, kind) in enumerate(todo):
        a = random_adapter(cfg, configs[kind], seed=10_000 + i, whole=kind == "ft")
        if kind == "lora":  # peft's usual storage dtype for a bf16 base
            a = Adapter(a.config, {k: {p: t.to(torch.bfloat16) for p, t in ps.items()} for k, ps in a.params.items()})
        save_adapter(a, root / name, model_cfg=cfg)
        if j % 100 == 0:
            log(f"writing tenants: {j}/{len(todo)}")
    return names


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def _q(xs, q: float) -> float | None:
    """The q-th percentile (nearest rank) in seconds, 4 decimals; None without values."""
    p = percentile(list(xs), q)
    return None if p is None else round(p, 4)


def _stream(names: list[str], cfg: DensityConfig, rng: random.Random, vocab: int) -> list[Request]:
    rng.shuffle(names)  # popularity independent of kind
    chosen = zipf_choices(names, cfg.requests, rng, cfg.zipf)
    params = SamplingParams(max_tokens=cfg.max_tokens, ignore_eos=True)
    return [Request([rng.randrange(3, vocab) for _ in range(cfg.prompt_len)], params, adapter=a) for a in chosen]


def _run(engine: Engine, requests: list[Request], base: bool, clients: int) -> tuple[float, int, list[float]]:
    """`clients` closed-loop clients over the stream (each sends its next request when its last one ends), on a
    started engine: (decode tokens/s over the wall time, failed requests, time to first token of each request)."""
    todo = [Request(r.prompt_ids, r.params, adapter=None if base else r.adapter) for r in reversed(requests)]
    inflight, tokens, failed, ttfts = [], 0, 0, []
    t0 = time.perf_counter()
    while todo or inflight:
        while todo and len(inflight) < clients:
            inflight.append(engine.submit(todo.pop()))
        time.sleep(0.01)  # (each poll holds the GIL the engine loop and the loader need)
        for h in [h for h in inflight if h.done.is_set()]:
            inflight.remove(h)
            out = h.result
            tokens += len(out.token_ids)
            failed += out.error is not None
            ttfts.append(out.time_to_first_token)
    return tokens / (time.perf_counter() - t0), failed, ttfts


def measure(cfg: DensityConfig, root: Path, n: int, tier: str = "disk", log=lambda _: None) -> dict:
    model, path = load_model(cfg.base, dtype=getattr(torch, cfg.dtype))
    ft = kind_configs(model.config, cfg.ratio)["ft"]
    rows = max(sum(r for _, r in ft.ranks(*model.config.linear_shape(p))) for p in PROJECTIONS)
    ecfg = EngineConfig(dtype=cfg.dtype, max_batch=cfg.batch, max_model_len=cfg.prompt_len + cfg.max_tokens + 8,
                        lora_slots=cfg.slots, max_lora_rank=16, road_slots=cfg.slots, delta_slots=0,
                        qdelta_slots=cfg.slots, max_delta_rank=rows,
                        pafi_slots=0, hiwi_slots=0, host_cache_bytes=int(cfg.host_cache_gb * 2**30),
                        loader_threads=cfg.loader_threads)
    try:
        tokenizer = load_tokenizer(path)
    except DeltafleetError:  # a checkpoint without tokenizer files: token ids only, as the engine allows
        tokenizer = None
    engine = Engine.spawn(lambda: Engine(model, tokenizer, ecfg))  # stepped on its own thread
    names = tenant_names(n)
    t0 = time.perf_counter()
    for name, _ in names:  # registered only (the disk tier), as a server's --adapters scan does
        engine.adapters.add(name, root / name)
    register_s = time.perf_counter() - t0
    preload_s = None
    if tier == "preloaded":
        log(f"N={n}: preloading the tenants into host memory")
        t0 = time.perf_counter()
        engine.adapters.preload([name for name, _ in names])
        while engine.adapters.preloading:
            time.sleep(0.05)
        preload_s = round(time.perf_counter() - t0, 2)
    rng = random.Random(cfg.seed + n)
    vocab = model.config.vocab_size
    stream = _stream([name for name, _ in names], cfg, rng, vocab)
    _run(engine, stream[: cfg.batch], True, cfg.batch)  # warm-up: allocators, oneDNN primitives
    _run(engine, [Request(stream[0].prompt_ids, stream[0].params, adapter=name) for name, _ in names[:3]], False,
         cfg.batch)  # the pools' first writes
    before = dict(engine.stats()["adapter_cache"])
    engine.adapters.timings.to_host.clear()
    engine.adapters.timings.to_slot.clear()
    pairs, with_t, base_t, failed, ttft_with, ttft_base = [], [], [], 0, [], []
    for r in range(cfg.rounds):
        log(f"N={n} ({tier}): round {r + 1}/{cfg.rounds} ({len(stream)} requests with tenants and on the base)")
        if r % 2 == 0:  # the order alternates (ABBA), so a drift over the rounds does not favour either side
            t, f, tt = _run(engine, stream, False, cfg.batch)
            b, _, bt = _run(engine, stream, True, cfg.batch)
        else:
            b, _, bt = _run(engine, stream, True, cfg.batch)
            t, f, tt = _run(engine, stream, False, cfg.batch)
        with_t.append(t)
        base_t.append(b)
        pairs.append(t / b)
        failed += f
        ttft_with += tt
        ttft_base += bt
        stream = _stream([name for name, _ in names], cfg, rng, vocab)
    stats_all = engine.stats()["adapter_cache"]
    stats = {k: v - before.get(k, 0) for k, v in stats_all.items()}  # the measured rounds
    listing = {row["name"]: row for row in engine.adapters.listing()}
    per_kind = {}
    for kind in KINDS:
        sample = [name for name, k in names if k == kind][:20]
        host = [listing[s]["bytes"] for s in sample if listing[s].get("bytes")]
        per_kind[kind] = {"disk": int(statistics.mean(_dir_bytes(root / s) for s in sample)),
                          "host": int(statistics.mean(host)) if host else None}
    timings = engine.adapters.timings
    engine.shutdown()
    return {
        "tenants": n, "tier": tier, "register_s": round(register_s, 3), "preload_s": preload_s,
        "preloaded": stats_all.get("preloads", 0),
        "bytes_per_tenant": per_kind,
        "slot_miss_rate": round(stats["misses"] / max(stats["hits"] + stats["misses"], 1), 4),
        "host_loads": stats["loads"], "host_evictions": stats["host_evictions"],
        "cold_load_to_host_p50_s": _q(timings.to_host, 50), "cold_load_to_host_p99_s": _q(timings.to_host, 99),
        "slot_copy_p50_s": _q(timings.to_slot, 50), "slot_copy_p99_s": _q(timings.to_slot, 99),
        "cold_load_p99_s": round((_q(timings.to_host, 99) or 0) + (_q(timings.to_slot, 99) or 0), 4),
        "failed_requests": failed,
        "ttft_p50_s": _q(ttft_with, 50), "ttft_p99_s": _q(ttft_with, 99),
        "base_ttft_p50_s": _q(ttft_base, 50), "base_ttft_p99_s": _q(ttft_base, 99),
        "decode_tok_s": [round(x, 1) for x in with_t], "base_decode_tok_s": [round(x, 1) for x in base_t],
        "throughput_vs_base": round(statistics.median(pairs), 3), "pairs": [round(p, 3) for p in pairs],
        "rss_gb": round(psutil.Process().memory_info().rss / 2**30, 2),
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }


def run(cfg: DensityConfig, root: Path, log=lambda _: None) -> dict:
    root.mkdir(parents=True, exist_ok=True)
    write_tenants(cfg.base, root, max(cfg.tenants), cfg.ratio, log)
    rows = [measure(cfg, root, n, tier, log) for tier in cfg.tiers for n in cfg.tenants]
    keys = ("tenants", "bytes_per_tenant", "throughput_vs_base", "cold_load_p99_s", "rss_gb", "peak_rss_gb")
    largest = {tier: max((r for r in rows if r["tier"] == tier), key=lambda r: r["tenants"]) for tier in cfg.tiers}
    first = largest[cfg.tiers[0]]
    return {"config": asdict(cfg), "tier": cfg.tiers[0], **{k: first[k] for k in keys},
            "by_tier": {tier: {k: r[k] for k in keys if k != "bytes_per_tenant"} for tier, r in largest.items()},
            "rows": rows}
