"""Validation metrics at the end of a run, on a small validation subset.

- `val_loss`: mean NLL per answer token, teacher-forced (every task);
- `val_accuracy` (exact-match tasks): greedy generation from the chat prompt until the end-of-turn token,
  scored by the task (whitespace-normalised exact match);
- `val_perplexity` (open-text tasks): exp(val_loss).
The metric for a task kind comes from `KIND_METRICS`, one entry per kind.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch

from deltafleet.tasks import Example, Task, encode_example, end_of_turn_id, prompt_ids
from deltafleet.train.data import PRECISION_CONTEXTS, answer_nll, collate


def val_loss(model, causal_lm, tokenizer, examples: Sequence[Example], batch_size: int, max_len: int,
             precision: str) -> float:
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for i in range(0, len(examples), batch_size):
            batch = collate([encode_example(tokenizer, ex) for ex in examples[i : i + batch_size]], pad, max_len)
            with PRECISION_CONTEXTS[precision]():
                total += float(answer_nll(causal_lm, batch))
            count += batch.n_answer_tokens
    return total / count


def greedy_answers(model, tokenizer, examples: Sequence[Example], batch_size: int, max_new_tokens: int,
                   precision: str) -> list[str]:
    """Greedy decoding (transformers `generate`, left-padded batches) of each example's chat prompt."""
    eot = end_of_turn_id(tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eot
    out: list[str] = []
    model.eval()
    for i in range(0, len(examples), batch_size):
        prompts = [prompt_ids(tokenizer, ex.prompt) for ex in examples[i : i + batch_size]]
        T = max(map(len, prompts))
        input_ids = torch.tensor([[pad] * (T - len(p)) + p for p in prompts])  # (B, T) left-padded
        attention_mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad(), PRECISION_CONTEXTS[precision]():
            generated = model.generate(input_ids=input_ids, attention_mask=attention_mask, do_sample=False,
                                       max_new_tokens=max_new_tokens, eos_token_id=eot, pad_token_id=pad)
        out += tokenizer.batch_decode(generated[:, T:], skip_special_tokens=True)
    return out


def _accuracy(task: Task, model, tokenizer, examples, loss: float, batch_size: int,
              precision: str) -> dict[str, float]:
    longest = max(len(encode_example(tokenizer, ex).answer_ids) for ex in examples)
    answers = greedy_answers(model, tokenizer, examples, batch_size, longest + 4, precision)
    return {"val_accuracy": sum(task.score(a, ex) for a, ex in zip(answers, examples, strict=True)) / len(examples)}


def _perplexity(task: Task, model, tokenizer, examples, loss: float, batch_size: int,
                precision: str) -> dict[str, float]:
    return {"val_perplexity": math.exp(loss)}


KIND_METRICS: dict[str, Callable[..., dict[str, float]]] = {"exact_match": _accuracy, "perplexity": _perplexity}


def validation_metrics(task: Task, model, causal_lm, tokenizer, examples: Sequence[Example], batch_size: int,
                       max_len: int, precision: str) -> dict[str, float]:
    loss = val_loss(model, causal_lm, tokenizer, examples, batch_size, max_len, precision)
    metric = KIND_METRICS[task.kind]
    return {"val_loss": loss, **metric(task, model, tokenizer, examples, loss, batch_size, precision)}
