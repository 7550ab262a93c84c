"""A tiny Llama with SmolLM2's vocabulary and tokenizer (chat template included), for fast training tests.

hidden 64, 2 layers, intermediate 128, 4 heads, 4 kv heads (every projection's out size is a multiple of
RoAd's group size 64), tied embeddings: 3.2M parameters, 3.1M of them the embedding. Weights are drawn
N(0, 0.08) (norms 1 + N(0, 0.1)) so that adapters visibly change the output.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

TINY_CHAT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=4, vocab_size=49152, max_position_embeddings=1024, rms_norm_eps=1e-5,
                 tie_word_embeddings=True, bos_token_id=1, eos_token_id=2, pad_token_id=2)


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from deltafleet.models.loading import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="session")
def chat_tiny(tmp_path_factory, smollm2_tokenizer) -> Path:
    """Checkpoint directory: config.json, model.safetensors and SmolLM2's tokenizer files."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("llama", **TINY_CHAT)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0.0, 0.08)
    d = tmp_path_factory.mktemp("chat-tiny")
    model.save_pretrained(str(d), safe_serialization=True)
    smollm2_tokenizer.save_pretrained(str(d))
    return d
