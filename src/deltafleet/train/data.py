"""Batches for answer-only training, the data order, and the answer-token loss.

Shapes: B examples, T tokens (the longest example of the batch), H hidden, V vocabulary, N answer tokens.

    input_ids       (B, T)  prompt ids then answer ids, right-padded with pad_id
    attention_mask  (B, T)  1 on real tokens, 0 on padding
    labels          (B, T)  the token on answer positions, -100 on prompt and padding

The data order is a pure function of (seed, sample number): sample g of the run is example
`perm_e[g mod n]` of the train split, where `perm_e` is the seeded permutation of epoch e = g div n. A resumed
run therefore sees exactly the batches an uninterrupted one would.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from deltafleet.errors import DeltafleetError
from deltafleet.tasks import EncodedExample

IGNORE = -100
# precision -> a fresh context for forward passes. bf16: autocast matmuls to bfloat16, weights stay fp32.
PRECISION_CONTEXTS: dict[str, Callable[[], contextlib.AbstractContextManager]] = {
    "bf16": lambda: torch.autocast("cpu", dtype=torch.bfloat16),
    "fp32": contextlib.nullcontext,
}


@dataclass(frozen=True)
class Batch:
    input_ids: Tensor  # (B, T) int64
    attention_mask: Tensor  # (B, T) int64
    labels: Tensor  # (B, T) int64, IGNORE outside answers

    @property
    def n_answer_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())

    @property
    def n_tokens(self) -> int:
        return int(self.attention_mask.sum())


def collate(examples: Sequence[EncodedExample], pad_id: int, max_len: int) -> Batch:
    """Right-padded batch; an example longer than max_len loses the tail of its answer (never its prompt)."""
    rows = []
    for ex in examples:
        keep = max_len - len(ex.prompt_ids)
        if keep <= 0:
            raise DeltafleetError(f"max_seq_len={max_len}: a prompt has {len(ex.prompt_ids)} tokens; "
                                  f"raise max_seq_len above the longest prompt")
        rows.append((list(ex.prompt_ids), list(ex.answer_ids[:keep])))
    T = max(len(p) + len(a) for p, a in rows)
    input_ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (p, a) in enumerate(rows):
        n = len(p) + len(a)
        input_ids[i, :n] = torch.tensor(p + a)
        attention_mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(a)
    return Batch(input_ids, attention_mask, labels)


@functools.lru_cache(maxsize=4)
def _permutation(n: int, seed: int, epoch: int) -> tuple[int, ...]:
    order = list(range(n))
    random.Random(f"data/{seed}/{epoch}").shuffle(order)
    return tuple(order)


def example_indices(n: int, seed: int, first: int, count: int) -> list[int]:
    """Train-split indices of samples first .. first+count-1 of the run (each epoch a fresh permutation)."""
    return [_permutation(n, seed, g // n)[g % n] for g in range(first, first + count)]


def answer_nll(causal_lm, batch: Batch) -> Tensor:
    """Sum over answer tokens of -log p(token | previous tokens), fp32 scalar.

    Runs the decoder on the whole batch (B, T, H) but the LM head only on the N positions that predict an
    answer token: hidden (B, T-1, H) at labels[:, 1:] != IGNORE -> (N, H) -> logits (N, V).
    `causal_lm` is a Llama-family transformers model (`.model` decoder, `.lm_head`), peft layers included.
    """
    hidden = causal_lm.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             use_cache=False).last_hidden_state  # (B, T, H)
    targets = batch.labels[:, 1:]  # (B, T-1)
    mask = targets != IGNORE
    logits = causal_lm.lm_head(hidden[:, :-1][mask])  # (N, V)
    return F.cross_entropy(logits.float(), targets[mask], reduction="sum")
