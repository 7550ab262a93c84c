"""The engine the per-step scripts here measure (`mixed_step_breakdown.py`, `mixed_step_paired.py`): SmolLM2-135M in
bf16, batch 32, 32 LoRA / 32 RoAd / 64 qdelta slots, the first 96 tenants `deltafleet bench density` writes
registered; `mixed`: 11 LoRA r16, 11 RoAd and 10 compressed whole fine-tunes (`ft`, 1/64)."""
from pathlib import Path

import torch

from deltafleet.bench.density import kind_configs, tenant_names
from deltafleet.models.loading import load_model, load_tokenizer
from deltafleet.serve.engine import Engine, EngineConfig


def resident_engine() -> tuple[torch.nn.Module, Engine, list[str]]:
    """(model, engine, the mixed batch's 32 tenant names)."""
    model, path = load_model("smollm2-135m", dtype=torch.bfloat16)
    kc = kind_configs(model.config, 1 / 64)
    rank = max(sum(r for _, r in kc["ft"].ranks(*model.config.linear_shape(p)))
               for p in ("q_proj", "k_proj", "gate_proj", "down_proj"))
    e = Engine(model, load_tokenizer(path), EngineConfig(
        dtype="bfloat16", max_batch=32, max_model_len=80, lora_slots=32, road_slots=32, delta_slots=0,
        qdelta_slots=64, max_delta_rank=rank, pafi_slots=0, hiwi_slots=0))
    root = Path.home() / ".cache/deltafleet/density-tenants"
    names = tenant_names(96)
    for n, _ in names:
        e.adapters.add(n, root / n)
    by = {k: [n for n, kk in names if kk == k] for k in ("lora", "road", "ft")}
    return model, e, by["lora"][:11] + by["road"][:11] + by["ft"][:10]
