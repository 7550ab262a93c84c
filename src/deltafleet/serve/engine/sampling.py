"""Next-token choice for a batch of rows: greedy, or temperature / top-k / top-p with a per-request seed."""

from __future__ import annotations

import torch
from torch import Tensor

from deltafleet.serve.engine.types import SamplingParams


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """logits (V,) fp32 -> temperature-scaled logits with tokens outside top-k / top-p set to -inf."""
    logits = logits / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def sample(logits: Tensor, params: list[SamplingParams], generators: list[torch.Generator | None]) -> list[int]:
    """logits (M, V) -> one token per row. Greedy rows take the argmax in one batched op."""
    logits = logits.float()
    out = logits.argmax(-1).tolist()
    for i, p in enumerate(params):
        if not p.greedy:
            probs = filter_logits(logits[i], p).softmax(-1)
            out[i] = int(torch.multinomial(probs, 1, generator=generators[i]))
    return out
