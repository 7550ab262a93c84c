"""`BatchLayout.build` against a per-token reference, on random batches: rows of the base or of (pool, slot), one
token count for all rows or one per row (zero included). The fields every backend reads: the gather index, the
member tokens, their order by slot, the slot offsets, the widest rank, the modules and the distinct slots."""

from __future__ import annotations

import itertools

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltafleet.serve.engine.layout import BatchLayout
from deltafleet.serve.engine.types import NO_ADAPTER


class _Pool:
    """What `build` reads of a pool: its null row and each slot's rank and modules."""

    def __init__(self, slots: int, widths: list[int], modules: list[frozenset]):
        self.null, self.slot_width, self.slot_modules = slots, dict(enumerate(widths)), dict(enumerate(modules))


MODULES = [frozenset({(0, "q_proj"), (1, "k_proj")}), frozenset({(0, "v_proj")}), frozenset({(1, "down_proj")})]


@st.composite
def batches(draw):
    pools = [_Pool(n, draw(st.lists(st.integers(1, 16), min_size=n, max_size=n)),
                   draw(st.lists(st.sampled_from(MODULES), min_size=n, max_size=n))) for n in (6, 3)]
    B = draw(st.integers(1, 10))
    rows = [draw(st.one_of(st.just((None, NO_ADAPTER)),
                           st.sampled_from(pools).flatmap(lambda p: st.tuples(st.just(p), st.integers(0, p.null - 1)))))
            for _ in range(B)]
    counts = draw(st.one_of(st.integers(1, 4), st.lists(st.integers(0, 4), min_size=B, max_size=B)))
    return pools, rows, counts


@settings(max_examples=150, deadline=None)
@given(batches())
def test_build_matches_a_per_token_reference(case):
    pools, rows, counts = case
    layout = BatchLayout.build(rows, counts)
    per_row = [counts] * len(rows) if isinstance(counts, int) else counts
    token_row = [b for b, c in enumerate(per_row) for _ in range(c)]  # the row of each flattened token
    assert layout.num_tokens == len(token_row)
    used_pools = [p for p in pools if any(r[0] is p for r in rows)]
    assert [s.pool for s in layout.pool_steps] == sorted(used_pools, key=lambda p: [r[0] for r in rows].index(p))
    for step in layout.pool_steps:
        p = step.pool
        slot_of = [rows[b][1] if rows[b][0] is p else None for b in token_row]
        assert step.index.dtype == torch.long
        assert step.index.tolist() == [p.null if s is None else s for s in slot_of]
        mine = [t for t, s in enumerate(slot_of) if s is not None]
        assert step.order.tolist() == sorted(mine, key=lambda t: slot_of[t])  # by slot, stable
        member_rows = {b for b, r in enumerate(rows) if r[0] is p}
        assert (step.members is None) == (len(member_rows) == len(rows))
        if step.members is not None:
            assert step.members.tolist() == mine
        slots = {rows[b][1] for b in member_rows}
        per_slot = [sum(per_row[b] for b in member_rows if rows[b][1] == k) for k in range(max(slots) + 1)]
        assert step.offs.dtype == torch.int32 and step.offs.tolist() == list(itertools.accumulate(per_slot))
        assert step.width == max(p.slot_width[k] for k in slots) and step.distinct == len(slots)
        assert step.modules == frozenset().union(*(p.slot_modules[k] for k in slots))
