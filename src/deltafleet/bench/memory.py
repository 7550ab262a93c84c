"""Resident memory against the number of distinct prompt lengths (`deltafleet bench memory`).

A server sees prompts of every length. Each new token count M that reaches a oneDNN matmul (the prepacked fp32
projections, `models.prepack`) creates a primitive that two caches keep: ideep's (`LRU_CACHE_CAPACITY`, default
1024) and oneDNN's own (`ONEDNN_PRIMITIVE_CACHE_CAPACITY`, default 1024); both are read once, when the process
first uses them, so each variant runs in a fresh process with its environment. Padding prefill chunks to a
multiple of `EngineConfig.prefill_bucket` tokens cuts the number of distinct shapes instead.

Per variant: an engine over the base (no adapter pools), a warm-up, then `lengths` requests one at a time, each
with a prompt of a new length (8, 11, 14, ... tokens of random ids, in a seeded random order) and 2 greedy tokens;
RSS growth over the warmed-up process is sampled every `every` requests. Then the same lengths once more: their
growth (`second_pass_growth_mb`) is what the process keeps adding for shapes it has seen, about 0 when bounded.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass

from deltafleet.models.prepack import PRIMITIVE_CACHE_VARS


@dataclass(frozen=True)
class Variant:
    name: str
    cache_capacity: int | None  # both primitive caches; None: the libraries' defaults
    prefill_bucket: int


VARIANTS = (
    Variant("defaults (caches 1024, bucket 1)", None, 1),
    Variant("bucket 16", None, 16),
    Variant("caches 64", 64, 1),
    Variant("caches 64 + bucket 16 (serve's defaults)", 64, 16),
)


def worker(base: str, dtype: str, lengths: int, every: int, prefill_bucket: int) -> dict:
    """Runs in the measured process (its environment already set)."""
    import psutil
    import torch

    from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams

    torch.manual_seed(0)
    rng = random.Random(0)
    cfg = EngineConfig(dtype=dtype, max_batch=8, max_model_len=8 + 3 * lengths + 8, lora_slots=0, delta_slots=0,
                       road_slots=0, prefill_bucket=prefill_bucket)
    engine = Engine.from_pretrained(base, config=cfg)
    proc = psutil.Process()
    params = SamplingParams(max_tokens=2, temperature=0.0, ignore_eos=True)

    def run(n: int) -> None:
        engine.generate([Request([rng.randrange(1000, 20000) for _ in range(n)], params)])

    for _ in range(5):
        run(16)
    rss0 = proc.memory_info().rss
    order = list(range(8, 8 + 3 * lengths, 3))
    rng.shuffle(order)  # arrival order is random, so the peak transient memory is not mistaken for growth
    curve, t0 = [], time.perf_counter()
    for i, n in enumerate(order, 1):
        run(n)
        if i % every == 0 or i == lengths:
            curve.append(round((proc.memory_info().rss - rss0) / 2**20, 1))
    seconds = time.perf_counter() - t0
    rss1 = proc.memory_info().rss
    for n in order:  # the same lengths again: a bounded process does not grow any more
        run(n)
    again = round((proc.memory_info().rss - rss1) / 2**20, 1)
    return {"rss_start_mb": round(rss0 / 2**20, 1), "growth_mb": curve, "second_pass_growth_mb": again,
            "seconds": round(seconds, 1)}


def run(base: str = "smollm2-135m", dtype: str = "float32", lengths: int = 120, every: int = 20,
        variants: tuple[Variant, ...] = VARIANTS, log=lambda _: None) -> dict:
    results = []
    for v in variants:
        env = {k: val for k, val in os.environ.items() if k not in PRIMITIVE_CACHE_VARS}
        if v.cache_capacity is not None:
            env |= {k: str(v.cache_capacity) for k in PRIMITIVE_CACHE_VARS}
        log(f"{v.name}: {lengths} prompt lengths in a fresh process")
        args = json.dumps({"base": base, "dtype": dtype, "lengths": lengths, "every": every,
                           "prefill_bucket": v.prefill_bucket})
        out = subprocess.run([sys.executable, "-m", "deltafleet.bench.memory", args], env=env, check=True,
                             capture_output=True, text=True)
        results.append({"variant": v.name, "cache_capacity": v.cache_capacity, "prefill_bucket": v.prefill_bucket,
                        **json.loads(out.stdout.strip().splitlines()[-1])})
    return {"base": base, "dtype": dtype, "lengths": lengths, "every": every, "cpu_count": os.cpu_count(),
            "variants": results}


if __name__ == "__main__":
    print(json.dumps(worker(**json.loads(sys.argv[1]))))
