"""PaFi and HiWi tenants through `deltafleet serve`'s app and the official openai client: concurrent requests over
PaFi, HiWi, LoRA and the base, each answer equal to its solo merged greedy generation."""

from __future__ import annotations

import asyncio

import pytest

from deltafleet.adapters import LoraConfig, random_adapter, save_adapter
from deltafleet.adapters.hiwi import HiwiConfig
from deltafleet.adapters.pafi import PafiConfig
from deltafleet.models.config import ModelConfig
from deltafleet.serve.http.tenancy import Tenancy
from tests.serve.conftest import SoloReference
from tests.serve_http.conftest import ALL, MODEL, Live

KINDS = {"t-pafi": (PafiConfig(density=0.02, targets=ALL), 20.0), "t-pafi2": (PafiConfig(density=0.02), 20.0),
         "t-hiwi": (HiwiConfig(), 10.0), "t-lora": (LoraConfig(r=4, alpha=8.0, targets=ALL), 3.0)}


@pytest.fixture(scope="module")
def server(tiny_chat_model, tmp_path_factory, monkeypatch_module):
    monkeypatch_module.setenv("DELTAFLEET_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    cfg = ModelConfig.from_file(tiny_chat_model / "config.json")
    root = tmp_path_factory.mktemp("new-kinds")
    for i, (name, (acfg, f)) in enumerate(KINDS.items()):
        a = random_adapter(cfg, acfg, seed=40 + i)
        a = type(a)(a.config, {k: {n: t * f if t.is_floating_point() else t for n, t in p.items()}
                               for k, p in a.params.items()})
        save_adapter(a, root / name, model_cfg=cfg)
    live = Live(tiny_chat_model, root, Tenancy())
    yield live, SoloReference(tiny_chat_model, root)
    live.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def test_pafi_and_hiwi_tenants_answer_as_merged_through_the_openai_client(server, tokenizer):
    live, ref = server
    listed = {m.id for m in live.client().models.list().data}
    assert set(KINDS) <= listed
    prompts = ["The quick brown fox", "Once upon a time", "Paris is the capital of"]
    jobs = [(name, prompts[i % 3], 5 + i % 3) for i, name in enumerate([*KINDS, None, *KINDS])]

    async def one(adapter, prompt, max_tokens):
        client = live.async_client()
        r = await client.completions.create(model=adapter or MODEL, prompt=prompt, max_tokens=max_tokens,
                                            temperature=0)
        return r.choices[0].text

    async def main():
        return await asyncio.gather(*(one(*j) for j in jobs))

    def solo(adapter, prompt, max_tokens):
        ids = ref(live.gateway.encode(prompt), max_tokens, adapter, stop_ids=(2,))
        return tokenizer.decode([t for t in ids if t != 2], skip_special_tokens=True)

    for (adapter, prompt, max_tokens), text in zip(jobs, asyncio.run(main()), strict=True):
        assert text == solo(adapter, prompt, max_tokens), (adapter, prompt)
    changed = [name for name in KINDS if solo(name, prompts[0], 8) != solo(None, prompts[0], 8)]
    assert len(changed) >= 3, changed  # the tenants really change the answer
