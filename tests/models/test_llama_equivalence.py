"""Our Transformer equals transformers' LlamaForCausalLM / Qwen2ForCausalLM on the same weights."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from deltafleet.models import KVCache
from deltafleet.models.config import RopeConfig
from deltafleet.models.llama import apply_rope, rope_cos_sin, rope_inv_freq
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


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
def test_decode_without_mask_equals_masked(tiny_checkpoints, name):
    """A decode step whose rows all sit at one position attends every key with no mask (and writes the cache
    through a view when its slots are a slice); rows at different positions need the mask. Each row of a mixed
    batch equals its sequence decoded alone, and both equal the full forward."""
    ours, _ = load_model(tiny_checkpoints[name])
    cfg, lengths, steps = ours.config, torch.tensor([7, 3, 5]), 3
    ids = token_batch(cfg.vocab_size, 3, 10, seed=4)
    slots = torch.tensor([2, 0, 1])
    valid = torch.arange(7) < lengths[:, None]  # right-padded prompts
    with torch.no_grad():
        mixed_cache = KVCache.allocate(cfg, slots=3, max_len=16, dtype=torch.float32)
        ours(ids[:, :7], attention_mask=valid, cache=mixed_cache, cache_slots=slots)
        mixed = []
        for s in range(steps):
            pos = (lengths + s)[:, None]
            assert ours._attention_inputs(pos, pos >= 0, mixed_cache, slots, torch.float32).mask is not None
            mixed.append(ours(ids.gather(1, pos), positions=pos, cache=mixed_cache, cache_slots=slots)[:, 0])
        for b, n in enumerate(lengths.tolist()):
            cache = KVCache.allocate(cfg, slots=3, max_len=16, dtype=torch.float32)
            one = slice(b, b + 1)
            ours(ids[one, :n], cache=cache, cache_slots=one)
            for s in range(steps):
                pos = torch.tensor([[n + s]])
                assert ours._attention_inputs(pos, pos >= 0, cache, one, torch.float32).mask is None
                alone = ours(ids[one, n + s:n + s + 1], positions=pos, cache=cache, cache_slots=one)[0, 0]
                full = ours(ids[one, :n + s + 1])[0, -1]
                assert_close(alone, full, "reordered", **forward_chain(cfg))
                assert_close(mixed[s][b], alone, "reordered", **forward_chain(cfg))


def test_bf16_decode_close_to_fp32(tiny_llama):
    """bf16 prefill and decode steps through a bf16 cache (the decode attention runs in fp32) against fp32."""
    ours32, _ = load_model(tiny_llama)
    ours16, _ = load_model(tiny_llama, dtype=torch.bfloat16)
    ids = token_batch(ours32.config.vocab_size, 2, 10, seed=5)
    slots = torch.tensor([1, 0])
    with torch.no_grad():
        cache = KVCache.allocate(ours16.config, slots=2, max_len=16, dtype=torch.bfloat16)
        got = [ours16(ids[:, :6], cache=cache, cache_slots=slots)]
        for t in range(6, 10):
            got.append(ours16(ids[:, t:t + 1], positions=torch.full((2, 1), t), cache=cache, cache_slots=slots))
        expected = ours32(ids)
    got = torch.cat(got, 1).float()
    assert not torch.equal(got, expected)
    assert_close(got, expected, "rounded", torch.bfloat16, **forward_chain(ours32.config))


def test_apply_rope_equals_rotate_half():
    """The roll and sign-folded sin of `apply_rope` against HF's x * cos + rotate_half(x) * sin, llama3 scaling."""
    rope = RopeConfig(theta=500000.0, rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                      original_max_position_embeddings=64)
    hd = 32
    inv_freq = rope_inv_freq(rope, hd)
    positions = torch.tensor([[0, 5, 17, 300], [2, 3, 4, 1000]])  # (B, T)
    x = torch.randn(2, 4, 3, hd, generator=torch.Generator().manual_seed(0))  # (B, T, n, hd)
    freqs = positions.float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), -1)[:, :, None]  # HF's cos and sin are emb.cos(), emb.sin()
    x1, x2 = x.chunk(2, -1)
    expected = x * emb.cos() + torch.cat((-x2, x1), -1) * emb.sin()
    for dtype in (torch.float32, torch.bfloat16):
        got = apply_rope(x.to(dtype), *rope_cos_sin(positions, inv_freq, dtype))
        assert_close(got.float(), expected, "reordered" if dtype == torch.float32 else "rounded", dtype, k=2)


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


