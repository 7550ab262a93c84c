"""Batch adapter layout, computed once per engine step and read by every layer (STYLE principle 7).

Rows of the step's (B, T) token batch each belong to one sequence, hence one adapter: a (pool, slot) or the
base model (`NO_ADAPTER`). For each pool that some row uses, `PoolStep` (`pools.py`) holds the per-token gather
index into the pool (the pool's null row for every other token), the member tokens, their segments (tokens grouped
by slot), the widest rank in use and the union of projections the members adapt. The projection hook built from
it applies each active pool through the backend chosen at start-up, with the backend's method for the pool's
family looked up once per step.

A whole fine-tune's model-level modules (`adapters.serving`) go through the same hook: its RMSNorm gain deltas
with the backend's norm method, its table at the embedding lookup (`Backend.apply_embedding`) and on the LM head's
logits (the additive method, over the rows `logits_index` keeps, each table at its own rank).
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor

from deltafleet.adapters.serving import NORM
from deltafleet.models.config import GAIN_NORMS, MODEL_LAYER
from deltafleet.models.llama import ProjectionHook
from deltafleet.serve.engine.backends import Backend
from deltafleet.serve.engine.pools import Pool, PoolStep
from deltafleet.serve.engine.types import NO_ADAPTER


@dataclass
class BatchLayout:
    num_tokens: int
    pool_steps: list[PoolStep]
    rows: list[tuple[Pool | None, int]] = field(default_factory=list)
    tokens_per_row: int | list[int] = 1

    @classmethod
    def build(cls, rows: list[tuple[Pool | None, int]], tokens_per_row: int | list[int]) -> BatchLayout:
        """rows[b] = (pool, slot) of row b, or (None, NO_ADAPTER) for the base model. `tokens_per_row`: each row's
        token count, one for all (a (B, T) batch, flattened row-major) or one per row (rows laid end to end: a
        ragged step, `Transformer.forward(seq_lens=...)`)."""
        counts = [tokens_per_row] * len(rows) if isinstance(tokens_per_row, int) else list(tokens_per_row)
        if len(counts) != len(rows):
            raise ValueError(f"{len(counts)} token counts for {len(rows)} rows")
        # Python lists, one tensor each at the end: built every step, so per-element tensor ops would cost more
        # than the step's kernels save (32 rows, 3 pools: 0.72 ms with tensor ops)
        starts = list(itertools.accumulate(counts, initial=0))  # first token of each row; starts[-1] = N
        N = starts[-1]
        one_each = all(c == 1 for c in counts)
        by_pool: dict[int, tuple[Pool, list[tuple[int, int]]]] = {}
        for b, (pool, slot) in enumerate(rows):
            if pool is None or slot == NO_ADAPTER:
                continue
            by_pool.setdefault(id(pool), (pool, []))[1].append((b, slot))
        steps = []
        for pool, members in by_pool.values():
            row_index = [pool.null] * len(rows)
            for b, slot in members:
                row_index[b] = slot
            index = torch.tensor(row_index if one_each else
                                 [k for k, c in zip(row_index, counts, strict=True) for _ in range(c)],
                                 dtype=torch.long)
            by_slot = sorted(members, key=lambda m: m[1])
            order = [t for b, _ in by_slot for t in range(starts[b], starts[b + 1])]  # member tokens by slot
            slots = [s for _, s in by_slot]
            used = set(slots)
            module_sets = list({id(m): m for m in (pool.slot_modules[s] for s in used)}.values())
            per_slot = [0] * (slots[-1] + 1)
            for b, slot in members:
                per_slot[slot] += counts[b]
            steps.append(PoolStep(
                pool=pool, index=index,
                members=None if len(members) == len(rows) else torch.tensor(sorted(order), dtype=torch.long),
                order=torch.tensor(order, dtype=torch.long),
                offs=torch.tensor(list(itertools.accumulate(per_slot)), dtype=torch.int32),
                width=max(pool.slot_width[s] for s in used),
                modules=module_sets[0] if len(module_sets) == 1 else frozenset().union(*module_sets),
                distinct=len(used),
            ))
        return cls(N, steps, list(rows), tokens_per_row)

    def row_of_token(self, i: int) -> int:
        """The row that flattened token `i` belongs to."""
        if isinstance(self.tokens_per_row, int):
            return i // self.tokens_per_row
        return bisect.bisect_right(list(itertools.accumulate(self.tokens_per_row)), i)

    def hook(self, backend: Backend, logits_index: Tensor | None = None) -> ProjectionHook | None:
        """The step's projection hook; `logits_index`: the flattened token rows the LM head runs on (as passed to
        the model), needed when a member's delta changes the LM head."""
        if not self.pool_steps:
            return None
        steps = [(st, backend.applier(st.pool.family)) for st in self.pool_steps]
        gain = backend.applier(NORM)
        logit_steps: dict[int, PoolStep] = {}

        def model_level(layer: int, proj: str, x: Tensor, y: Tensor) -> Tensor:
            key = (layer, proj)
            for st, _ in steps:
                if proj in GAIN_NORMS:
                    if key in st.modules:
                        y = gain(x, y, st.pool.tensors[key], st)
                    continue
                table = (MODEL_LAYER, "lm_head" if st.pool.cfg.tie_word_embeddings else proj)
                if table not in st.modules:
                    continue
                tensors = st.pool.tensors[table]
                if proj == "embed_tokens":
                    y = backend.apply_embedding(x, y, tensors, st)
                    continue
                sub = self._logit_step(st, logits_index, logit_steps)
                if sub is not None:  # else no row the LM head runs on uses this pool
                    y = backend.applier(st.pool.family)(x, y, tensors, sub)
            return y

        table = backend.fused_table(self.pool_steps)  # projection -> one fused call for its pools, across steps
        if table is not None:
            backend.prepare(self.pool_steps)

        def planned(entry, key, fuse, *args):
            """The table's fused call for `entry` (a module key, or ("norm", key)), made at its first call over
            these pools from the pools adapting `key`: `fuse(members, *args)`, or _NO_MEMBERS when none does."""
            fused = table.get(entry, _UNPLANNED)
            if fused is _UNPLANNED:
                members = [(st, st.pool.tensors[key]) for st, _ in steps if key in st.modules]
                fused = table[entry] = fuse(members, *args) if members else _NO_MEMBERS
            return fused

        def apply(layer: int, proj: str, x: Tensor, y: Tensor) -> Tensor:
            if layer == MODEL_LAYER or proj in GAIN_NORMS:
                return model_level(layer, proj, x, y)
            key = (layer, proj)
            if table is not None:
                fused = planned(key, key, backend.fuse, x, y)
                if fused is _NO_MEMBERS or (fused is not None and fused(x, y)):
                    return y
            for st, fn in steps:  # each pool its own way (no fused call, or this call does not fit it)
                if key in st.modules:
                    y = fn(x, y, st.pool.tensors[key], st)
            return y

        def whole_norm(layer: int, name: str, norm, x: Tensor) -> Tensor | None:
            """The norm and its gains in one fused call (`Backend.fuse_norm`), or None: then `apply` takes it."""
            fused = planned(("norm", (layer, name)), (layer, name), backend.fuse_norm, norm, x)
            return None if fused is None or fused is _NO_MEMBERS else fused(norm, x)

        if table is not None:
            apply.norm = whole_norm
        modules = [k for st in self.pool_steps for k in st.modules]
        # the model skips norm (and model-level) calls unless the hook asks for them
        apply.norms = any(st.pool.family == NORM for st in self.pool_steps) or any(n in GAIN_NORMS for _, n in modules)
        apply.model_level = any(layer == MODEL_LAYER for layer, _ in modules)
        return apply

    def _logit_step(self, st: PoolStep, logits_index: Tensor | None,
                    cache: dict[int, PoolStep | None]) -> PoolStep | None:
        """`st` over the LM head's rows (those `logits_index` keeps; None if none is a member), at the width of
        the pool's LM-head table."""
        if id(st) not in cache:
            sub: PoolStep | None = st
            every_row = logits_index is not None and logits_index.numel() == self.num_tokens and \
                bool((logits_index == torch.arange(self.num_tokens)).all())  # a decode step: every token
            if logits_index is not None and not every_row:
                rows = [self.rows[self.row_of_token(i)] for i in logits_index.tolist()]
                sub = next((s for s in BatchLayout.build(rows, 1).pool_steps if s.pool is st.pool), None)
            table = st.pool.tensors[(MODEL_LAYER, "lm_head")]
            width = (table["A"] if "A" in table else table["bits"]).shape[1]  # additive or qadditive rows
            cache[id(st)] = None if sub is None else replace(sub, width=width)
        return cache[id(st)]


_UNPLANNED, _NO_MEMBERS = object(), object()  # fused-table markers: not looked at yet; no pool adapts the projection
