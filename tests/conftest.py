"""Shared fixtures: tiny random Llama-family checkpoints built in code, and the embedded SmolLM2 (converted once).

Tolerances are declared once per dtype here. References are computed in fp32.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import contextlib  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


@contextlib.contextmanager
def one_thread():
    """One intra-op thread (tests of many tiny ops on a shared 2-core CPU), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


TOL = {
    torch.float32: {"atol": 2e-5, "rtol": 1e-4},
    torch.bfloat16: {"atol": 0.25, "rtol": 5e-2},  # logits of scale ~5 after 8-bit-mantissa matmuls
}
# A merged model (W + dW stored in fp32: one more rounding per weight, u = 2^-24 relative) against the unmerged one
# (W x + adapter(x)), run by different libraries (MKL, oneDNN, AMX or AVX-512 kernels sum in different orders):
# the extra rounding grows with sqrt(K) per projection and through the layers; 4.6e-5 was seen on an Intel Xeon.
TOL_MERGED = {torch.float32: {"atol": 1e-4, "rtol": 1e-4}, torch.bfloat16: TOL[torch.bfloat16]}

# Out sizes are multiples of 64 so peft's RoAd (group_size 64) fits every projection.
TINY_CONFIGS = {
    "llama": dict(model_type="llama", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, vocab_size=320, rms_norm_eps=1e-5,
                  max_position_embeddings=256, tie_word_embeddings=False),
    "llama3-rope-tied": dict(model_type="llama", hidden_size=128, intermediate_size=192, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=1, vocab_size=300, rms_norm_eps=1e-6,
                             max_position_embeddings=512, tie_word_embeddings=True,
                             rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                                              "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                              "original_max_position_embeddings": 64}),
    "qwen2-bias": dict(model_type="qwen2", hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, vocab_size=320, rms_norm_eps=1e-6,
                       max_position_embeddings=256, tie_word_embeddings=False),
}


def build_hf_model(name: str, seed: int = 0):
    """A transformers model with deterministic random weights (biases and norms non-trivial too)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(TINY_CONFIGS[name])
    config = AutoConfig.for_model(spec.pop("model_type"), **spec)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            else:
                p.normal_(0.0, 0.08)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory) -> dict[str, Path]:
    """name -> checkpoint directory (config.json + model.safetensors) for each tiny config."""
    out = {}
    for name in TINY_CONFIGS:
        d = tmp_path_factory.mktemp(name)
        build_hf_model(name).save_pretrained(str(d), safe_serialization=True)
        out[name] = d
    return out


@pytest.fixture(scope="session")
def tiny_llama(tiny_checkpoints) -> Path:
    return tiny_checkpoints["llama"]


@pytest.fixture(scope="session")
def smollm2_path() -> Path:
    """The embedded SmolLM2 checkpoint (converted from the GGUF once per cache directory)."""
    from deltafleet.models.loading import resolve_base

    return resolve_base("smollm2-135m")


def token_batch(vocab: int, B: int, T: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (B, T), generator=g)
