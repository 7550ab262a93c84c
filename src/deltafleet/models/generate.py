"""Greedy generation for one sequence with a KV cache: the simple reference the engine is checked against."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from deltafleet.models.llama import KVCache, ProjectionHook, Transformer


@torch.inference_mode()
def greedy_stream(model: Transformer, prompt: Sequence[int], max_new_tokens: int,
                  stop_ids: Sequence[int] = (), hook: ProjectionHook | None = None) -> Iterator[int]:
    """Yield up to `max_new_tokens` greedy tokens after `prompt`; stops after emitting a token in `stop_ids`."""
    cfg = model.config
    dtype = model.compute_dtype
    cache = KVCache.allocate(cfg, 1, len(prompt) + max_new_tokens, dtype)
    slots = torch.zeros(1, dtype=torch.long)
    ids = torch.tensor([list(prompt)])
    pos = torch.arange(len(prompt))[None]
    last = torch.tensor([len(prompt) - 1])
    for _ in range(max_new_tokens):
        logits = model(ids, positions=pos, cache=cache, cache_slots=slots, hook=hook, logits_index=last)
        tok = int(logits[0].float().argmax())
        yield tok
        if tok in stop_ids:
            return
        next_pos = int(pos[0, -1]) + 1
        ids, pos, last = torch.tensor([[tok]]), torch.tensor([[next_pos]]), torch.tensor([0])


def greedy_generate(model: Transformer, prompt: Sequence[int], max_new_tokens: int,
                    stop_ids: Sequence[int] = (), hook: ProjectionHook | None = None) -> list[int]:
    return list(greedy_stream(model, prompt, max_new_tokens, stop_ids, hook))
