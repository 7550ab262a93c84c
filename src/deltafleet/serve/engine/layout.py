"""Batch adapter layout, computed once per engine step and read by every layer (STYLE principle 7).

Rows of the step's (B, T) token batch each belong to one sequence, hence one adapter: a (pool, slot) or the
base model (`NO_ADAPTER`). For each pool that some row uses, `PoolStep` (`pools.py`) holds the per-token gather
index into the pool (the pool's null row for every other token), the member tokens, their segments (tokens grouped
by slot), the widest rank in use and the union of projections the members adapt. The projection hook built from
it applies each active pool through the backend chosen at start-up, with the backend's method for the pool's
family looked up once per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from deltafleet.adapters.serving import NORM
from deltafleet.models.llama import ProjectionHook
from deltafleet.serve.engine.backends import Backend
from deltafleet.serve.engine.pools import Pool, PoolStep
from deltafleet.serve.engine.types import NO_ADAPTER


@dataclass
class BatchLayout:
    num_tokens: int
    pool_steps: list[PoolStep]

    @classmethod
    def build(cls, rows: list[tuple[Pool | None, int]], tokens_per_row: int) -> BatchLayout:
        """rows[b] = (pool, slot) of row b, or (None, NO_ADAPTER) for the base model."""
        T, N = tokens_per_row, len(rows) * tokens_per_row
        by_pool: dict[int, tuple[Pool, list[tuple[int, int]]]] = {}
        for b, (pool, slot) in enumerate(rows):
            if pool is None or slot == NO_ADAPTER:
                continue
            by_pool.setdefault(id(pool), (pool, []))[1].append((b, slot))
        steps = []
        for pool, members in by_pool.values():
            row_index = torch.full((len(rows),), pool.null, dtype=torch.long)
            for b, slot in members:
                row_index[b] = slot
            index = row_index.repeat_interleave(T)
            by_slot = sorted(members, key=lambda m: m[1])
            order = (torch.tensor([b for b, _ in by_slot])[:, None] * T + torch.arange(T)).reshape(-1)
            slots = [s for _, s in by_slot]
            used = set(slots)
            module_sets = list({id(m): m for m in (pool.slot_modules[s] for s in used)}.values())
            counts = torch.bincount(torch.tensor(slots), minlength=slots[-1] + 1) * T
            steps.append(PoolStep(
                pool=pool, index=index,
                members=None if len(members) == len(rows) else order.sort().values,
                order=order, offs=counts.cumsum(0).to(torch.int32),
                width=max(pool.slot_width[s] for s in used),
                modules=module_sets[0] if len(module_sets) == 1 else frozenset().union(*module_sets),
                distinct=len(used),
            ))
        return cls(N, steps)

    def hook(self, backend: Backend) -> ProjectionHook | None:
        if not self.pool_steps:
            return None
        steps = [(st, backend.applier(st.pool.family)) for st in self.pool_steps]

        def apply(layer: int, proj: str, x: Tensor, y: Tensor) -> Tensor:
            key = (layer, proj)
            for st, fn in steps:
                if key in st.modules:
                    y = fn(x, y, st.pool.tensors[key], st)
            return y

        apply.norms = any(st.pool.family == NORM for st in self.pool_steps)  # the model skips norm calls otherwise
        return apply