@pytest.mark.parametrize("name", sorted(TINY_CONFIGS))
@pytest.mark.parametrize("pad", [0, 5])
def test_ragged_step_equals_each_sequence_alone(tiny_checkpoints, name, pad):
    """A ragged call (`seq_lens`): decode tokens and prompt chunks of several lengths laid end to end (then `pad`
    padding tokens) in one forward, each sequence at its own cache prefix. Its logits equal each sequence's chunk
    run alone, the KV cache ends the same, and padding writes nothing."""
    ours, _ = load_model(tiny_checkpoints[name])
    cfg = ours.config
    ids = token_batch(cfg.vocab_size, 6, 12, seed=6)
    done = [5, 2, 0, 9, 3, 7]  # tokens already in each sequence's cache
    lens = [1, 1, 6, 1, 4, 1]  # two decode tokens at different positions, a first chunk, a decode token, a later
    slots = torch.tensor([3, 4, 0, 2, 1, 6])  # chunk, a decode token; consecutive slots are read as a view
    with torch.no_grad():
        cache = KVCache.allocate(cfg, slots=7, max_len=16, dtype=torch.float32)
        alone_cache = KVCache.allocate(cfg, slots=7, max_len=16, dtype=torch.float32)
        for b, n in enumerate(done):
            if n:
                for c in (cache, alone_cache):
                    ours(ids[b:b + 1, :n], cache=c, cache_slots=slots[b:b + 1])
        chunks = list(enumerate(zip(done, lens, strict=True)))
        flat = torch.cat([ids[b, d:d + n] for b, (d, n) in chunks] + [torch.ones(pad, dtype=torch.long)])
        pos = torch.cat([torch.arange(d, d + n) for _, (d, n) in chunks] + [torch.zeros(pad, dtype=torch.long)])
        snapshot = cache.k[:, 5].clone()  # slot 5 belongs to nobody: padding must not write there (or anywhere)
        got = ours(flat[None], positions=pos[None], cache=cache, cache_slots=slots, seq_lens=torch.tensor(lens))[0]
        start = 0
        for b, (d, n) in chunks:
            alone = ours(ids[b:b + 1, d:d + n], positions=torch.arange(d, d + n)[None], cache=alone_cache,
                         cache_slots=slots[b:b + 1])[0]
            assert_close(got[start:start + n], alone, "reordered", **forward_chain(cfg))
            start += n
        assert got.shape[0] == sum(lens) + pad
        for b, (d, n) in chunks:
            s = int(slots[b])
            assert_close(cache.k[:, s, :, :d + n], alone_cache.k[:, s, :, :d + n], "reordered",
                         **forward_chain(cfg))
        assert torch.equal(cache.k[:, 5], snapshot) and torch.equal(cache.k[:, :, :, 13:], alone_cache.k[:, :, :, 13:])
        groups = ours._ragged_inputs(pos[None], torch.tensor(lens), cache, slots, torch.float32).groups
        assert [(g.start, g.rows, g.queries) for g in groups] == [(0, 2, 1), (2, 1, 6), (8, 1, 1), (9, 1, 4),
                                                                   (13, 1, 1)]
        assert groups[0].read_at[0] == slice(3, 5) and groups[0].mask is not None and groups[2].mask is None


def test_ragged_call_refuses_what_it_cannot_run(tiny_llama):
    ours, _ = load_model(tiny_llama)
    cache = KVCache.allocate(ours.config, slots=2, max_len=8, dtype=torch.float32)
    ids, pos = torch.ones(1, 4, dtype=torch.long), torch.arange(4)[None]
    with torch.no_grad():
        for kw, match in [(dict(seq_lens=torch.tensor([2, 3])), "cover at most"),
                          (dict(seq_lens=torch.tensor([0, 2])), "each >= 1"),
                          (dict(seq_lens=torch.tensor([2, 2]), cache_slots=slice(0, 2)), "cache_slots as a"),
                          (dict(seq_lens=torch.tensor([4]), cache_slots=torch.tensor([0]),
                                positions=torch.arange(6, 10)[None]), "exceeds the KV cache")]:
            args = dict(positions=pos, cache=cache, cache_slots=torch.tensor([0, 1])) | kw
            with pytest.raises(ValueError, match=match):
                ours(ids, **args)
        with pytest.raises(ValueError, match="no attention_mask"):
            ours(ids, positions=pos, attention_mask=torch.ones(1, 4), cache=cache, cache_slots=torch.tensor([0]),
                 seq_lens=torch.tensor([4]))
