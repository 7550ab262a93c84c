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
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from deltafleet.errors import DeltafleetError
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
    x = torch.tensor(ids)
    spans = windows(len(ids), window, stride, max_windows)
    nll, tokens = 0.0, 0
    for i in range(0, len(spans), batch_size):
        group = spans[i : i + batch_size]
        T = max(end - begin for begin, end, _ in group)
        input_ids = torch.zeros((len(group), T), dtype=torch.long)
        mask = torch.zeros((len(group), T), dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, (begin, end, first) in enumerate(group):
            input_ids[b, : end - begin] = x[begin:end]
            mask[b, : end - begin] = 1
            # target x_t is predicted at column t - 1 - begin
            for t in range(first, end + 1):
                rows.append(b)
                cols.append(t - 1 - begin)
                targets.append(ids[t])
        flat = torch.tensor(rows) * T + torch.tensor(cols)  # (M,) positions in the flattened (B*T) batch
        logits = model(input_ids, attention_mask=mask, hook=hook, logits_index=flat)  # (M, V)
        nll += float(F.cross_entropy(logits.float(), torch.tensor(targets), reduction="sum"))
        tokens += len(targets)
    return {"nll": nll, "tokens": tokens, "ppl": math.exp(nll / tokens), "windows": len(spans)}
