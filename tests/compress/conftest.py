"""A tiny base and a synthetic full fine-tune of it: projection and table deltas with a long-tail singular spectrum
(as Delta-CoMe observes in real fine-tunes) plus changed norms, and calibration tokens."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from deltafleet.compress.delta import projection_name
from deltafleet.models.config import PROJECTIONS, ModelConfig
from deltafleet.store.safetensors_io import load_tensors, save_tensors
from tests.conftest import one_thread
from tests.train.conftest import chat_tiny, smollm2_tokenizer  # noqa: F401  (fixtures)


def long_tail_delta(out_f: int, in_f: int, g: torch.Generator, scale: float = 0.04) -> torch.Tensor:
    """U diag(s) V^T with s_k = scale / (1 + k)^1.2: a few strong directions and a long tail."""
    k = min(out_f, in_f)
    U = torch.linalg.qr(torch.randn(out_f, k, generator=g))[0]
    V = torch.linalg.qr(torch.randn(in_f, k, generator=g))[0]
    s = scale * 4 / (1 + torch.arange(k, dtype=torch.float32)) ** 1.2
    return (U * s) @ V.t()


def make_finetune(base_dir, out_dir, seed: int = 1, scale: float = 0.04, extras: bool = True):
    cfg = ModelConfig.from_file(base_dir / "config.json")
    state = load_tensors(base_dir / "model.safetensors")
    g = torch.Generator().manual_seed(seed)
    for layer in range(cfg.num_layers):
        for proj in PROJECTIONS:
            name = projection_name(layer, proj)
            state[name] = state[name] + long_tail_delta(*state[name].shape, g, scale)
    if extras:  # the rest of a whole fine-tune: norms and tables (the LM head too when untied)
        for n in ("model.layers.0.input_layernorm.weight", "model.norm.weight"):
            state[n] = state[n] + 0.05 * torch.randn(state[n].shape, generator=g)
        for n in ("model.embed_tokens.weight", "lm_head.weight"):
            if n in state:
                state[n] = state[n] + long_tail_delta(*state[n].shape, g, scale / 2)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_tensors(state, out_dir / "model.safetensors", metadata={"format": "pt"})
    shutil.copy(base_dir / "config.json", out_dir / "config.json")
    return out_dir


@pytest.fixture(scope="session")
def tiny_ft(tiny_llama, tmp_path_factory):
    return make_finetune(tiny_llama, tmp_path_factory.mktemp("tiny-ft"))


@pytest.fixture(scope="session")
def calib_ids(tiny_llama):
    vocab = json.loads((tiny_llama / "config.json").read_text())["vocab_size"]
    return torch.randint(0, vocab, (8, 32), generator=torch.Generator().manual_seed(5))


@pytest.fixture(autouse=True)
def _one_thread():
    """Small matrices run faster on one thread, and the CI machine is shared."""
    with one_thread():
        yield


@pytest.fixture(scope="session")
def tiny_deltas(tiny_llama, tiny_ft):
    from deltafleet.compress import extract_deltas

    return extract_deltas(tiny_llama, tiny_ft)


@pytest.fixture(scope="session")
def tiny_base_model(tiny_llama):
    from deltafleet.models.loading import load_model

    return load_model(tiny_llama)[0]
