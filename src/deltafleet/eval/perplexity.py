"""Held-out perplexity of any text through our `Transformer`, optionally with an adapter's projection hook.

The text is tokenized once (no special tokens added): ids x_0 .. x_{N-1}. Windows of `window` input tokens
start every `stride` tokens; window k reads x[b : b + window] (b = k * stride) and predicts the next token at
each position, i.e. targets x[b + 1 : b + window + 1]. Every target x_t (t >= 1) is scored exactly once, in the
first window that predicts it, so with `stride == window` (the default) windows do not overlap and each token
has between 0 and window - 1 tokens of context; with a smaller stride every token after the first window has
at least `window - stride` tokens of context (the sliding-window evaluation of the transformers docs, "Perplexity
of fixed-length models"), at `window / stride` times the compute.

    nll    = sum over scored t of -log p(x_t | x_b .. x_{t-1})   (nats, fp32 log-softmax)
    tokens = number of scored targets (N - 1 when no `max_windows` cap cuts the text short)
    ppl    = exp(nll / tokens)

Windows run `batch_size` at a time (right-padded; the LM head runs only on the scored positions).

`windows_perplexity` scores given windows (N, T) instead (the low-bit tables: `tasks.text.token_windows` of the
Shakespeare test plays): every token after the first of each window, given its window prefix. Both go through
one scoring loop over `eval.core.transformer_logits`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from deltafleet.errors import DeltafleetError
from deltafleet.eval.core import LogitsAt, transformer_logits
from deltafleet.models.llama import ProjectionHook, Transformer


def windows(n_tokens: int, window: int, stride: int, max_windows: int | None = None) -> list[tuple[int, int, int]]:
    """(begin, end, first_scored) per window over ids of length `n_tokens`: inputs ids[begin:end] predict
    targets begin+1 .. end; targets before `first_scored` were scored by an earlier window."""
    out: list[tuple[int, int, int]] = []
    scored_up_to = 1  # x_0 has no context and is never a target
    begin = 0
    while scored_up_to < n_tokens and (max_windows is None or len(out) < max_windows):
        end = min(begin + window, n_tokens - 1)  # last input; its target is x_end
        out.append((begin, end, scored_up_to))
        scored_up_to = end + 1
        begin += stride
    return out


@torch.inference_mode()
def perplexity(model: Transformer, tokenizer, text: str, *, hook: ProjectionHook | None = None, window: int = 256,
               stride: int | None = None, max_windows: int | None = None, batch_size: int = 8) -> dict:
    """Perplexity of `text` (see the module docstring); returns {"nll", "tokens", "ppl", "windows"}.

    `hook` is a `ProjectionHook` (e.g. `Adapter.hook()`) applied to every forward; `max_windows` scores only
    the first that many windows (a quick estimate on a long file)."""
    stride = window if stride is None else stride
    if window < 1:
        raise DeltafleetError(f"window={window}: must be >= 1")
    if not 1 <= stride <= window:
        raise DeltafleetError(f"stride={stride}: must be in [1, window={window}]")
    if max_windows is not None and max_windows < 1:
        raise DeltafleetError(f"max_windows={max_windows}: must be >= 1")
    if batch_size < 1:
        raise DeltafleetError(f"batch_size={batch_size}: must be >= 1")
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if len(ids) < 2:
        raise DeltafleetError(f"text has {len(ids)} token(s): perplexity needs at least 2")
    spans = windows(len(ids), window, stride, max_windows)
    # target x_t (first <= t <= end) is predicted at column t - 1 - begin of the window x[begin:end]
    rows = [(ids[begin:end], list(range(first - 1 - begin, end - begin)), ids[first:end + 1])
            for begin, end, first in spans]
    nll, tokens = _score(transformer_logits(model, hook), rows, batch_size)
    return {"nll": nll, "tokens": tokens, "ppl": math.exp(nll / tokens), "windows": len(spans)}


@torch.inference_mode()
def windows_perplexity(model: Transformer, windows: Tensor, hook: ProjectionHook | None = None,
                       batch_size: int = 8) -> float:
    """windows (N, T) -> exp(mean NLL of tokens 1..T-1 of each window given its prefix), fp32 log-softmax."""
    T = windows.shape[1]
    rows = [(w.tolist(), list(range(T - 1)), w[1:].tolist()) for w in windows]
    nll, tokens = _score(transformer_logits(model, hook), rows, batch_size)
    return math.exp(nll / tokens)


def _score(logits_at: LogitsAt, rows: list[tuple[list[int], list[int], list[int]]],
           batch_size: int) -> tuple[float, int]:
    """rows: (input ids, scored columns, their targets) -> (sum of -log p(target), number of targets)."""
    nll, tokens = 0.0, 0
    for i in range(0, len(rows), batch_size):
        group = rows[i : i + batch_size]
        T = max(len(inp) for inp, _, _ in group)
        input_ids = torch.zeros((len(group), T), dtype=torch.long)
        mask = torch.zeros((len(group), T), dtype=torch.long)
        where, targets = [], []
        for b, (inp, cols, tgt) in enumerate(group):
            input_ids[b, : len(inp)] = torch.tensor(inp)
            mask[b, : len(inp)] = 1
            where += [b * T + c for c in cols]  # positions in the flattened (B*T) batch
            targets += tgt
        logits = logits_at(input_ids, mask, torch.tensor(where))  # (M, V)
        nll += float(F.cross_entropy(logits.float(), torch.tensor(targets), reduction="sum"))
        tokens += len(targets)
    return nll, tokens
