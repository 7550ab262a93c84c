"""Answer-only batches, the answer-token loss against transformers' own loss, data order, lr schedule."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from deltafleet.errors import DeltafleetError
from deltafleet.tasks import TASKS, encode_example
from deltafleet.train.data import IGNORE, answer_nll, collate, example_indices
from deltafleet.train.recipe import lr_at
from tests.conftest import assert_close


def _encoded(tokenizer, n=3, task="json-field"):
    return [encode_example(tokenizer, ex) for ex in TASKS[task].examples("train", n=n)]


def test_collate_masks_prompt_and_padding(smollm2_tokenizer):
    encoded = _encoded(smollm2_tokenizer)
    batch = collate(encoded, pad_id=2, max_len=512)
    B, T = batch.input_ids.shape
    assert B == 3 and max(map(len, encoded)) == T
    for i, ex in enumerate(encoded):
        P, A = len(ex.prompt_ids), len(ex.answer_ids)
        assert batch.input_ids[i, : P + A].tolist() == list(ex.prompt_ids + ex.answer_ids)
        assert (batch.labels[i, :P] == IGNORE).all() and (batch.labels[i, P + A :] == IGNORE).all()
        assert batch.labels[i, P : P + A].tolist() == list(ex.answer_ids)
        assert batch.attention_mask[i].tolist() == [1] * (P + A) + [0] * (T - P - A)
        assert (batch.input_ids[i, P + A :] == 2).all()
    assert batch.n_answer_tokens == sum(len(e.answer_ids) for e in encoded)
    assert batch.n_tokens == sum(map(len, encoded))


def test_collate_cuts_long_answers_never_prompts(smollm2_tokenizer):
    ex = _encoded(smollm2_tokenizer, n=1, task="shakespeare")[0]
    P = len(ex.prompt_ids)
    batch = collate([ex], pad_id=2, max_len=P + 3)
    assert batch.labels[0, P:].tolist() == list(ex.answer_ids[:3])
    with pytest.raises(DeltafleetError, match=f"max_seq_len={P}: a prompt has {P} tokens"):
        collate([ex], pad_id=2, max_len=P)


def test_answer_nll_equals_transformers_loss(chat_tiny, smollm2_tokenizer):
    """The fast path (LM head on answer positions only) against the model's own full-logits loss."""
    model = AutoModelForCausalLM.from_pretrained(str(chat_tiny), dtype=torch.float32).eval()
    batch = collate(_encoded(smollm2_tokenizer, n=5, task="sort"), pad_id=2, max_len=512)
    with torch.no_grad():
        got = answer_nll(model, batch)
        ref = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
    assert got.dtype == torch.float32 and got > 0
    # the same hidden states; the LM head on the answer rows only (K = hidden), then a log-softmax over the vocab
    assert_close(got / batch.n_answer_tokens, ref, "reordered", k=model.config.hidden_size, depth=2)


def test_data_order_is_a_function_of_the_sample_number():
    n, seed = 7, 3
    run = example_indices(n, seed, 0, 21)
    assert sorted(run[:7]) == sorted(run[7:14]) == sorted(run[14:]) == list(range(7))  # each epoch a permutation
    assert run[7:14] != run[:7]
    assert example_indices(n, seed, 10, 11) == run[10:]  # what a resumed run sees
    assert example_indices(n, seed + 1, 0, 7) != run[:7]


def test_lr_schedule_warms_up_then_decays_to_zero():
    lrs = [lr_at(s, total=10, warmup=2, peak=1.0) for s in range(10)]
    assert lrs[:2] == [0.5, 1.0]
    assert lrs[2] == 1.0 and all(a > b for a, b in zip(lrs[2:], lrs[3:], strict=False))
    assert lrs[-1] == 1.0 / 8
    assert lr_at(0, total=5, warmup=0, peak=2.0) == 2.0
