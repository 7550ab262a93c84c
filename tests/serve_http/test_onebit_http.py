"""`deltafleet serve` on a OneBit (1-bit) base: LoRA and RoAd tenants and the base answer through the official
openai client, concurrently, each as greedy generation of the 1-bit model with the tenant's hook."""

from __future__ import annotations

import asyncio

import pytest

from deltafleet.adapters import LoraConfig, RoadConfig, load_adapter, random_adapter, save_adapter
from deltafleet.models.generate import greedy_generate
from deltafleet.models.loading import load_model
from deltafleet.quant.config import QuantConfig
from deltafleet.quant.pipeline import quantize_base
from deltafleet.quant.sign_linear import SignLinear
from deltafleet.serve.http.tenancy import Tenancy
from tests.serve_http.conftest import ALL, MODEL, Live

KINDS = {"t-lora": (LoraConfig(r=4, alpha=8.0, targets=ALL), 3.0), "t-road": (RoadConfig(targets=ALL), 1.0)}


@pytest.fixture(scope="module")
def onebit_server(tiny_chat_model, tmp_path_factory):
    base = tmp_path_factory.mktemp("onebit") / MODEL
    quantize_base(tiny_chat_model, QuantConfig("onebit", kd_steps=0), base, dense_dtype="float32",
                  show_progress=False)
    model, _ = load_model(base)
    root = tmp_path_factory.mktemp("onebit-tenants")
    for i, (name, (acfg, f)) in enumerate(KINDS.items()):
        a = random_adapter(model.config, acfg, seed=60 + i)
        a = type(a)(a.config, {k: {n: t * f for n, t in p.items()} for k, p in a.params.items()})
        save_adapter(a, root / name, model_cfg=model.config)
    live = Live(base, root, Tenancy())
    yield live, model, root
    live.stop()


def test_tenants_on_a_onebit_base_through_the_openai_client(onebit_server, tokenizer):
    live, model, root = onebit_server
    assert isinstance(live.gateway.engine.model.linear(0, "q_proj"), SignLinear)
    prompts = ["The quick brown fox", "Once upon a time", "Paris is the capital of"]
    jobs = [(name, prompts[i % 3], 4 + i % 3) for i, name in enumerate([*KINDS, None, *KINDS, None])]

    async def one(adapter, prompt, max_tokens):
        r = await live.async_client().completions.create(model=adapter or MODEL, prompt=prompt,
                                                         max_tokens=max_tokens, temperature=0)
        return r.choices[0].text

    async def main():
        return await asyncio.gather(*(one(*j) for j in jobs))

    def solo(adapter, prompt, max_tokens):
        hook = None if adapter is None else load_adapter(root / adapter, model.config).hook()
        ids = greedy_generate(model, live.gateway.encode(prompt), max_tokens, (2,), hook=hook)
        return tokenizer.decode([t for t in ids if t != 2], skip_special_tokens=True)

    for (adapter, prompt, max_tokens), text in zip(jobs, asyncio.run(main()), strict=True):
        assert text == solo(adapter, prompt, max_tokens), (adapter, prompt)
    assert solo("t-lora", prompts[0], 6) != solo(None, prompts[0], 6)
