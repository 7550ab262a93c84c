"""Fixtures for engine tests: a tiny base with a directory of varied adapters, and the solo references."""

from __future__ import annotations

import pytest
import torch

from deltafleet.adapters import (
    LoraConfig,
    LowRankConfig,
    RoadConfig,
    load_adapter,
    merge_adapter,
    random_adapter,
    save_adapter,
    unmerge_adapter,
)
from deltafleet.adapters.hiwi import HiwiConfig
from deltafleet.adapters.pafi import PafiConfig
from deltafleet.models.config import ModelConfig
from deltafleet.models.generate import greedy_generate
from deltafleet.models.loading import load_model

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# LoRA of several ranks and target sets, the three RoAd variants, and low-rank deltas of small and large rank
# (the large one lands in the engine's "delta" pool), PaFi tenants (sparse, one shared mask per density) and HiWi
# tenants (RMSNorm gain changes).
ADAPTER_CONFIGS = {
    "lora-r2-qv": LoraConfig(r=2, alpha=4.0, targets=("q_proj", "v_proj")),
    "lora-r8-all": LoraConfig(r=8, alpha=8.0, targets=ALL),
    "lora-r16-mlp": LoraConfig(r=16, alpha=32.0, use_rslora=True, targets=("gate_proj", "up_proj", "down_proj")),
    "lora-r4-ko": LoraConfig(r=4, alpha=8.0, targets=("k_proj", "o_proj")),
    "road1-all": RoadConfig(variant="road_1", group_size=64, targets=ALL),
    "road2-qkv": RoadConfig(variant="road_2", group_size=64, targets=("q_proj", "k_proj", "v_proj")),
    "road4-mlp": RoadConfig(variant="road_4", group_size=64, targets=("gate_proj", "down_proj")),
    "delta-r6": LowRankConfig(rank=6, targets=ALL),
    "delta-r40": LowRankConfig(rank=40, targets=("q_proj", "o_proj", "up_proj", "down_proj")),
    "pafi-all": PafiConfig(density=0.02, targets=ALL),
    "pafi-qkvo": PafiConfig(density=0.02, targets=("q_proj", "k_proj", "v_proj", "o_proj")),
    "hiwi-both": HiwiConfig(),
    "hiwi-post": HiwiConfig(targets=("post_attention_layernorm",)),
}
# Scale of the random factors / values, so that greedy paths really differ from the base's.
STRONGER = {"lora": 2.0, "pafi": 20.0, "hiwi": 10.0}


@pytest.fixture(scope="session")
def adapters_dir(tiny_llama, tmp_path_factory):
    cfg = ModelConfig.from_file(tiny_llama / "config.json")
    d = tmp_path_factory.mktemp("adapters")
    for i, (name, acfg) in enumerate(ADAPTER_CONFIGS.items()):
        a = random_adapter(cfg, acfg, seed=100 + i)
        if acfg.kind in STRONGER:
            f = STRONGER[acfg.kind]
            a = type(a)(a.config, {k: {n: t * f if t.is_floating_point() else t for n, t in p.items()}
                                   for k, p in a.params.items()})
        save_adapter(a, d / name, model_cfg=cfg)
    return d


class SoloReference:
    """Greedy generation of one request alone, with its adapter merged into an fp32 base."""

    def __init__(self, base_path, adapters_dir):
        self.model, _ = load_model(base_path, dtype=torch.float32)
        self.adapters_dir = adapters_dir
        self.cache: dict = {}

    def __call__(self, prompt: list[int], max_tokens: int, adapter: str | None, stop_ids=()) -> list[int]:
        key = (tuple(prompt), max_tokens, adapter, tuple(stop_ids))
        if key not in self.cache:
            a = None if adapter is None else load_adapter(self.adapters_dir / adapter, self.model.config)
            if a is not None:
                merge_adapter(self.model, a)
            try:
                self.cache[key] = greedy_generate(self.model, prompt, max_tokens, stop_ids)
            finally:
                if a is not None:
                    unmerge_adapter(self.model, a)
        return self.cache[key]


@pytest.fixture(scope="session")
def solo(tiny_llama, adapters_dir):
    return SoloReference(tiny_llama, adapters_dir)
