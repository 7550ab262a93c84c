"""Our Transformer equals transformers' LlamaForCausalLM / Qwen2ForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from deltafleet.models import KVCache
from deltafleet.models.loading import load_model
from tests.conftest import TINY_CONFIGS, assert_close, forward_chain, token_batch


def _pair(path, dtype=torch.float32):
    ours, _ = load_model(path, dtype=dtype)
    theirs = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    return ours, theirs


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("T", [1, 7, 40])
def test_logits_match_transformers(tiny_checkpoints, name, T):
    ours, theirs = _pair(tiny_checkpoints[name])
    ids = token_batch(ours.config.vocab_size, 3, T, seed=T)
    with torch.no_grad():
        assert_close(ours(ids), theirs(ids).logits, "reordered", **forward_chain(ours.config))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_padded_batch_matches_transformers(tiny_checkpoints, name):
    """Right padding (positions 0..) and left padding (explicit positions) on prompts of lengths 9, 4, 1."""
    ours, theirs = _pair(tiny_checkpoints[name])
    lengths = [9, 4, 1]
    ids = token_batch(ours.config.vocab_size, 3, 9, seed=1)
    right = torch.tensor([[1] * n + [0] * (9 - n) for n in lengths])
    left = right.flip(1)
    for mask in (right, left):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        with torch.no_grad():
            a = ours(ids, positions=pos, attention_mask=mask)
            b = theirs(ids, attention_mask=mask, position_ids=pos).logits
        valid = mask.bool()
        assert_close(a[valid], b[valid], "reordered", **forward_chain(ours.config))
        # Each row also equals that prompt run alone, unpadded.
        for i in range(len(lengths)):
            alone = ours(ids[i][valid[i]][None])[0]
            assert_close(a[i][valid[i]], alone, "reordered", **forward_chain(ours.config))


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_kv_cache_prefill_then_decode_matches_full_forward(tiny_checkpoints, name):
    ours, _ = load_model(tiny_checkpoints[name])
    ids = token_batch(ours.config.vocab_size, 2, 12, seed=3)
    with torch.no_grad():
        full = ours(ids)
        cache = KVCache.allocate(ours.config, slots=4, max_len=16, dtype=torch.float32)
        slots = torch.tensor([3, 1])  # non-trivial slot assignment
        got = [ours(ids[:, :5], cache=cache, cache_slots=slots)]
        for t in range(5, 12):
            pos = torch.full((2, 1), t)
            got.append(ours(ids[:, t:t + 1], positions=pos, cache=cache, cache_slots=slots))
    assert_close(torch.cat(got, 1), full, "reordered", **forward_chain(ours.config))


def test_logits_index_selects_rows(tiny_llama):
    ours, _ = load_model(tiny_llama)
    ids = token_batch(ours.config.vocab_size, 2, 6)
    idx = torch.tensor([5, 11, 0])
    with torch.no_grad():
        # the same hidden states; only the LM head's GEMM runs on 3 rows instead of 12
        assert_close(ours(ids, logits_index=idx), ours(ids).reshape(12, -1)[idx], "reordered",
                     k=ours.config.hidden_size)


def test_bf16_close_to_fp32(tiny_llama):
    ours32, _ = load_model(tiny_llama)
    ours16, _ = load_model(tiny_llama, dtype=torch.bfloat16)
    ids = token_batch(ours32.config.vocab_size, 2, 10)
    with torch.no_grad():
        a, b = ours32(ids), ours16(ids).float()
    assert b.dtype == torch.float32 and not torch.equal(a, b)
    assert_close(b, a, "rounded", torch.bfloat16, **forward_chain(ours32.config))


@pytest.mark.integration
def test_smollm2_matches_transformers(smollm2_path):
    ours, theirs = _pair(smollm2_path)
    from deltafleet.models.loading import load_tokenizer

    tok = load_tokenizer(smollm2_path)
    prompts = ["The capital of France is", "Once upon a time, in a small village by the sea, there lived",
               "12 + 7 ="]
    enc = [tok(p).input_ids for p in prompts]
    T = max(map(len, enc))
    ids = torch.tensor([e + [0] * (T - len(e)) for e in enc])
    mask = torch.tensor([[1] * len(e) + [0] * (T - len(e)) for e in enc])
    with torch.no_grad():
        a = ours(ids, attention_mask=mask)
        b = theirs(ids, attention_mask=mask).logits
    assert len(set(map(len, enc))) == 3
    assert_close(a[mask.bool()], b[mask.bool()], "reordered", **forward_chain(ours.config))
    assert tok.decode(a[0, len(enc[0]) - 1].argmax()).strip() == "Paris"
