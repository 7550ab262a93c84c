"""`native.Chain`: one C call applying several pools' bound kernels (LoRA BGMV, RoAd, quantized BGMV) to one projection
equals calling each bound kernel in turn, bit for bit; its pools' steps come from `PoolRecord`s written per batch, so
one chain serves batches of any size and assignment; and it declines (returns False, y untouched) whenever the batch
does not fit: a record of another batch size, a bad index, x or y of another dtype, shape or layout."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from deltafleet import native
from tests.native.test_qlora_kernel import IN, OUT, PLANS, G, _pool

S, R = 5, 8  # LoRA and RoAd slots (the last one null)


def _kernels(dtype):
    g = torch.Generator().manual_seed(7)
    A, B = torch.randn(S, R, IN, generator=g).to(dtype), torch.randn(S, R, OUT, generator=g).to(dtype)
    A[-1], B[-1] = 0, 0
    c, s = torch.randn(S, OUT, generator=g).to(dtype), torch.randn(S, OUT, generator=g).to(dtype)
    c[-1], s[-1] = 1, 0
    qpool, qnull = _pool(PLANS)
    return [(native.BoundBgmv.bind(A, B), S - 1, R), (native.BoundRoad.bind(c, s, 64), S - 1, 64),
            (native.BoundQBgmv.bind(qpool, IN, OUT, G), qnull, 1)]


def _split(owner: list[int], slots: list[int], nulls: list[int]) -> list[torch.Tensor]:
    """Each pool's index: token i uses pool owner[i] (-1: none) at slot slots[i]."""
    return [torch.tensor([s % null if o == p else null for o, s in zip(owner, slots, strict=True)])
            for p, null in enumerate(nulls)]


def _each(kernels, indexes, x, y, widths):
    y = y.clone()
    (bgmv, bnull, _), (road, rnull, _), (qbgmv, qnull, _) = kernels
    assert bgmv(x, y, indexes[0], widths[0], bnull)
    assert road(y, indexes[1], rnull)
    assert qbgmv(x, y, indexes[2], qnull)
    return y


def _chain(kernels, dtype):
    records = [native.PoolRecord(width) for _, _, width in kernels]
    links = [k.link(dtype, IN, OUT, rec) for (k, _, _), rec in zip(kernels, records, strict=True)]
    return native.Chain.build(links, IN, OUT, dtype, [k for k, _, _ in kernels] + records), records


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_a_chain_equals_its_kernels_in_turn(dtype, data):
    kernels = _kernels(dtype)
    chain, records = _chain(kernels, dtype)
    assert chain is not None
    for _ in range(2):  # the same chain over two batches: only the records change
        n = data.draw(st.integers(1, 24))
        owner = data.draw(st.lists(st.integers(-1, 2), min_size=n, max_size=n))
        slots = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
        width = data.draw(st.integers(0, R))
        nulls = [null for _, null, _ in kernels]
        indexes = _split(owner, slots, nulls)
        g = torch.Generator().manual_seed(n)
        x, y = torch.randn(n, IN, generator=g).to(dtype), torch.randn(n, OUT, generator=g).to(dtype)
        want = _each(kernels, indexes, x, y, [width, 0, 0])
        for rec, index, null, w in zip(records, indexes, nulls, [width, 64, 1], strict=True):
            assert rec.set(index, null, w)
        got = y.clone()
        assert chain(x, got)
        assert torch.equal(got, want)


def test_a_chain_declines_a_batch_that_does_not_fit_and_leaves_y_alone():
    dtype = torch.bfloat16
    kernels = _kernels(dtype)
    chain, records = _chain(kernels, dtype)
    n, nulls = 6, [null for _, null, _ in kernels]
    indexes = _split([0, 1, 2, 0, -1, 2], [0, 1, 2, 3, 0, 1], nulls)
    for rec, index, null, w in zip(records, indexes, nulls, [R, 64, 1], strict=True):
        assert rec.set(index, null, w)
    x, y = torch.randn(n, IN).to(dtype), torch.randn(n, OUT).to(dtype)
    before = y.clone()
    assert not chain(x[:5], y[:5])  # the records hold 6 tokens
    assert not chain(x.float(), y)  # another dtype
    assert not chain(torch.randn(n, 2 * IN).to(dtype)[:, ::2], y)  # x not contiguous
    assert not chain(x, torch.randn(n, OUT + 64).to(dtype))  # another projection's shape
    assert torch.equal(y, before)
    assert not records[0].set(indexes[0].int(), nulls[0], R)  # an int32 index: the record then fits no batch
    assert not chain(x, y) and torch.equal(y, before)
    assert not records[0].set(indexes[0], nulls[0], R + 1)  # wider than its pool
    assert not records[0].set(torch.stack([indexes[0]] * 2, 1)[:, 0], nulls[0], R)  # not contiguous
    assert records[0].set(indexes[0], nulls[0], R) and chain(x, y) and not torch.equal(y, before)


def test_a_link_refuses_another_projection_or_dtype():
    (bgmv, _, _), (road, _, _), (qbgmv, _, _) = _kernels(torch.float32)
    rec = native.PoolRecord(R)
    assert bgmv.link(torch.float32, IN + 64, OUT, rec) is None
    assert bgmv.link(torch.float16, IN, OUT, rec) is None
    assert bgmv.link(torch.float32, IN, OUT, native.PoolRecord(R + 1)) is None  # a record wider than the pool
    assert road.link(torch.float32, IN, OUT + 64, rec) is None
    assert qbgmv.link(torch.float32, IN, OUT + 64, rec) is None
    assert native.Chain.build([bgmv.link(torch.float32, IN, OUT, rec), None], IN, OUT, torch.float32) is None
