"""The serving engine on a quantized base: mixed LoRA + RoAd batches give every request the tokens it gets alone,
and those equal greedy generation of the quantized model with the adapter's hook."""

from __future__ import annotations

import random

import torch

from deltafleet.adapters import LoraConfig, RoadConfig, random_adapter, save_adapter
from deltafleet.models.generate import greedy_generate
from deltafleet.models.loading import load_model
from deltafleet.quant.linear import QuantLinear
from deltafleet.serve.engine import Engine, EngineConfig, FinishReason, Request, SamplingParams

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {"lora-r8": LoraConfig(r=8, alpha=16.0, targets=ALL),
            "lora-r2-qv": LoraConfig(r=2, alpha=4.0, targets=("q_proj", "v_proj")),
            "road1": RoadConfig(variant="road_1", group_size=64, targets=ALL),
            "road2-mlp": RoadConfig(variant="road_2", group_size=64, targets=("gate_proj", "up_proj", "down_proj"))}


def test_mixed_adapters_on_quantized_base_equal_solo(quantized_tiny, tmp_path):
    base = quantized_tiny["gptq"]
    model, _ = load_model(base)
    assert isinstance(model.linear(0, "q_proj"), QuantLinear)
    adapters = {}
    for i, (name, acfg) in enumerate(ADAPTERS.items()):
        a = random_adapter(model.config, acfg, seed=10 + i)
        if acfg.kind == "lora":
            a = type(a)(a.config, {k: {n: t * 2 for n, t in p.items()} for k, p in a.params.items()})
        save_adapter(a, tmp_path / name, model_cfg=model.config)
        adapters[name] = a
    rng = random.Random(0)
    names = [*ADAPTERS, None]
    reqs = [Request([rng.randrange(320) for _ in range(rng.randint(1, 12))],
                    SamplingParams(max_tokens=rng.randint(2, 8), ignore_eos=True), adapter=names[i % len(names)])
            for i in range(9)]
    cfg = EngineConfig(dtype="float32", max_model_len=32, max_batch=6, lora_slots=4, max_lora_rank=8, road_slots=4)
    engine = Engine(load_model(base)[0], None, cfg, adapters_dir=tmp_path)
    mixed = engine.generate(reqs)
    solo_engine = Engine(load_model(base)[0], None, cfg, adapters_dir=tmp_path)
    for r, o in zip(reqs, mixed, strict=True):
        assert o.finish_reason == FinishReason.LENGTH
        alone = solo_engine.generate([r])[0]
        assert o.token_ids == alone.token_ids, r.adapter
        hook = None if r.adapter is None else adapters[r.adapter].hook()
        assert o.token_ids == greedy_generate(model, r.prompt_ids, r.params.max_tokens, hook=hook), r.adapter
    prompt = [5, 17, 33, 2, 250, 101]
    outs = {n: greedy_generate(model, prompt, 10, hook=None if n is None else adapters[n].hook()) for n in names}
    assert len({tuple(v) for v in outs.values()}) >= 4  # adapters really change the quantized base's output


def test_engine_bf16_on_quantized_base_runs(quantized_tiny):
    engine = Engine(load_model(quantized_tiny["rtn"], dtype=torch.bfloat16)[0], None,
                    EngineConfig(dtype="bfloat16", max_model_len=32, max_batch=4))
    outs = engine.generate([Request([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True)) for _ in range(3)])
    assert all(len(o.token_ids) == 5 for o in outs) and outs[0].token_ids == outs[2].token_ids
