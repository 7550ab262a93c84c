"""Decode throughput of the serving engine on a base, quantized or not (`deltafleet bench lowbit`).

`batch` greedy requests with seeded random prompts of `prompt_len` tokens, `max_tokens` new tokens each (eos
ignored), run to completion once to warm up and once measured; decode tokens/s is the engine's own counter (decode
tokens / seconds spent in decode steps), so prefill is excluded. With `adapters` > 0, that many random tenants
(half LoRA r16, half RoAd, all seven projections) are registered and the batch's requests cycle over them: a mixed
batch on the (quantized) base. `compare` runs several bases in one process, alternating them round by round, and
reports each one's median and its ratio to the first base: the figures a comparison of bases should come from.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch

from deltafleet.dtypes import DTYPES
from deltafleet.models.loading import load_model
from deltafleet.quant.base import PACKED_LINEARS, set_kernel
from deltafleet.serve.engine.config import EngineConfig
from deltafleet.serve.engine.engine import Engine
from deltafleet.serve.engine.types import Request, SamplingParams


def _tenants(model_cfg, n: int, root: Path) -> list[str]:
    """n random tenants saved under `root` (alternately LoRA r16 and RoAd, all seven projections)."""
    from deltafleet.adapters import LoraConfig, RoadConfig, random_adapter, save_adapter
    from deltafleet.models.config import PROJECTIONS

    names = []
    for i in range(n):
        acfg = LoraConfig(r=16, alpha=16.0, targets=PROJECTIONS) if i % 2 == 0 else RoadConfig(targets=PROJECTIONS)
        name = f"{acfg.kind}-{i}"
        save_adapter(random_adapter(model_cfg, acfg, seed=i), root / name, model_cfg=model_cfg)
        names.append(name)
    return names


def decode_throughput(base: str | Path, dtype: str = "float32", kernel: str = "native", batch: int = 8,
                      prompt_len: int = 16, max_tokens: int = 16, adapters: int = 0,
                      repeats: int = 1) -> dict[str, Any]:
    """One base's decode figures; `repeats` measured runs (one warm-up first), median reported."""
    import statistics
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runner = _Runner(base, dtype, kernel, batch, prompt_len, max_tokens, adapters, Path(tmp))
        rates = [runner.measure() for _ in range(repeats)]
        return {**runner.row(), "decode_tokens_per_s": statistics.median(rates), "runs": rates}


def compare(bases: list[str], dtype: str = "float32", kernel: str = "native", batch: int = 8, prompt_len: int = 16,
            max_tokens: int = 16, adapters: int = 0, rounds: int = 3) -> dict[str, Any]:
    """Every base of `bases` measured `rounds` times, alternating; each row with its median and ratio to the
    first base's median."""
    import statistics
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        runners = [_Runner(b, dtype, kernel, batch, prompt_len, max_tokens, adapters, Path(tmp) / str(i))
                   for i, b in enumerate(bases)]
        rates: list[list[float]] = [[] for _ in runners]
        for _ in range(rounds):
            for i, r in enumerate(runners):
                rates[i].append(r.measure())
        rows = [{**r.row(), "decode_tokens_per_s": statistics.median(x), "runs": x}
                for r, x in zip(runners, rates, strict=True)]
    first = rows[0]["decode_tokens_per_s"]
    for row in rows:
        row["vs_first"] = row["decode_tokens_per_s"] / first
    return {"rows": rows, "rounds": rounds, "adapters": adapters, "dtype": dtype, "batch": batch,
            "threads": torch.get_num_threads()}


class _Runner:
    """One base loaded into an engine (with `adapters` random tenants), measured on demand."""

    def __init__(self, base, dtype, kernel, batch, prompt_len, max_tokens, adapters, root: Path):
        self.base, self.dtype, self.batch, self.prompt_len, self.max_tokens = base, dtype, batch, prompt_len, max_tokens
        self.adapters = adapters
        model, _ = load_model(base, dtype=DTYPES[dtype])
        self.quantized = set_kernel(model, kernel) > 0
        self.kernel = kernel if self.quantized else None
        proj = [m for b in model.model.layers for m in (*b.self_attn.children(), *b.mlp.children())]
        self.proj = proj
        self.proj_bytes = sum(m.nbytes if isinstance(m, PACKED_LINEARS) else m.weight.numel() * m.weight.element_size()
                              for m in proj)
        self.names: list[str | None] = [None]
        if adapters:
            root.mkdir(parents=True, exist_ok=True)
            self.names = _tenants(model.config, adapters, root)
        kinds = [n.split("-")[0] for n in self.names if n]
        cfg = EngineConfig(dtype=dtype, max_batch=batch, max_model_len=prompt_len + max_tokens + 1,
                           lora_slots=kinds.count("lora"), max_lora_rank=16, delta_slots=0,
                           road_slots=kinds.count("road"))
        self.engine = Engine(model, None, cfg, adapters_dir=root if adapters else None)
        self.vocab = model.config.vocab_size
        self.gen = torch.Generator().manual_seed(0)
        self.engine.generate(self.requests())  # warm-up (loads the tenants into their slots)
        self.wall = 0.0

    def requests(self) -> list[Request]:
        return [Request(torch.randint(0, self.vocab, (self.prompt_len,), generator=self.gen).tolist(),
                        SamplingParams(max_tokens=self.max_tokens, ignore_eos=True),
                        adapter=self.names[i % len(self.names)]) for i in range(self.batch)]

    def measure(self) -> float:
        before = dict(self.engine.counters)
        t0 = time.perf_counter()
        self.engine.generate(self.requests())
        self.wall = time.perf_counter() - t0
        self.tokens = self.engine.counters["decode_tokens"] - before["decode_tokens"]
        self.seconds = self.engine.counters["decode_seconds"] - before["decode_seconds"]
        return self.tokens / max(self.seconds, 1e-9)

    def row(self) -> dict[str, Any]:
        cache_bytes = sum(m._cache.numel() * m._cache.element_size() for m in self.proj
                          if isinstance(m, PACKED_LINEARS) and m._cache is not None)  # `cached` kernel's dense copies
        return {"base": str(self.base), "quantized": self.quantized, "kernel": self.kernel, "dtype": self.dtype,
                "batch": self.batch, "prompt_len": self.prompt_len, "max_tokens": self.max_tokens,
                "adapters": self.adapters, "decode_tokens": self.tokens, "decode_seconds": round(self.seconds, 4),
                "wall_seconds": round(self.wall, 3), "projection_bytes": self.proj_bytes, "cache_bytes": cache_bytes,
                "threads": torch.get_num_threads()}
