"""Next-token choice for a batch of rows: greedy, or temperature / top-k / top-p with a per-request seed.

Rows fail alone: a row whose logits hold inf/NaN (an adapter with broken weights, an overflowing model) or whose
sampling raises gets a `RowFailure` in place of its token, and every other row of the batch gets its token.

Any temperature > 0 is numerically safe. A sampled row is filtered in float64 (in float32 a temperature below
~1e-45 rounds to 0 and gives 0/0), and the logits are shifted by their maximum before the division, so every scaled
logit is <= 0 (the best token exactly 0) and a tiny temperature overflows only towards -inf: the distribution
tends to greedy, never to inf/NaN. The shift leaves softmax, top-k and top-p unchanged. Temperatures below
`GREEDY_BELOW` (the smallest normal float64, ~2.2e-308) are served greedy, their limit: they are subnormal floats,
which a CPU in flush-to-zero mode (as code built with -ffast-math sets it) reads as 0.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import torch
from torch import Tensor

from deltafleet.serve.engine.types import SamplingParams

NON_FINITE = "non-finite logits (the forward pass produced inf/NaN)"
GREEDY_BELOW = sys.float_info.min  # temperatures in (0, GREEDY_BELOW) are served greedy


@dataclass(frozen=True)
class RowFailure:
    """Why one row got no token (a value, never raised): only that row's request fails."""

    message: str

    def __str__(self) -> str:
        return self.message


def filter_logits(logits: Tensor, params: SamplingParams) -> Tensor:
    """logits (V,) finite -> temperature-scaled fp64 logits (max 0) with tokens outside top-k / top-p at -inf."""
    logits = logits.double()
    logits = (logits - logits.max()) / params.temperature
    if params.top_k > 0 and params.top_k < logits.shape[-1]:
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop = cum - sorted_logits.softmax(-1) >= params.top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return logits


def finite_rows(logits: Tensor) -> list[bool]:
    """logits (M, V) -> whether each row is all finite. A row sum is the cheap screen (inf/NaN anywhere makes it
    non-finite); only rows it flags are checked element-wise, since a sum of huge finite logits can overflow."""
    ok = torch.isfinite(logits.sum(-1)).tolist()
    return [good or bool(torch.isfinite(logits[i]).all()) for i, good in enumerate(ok)]


def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """logits (V,) finite -> one token drawn from the filtered distribution."""
    probs = filter_logits(logits, params).softmax(-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def sample(logits: Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int | RowFailure]:
    """logits (M, V) -> one token per row, or a `RowFailure` for a row that could not be sampled (its logits
    are not finite, or its sampling raised). Greedy rows take the argmax in one batched op."""
    logits = logits.float()
    out: list[int | RowFailure] = logits.argmax(-1).tolist()
    for i, (finite, p) in enumerate(zip(finite_rows(logits), params, strict=True)):
        if not finite:
            out[i] = RowFailure(NON_FINITE)
        elif not (p.greedy or p.temperature < GREEDY_BELOW):
            try:
                out[i] = sample_row(logits[i], p, generators[i])
            except Exception as e:  # noqa: BLE001 (one row's failure must not fail the batch)
                out[i] = RowFailure(f"sampling failed: {type(e).__name__}: {e}")
    return out
