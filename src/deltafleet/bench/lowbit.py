"""Decode throughput of the serving engine on a base, quantized or not (`deltafleet lowbit-bench`).

`batch` base-only greedy requests with seeded random prompts of `prompt_len` tokens, `max_tokens` new tokens each
(eos ignored), run to completion once to warm up and once measured; decode tokens/s is the engine's own counter
(decode tokens / seconds spent in decode steps), so prefill is excluded.
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


def decode_throughput(base: str | Path, dtype: str = "float32", kernel: str = "native", batch: int = 8,
                      prompt_len: int = 16, max_tokens: int = 16) -> dict[str, Any]:

    model, _ = load_model(base, dtype=DTYPES[dtype])
    quantized = set_kernel(model, kernel) > 0
    proj = [m for b in model.model.layers for m in (*b.self_attn.children(), *b.mlp.children())]
    proj_bytes = sum(m.nbytes if isinstance(m, PACKED_LINEARS) else m.weight.numel() * m.weight.element_size()
                     for m in proj)
    cfg = EngineConfig(dtype=dtype, max_batch=batch, max_model_len=prompt_len + max_tokens + 1, lora_slots=0,
                       delta_slots=0, road_slots=0)
    engine = Engine(model, None, cfg)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size

    def requests() -> list[Request]:
        return [Request(torch.randint(0, vocab, (prompt_len,), generator=g).tolist(),
                        SamplingParams(max_tokens=max_tokens, ignore_eos=True)) for _ in range(batch)]

    engine.generate(requests())  # warm-up
    before = dict(engine.counters)
    t0 = time.perf_counter()
    engine.generate(requests())
    wall = time.perf_counter() - t0
    cache_bytes = sum(m._cache.numel() * m._cache.element_size() for m in proj
                      if isinstance(m, PACKED_LINEARS) and m._cache is not None)  # the `cached` kernel's dense copies
    tokens = engine.counters["decode_tokens"] - before["decode_tokens"]
    seconds = engine.counters["decode_seconds"] - before["decode_seconds"]
    return {"base": str(base), "quantized": quantized, "kernel": kernel if quantized else None, "dtype": dtype,
            "batch": batch, "prompt_len": prompt_len, "max_tokens": max_tokens, "decode_tokens": tokens,
            "decode_seconds": round(seconds, 4), "decode_tokens_per_s": tokens / max(seconds, 1e-9),
            "wall_seconds": round(wall, 3), "projection_bytes": proj_bytes, "cache_bytes": cache_bytes,
            "threads": torch.get_num_threads()}
