"""A live server on 127.0.0.1 (ephemeral port) over a tiny random Llama with SmolLM2's tokenizer and chat template.

The tiny model has SmolLM2's vocabulary (49152) so the server tokenizes and applies the chat template for real,
but only 2 layers of width 128, so a request takes milliseconds. Tenants:

    acme   -> acme-*        globex -> globex-*        ops (admin) -> *
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from deltafleet.adapters import LoraConfig, LowRankConfig, RoadConfig, random_adapter, save_adapter
from deltafleet.models.config import ModelConfig
from deltafleet.models.loading import load_tokenizer
from deltafleet.serve.engine import EngineConfig
from deltafleet.serve.http.app import create_app
from deltafleet.serve.http.engine_gateway import EngineGateway
from deltafleet.serve.http.server import BackgroundServer
from deltafleet.serve.http.tenancy import Tenancy
from tests.serve.conftest import SoloReference

ALL = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTERS = {
    "acme-lora": LoraConfig(r=8, alpha=16.0, targets=ALL),
    "acme-road": RoadConfig(variant="road_1", group_size=64, targets=ALL),
    "globex-lora": LoraConfig(r=4, alpha=8.0, targets=("q_proj", "v_proj", "down_proj")),
    "globex-delta": LowRankConfig(rank=6, targets=ALL),
}
KEYS = {"acme": "sk-acme-test-key-0001", "globex": "sk-globex-test-key-0002", "ops": "sk-ops-admin-key-0003"}
TENANCY = {"tenants": [
    {"name": "acme", "api_key": KEYS["acme"], "adapters": ["acme-*"]},
    {"name": "globex", "api_key": KEYS["globex"], "adapters": ["globex-*"]},
    {"name": "ops", "api_key": KEYS["ops"], "adapters": ["*"], "admin": True},
]}
MODEL = "tiny-chat"
ENGINE = dict(dtype="float32", max_batch=8, max_model_len=512, max_queue=64, lora_slots=4, road_slots=2,
              delta_slots=1, max_delta_rank=16)


@pytest.fixture(scope="session")
def tiny_chat_model(tmp_path_factory, smollm2_path) -> Path:
    """A 2-layer random Llama with SmolLM2's vocabulary, tokenizer and chat template, saved as an HF checkpoint."""
    from transformers import LlamaConfig, LlamaForCausalLM

    d = tmp_path_factory.mktemp("models") / MODEL
    config = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, max_position_embeddings=1024, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0.0, 0.08)
    model.save_pretrained(str(d), safe_serialization=True)
    for f in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_path / f).is_file():
            shutil.copy(smollm2_path / f, d / f)
    return d


@pytest.fixture(scope="session")
def adapters_root(tiny_chat_model, tmp_path_factory) -> Path:
    cfg = ModelConfig.from_file(tiny_chat_model / "config.json")
    d = tmp_path_factory.mktemp("adapters")
    for i, (name, acfg) in enumerate(ADAPTERS.items()):
        a = random_adapter(cfg, acfg, seed=10 + i)
        if acfg.kind == "lora":  # strong enough that greedy answers differ from the base's
            a = type(a)(a.config, {k: {n: t * 3 for n, t in p.items()} for k, p in a.params.items()})
        save_adapter(a, d / name, model_cfg=cfg)
    return d


@pytest.fixture(scope="session")
def tokenizer(tiny_chat_model):
    return load_tokenizer(tiny_chat_model)


@pytest.fixture(scope="session")
def solo(tiny_chat_model, adapters_root, tokenizer):
    """(prompt ids, max_tokens, adapter) -> the text greedy generation gives alone, adapter merged, fp32."""
    ref = SoloReference(tiny_chat_model, adapters_root)

    def answer(prompt_ids: list[int], max_tokens: int, adapter: str | None) -> tuple[str, int]:
        ids = ref(prompt_ids, max_tokens, adapter, stop_ids=(2,))
        return tokenizer.decode([t for t in ids if t != 2], skip_special_tokens=True), len(ids)

    return answer


class Live:
    """A running server and what tests need to talk to it."""

    def __init__(self, tiny_chat_model: Path, adapters_root: Path, tenancy: Tenancy, deadline: float = 30.0,
                 **engine_kw):
        self.gateway = EngineGateway.from_pretrained(tiny_chat_model, adapters_root,
                                                     EngineConfig(**{**ENGINE, **engine_kw}), MODEL)
        self.app = create_app(self.gateway, tenancy)
        self.server = BackgroundServer(self.app, self.gateway, deadline=deadline).start()
        self.url = self.server.url

    def client(self, key: str | None = None, **kw):
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, **kw)

    def async_client(self, key: str | None = None):
        import openai

        return openai.AsyncOpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0)

    def stop(self) -> None:
        self.server.stop()


@pytest.fixture(scope="session")
def live(tiny_chat_model, adapters_root):
    server = Live(tiny_chat_model, adapters_root, Tenancy.from_dict(TENANCY))
    yield server
    server.stop()


@pytest.fixture
def fresh_server(tiny_chat_model, adapters_root):
    """A separate open server per test (shutdown and queue-bound tests); keyword args go to EngineConfig."""
    started = []

    def make(deadline: float = 30.0, **engine_kw) -> Live:
        started.append(Live(tiny_chat_model, adapters_root, Tenancy(), deadline, **engine_kw))
        return started[-1]

    yield make
    for s in started:
        s.stop()
