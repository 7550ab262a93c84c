"""The native sparse-additive kernel (sparse_cpu.c, PaFi's shared-pattern deltas) against a dense torch reference:
fp32 and bf16 values, fp32 and bf16 activations, random CSR patterns with empty and long rows, null-row tokens
untouched; the bound and free entry points agree; contract violations fall back (return False) instead of reading
out of bounds; the portable (no-SIMD) build computes what this machine's build computes."""

from __future__ import annotations

import pytest
import torch

from deltafleet import native
from tests.native.builds import build_with

PAIRS = [(act, w) for act in (torch.float32, torch.bfloat16) for w in (torch.float32, torch.bfloat16)]
# bf16 activations: y is rounded once from the fp32 sum, so it may differ from the exact result rounded by one bf16
# rounding (2^-8 relative); the atol covers the fp32 sums' reassociation.
_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-5}, torch.bfloat16: {"rtol": 2**-8, "atol": 1e-4}}


def _reference(x, y, values, cols, row_ptr, index, null):
    """y[i] += W_k @ x[i] for every token i with k = index[i] != null, W_k the dense (out, in) matrix holding slot
    k's values at the pattern's entries; in float64."""
    out_f, nnz = row_ptr.numel() - 1, int(row_ptr[-1])
    rows = torch.repeat_interleave(torch.arange(out_f), row_ptr.diff().long())
    y = y.double().clone()
    for i, k in enumerate(index.tolist()):
        if k != null:
            W = torch.zeros(out_f, x.shape[-1], dtype=torch.float64)
            W[rows, cols[:nnz].long()] = values[k, :nnz].double()
            y[i] += W @ x[i].double()
    return y


def _pattern(g, in_f, out_f, max_len, long_rows=()):
    """A random CSR pattern (cols, row_ptr int32): rows of 0 to max_len sorted distinct columns, a quarter of them
    empty, and the `long_rows` holding every column."""
    lengths = torch.randint(0, max_len + 1, (out_f,), generator=g)
    lengths[torch.randperm(out_f, generator=g)[: out_f // 4]] = 0
    lengths[list(long_rows)] = in_f
    cols = torch.cat([torch.randperm(in_f, generator=g)[:n].sort().values for n in lengths.tolist()])
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    return cols.int(), row_ptr.int()


def _case(seed, n, in_f, out_f, act, wdtype, S=5, max_len=40, long_rows=()):
    g = torch.Generator().manual_seed(seed)
    cols, row_ptr = _pattern(g, in_f, out_f, min(max_len, in_f), long_rows)
    values = torch.randn(S + 1, cols.numel(), generator=g).to(wdtype)
    values[S] = 0  # the null row
    x = torch.randn(n, in_f, generator=g).to(act)
    y = torch.randn(n, out_f, generator=g).to(act)
    index = torch.randint(0, S + 1, (n,), generator=g)
    index[0] = 1  # at least one adapted token
    if n > 1:
        index[1] = S  # at least one null token
    return x, y, values, cols, row_ptr, index, S


def test_kernel_builds_here():
    assert native.sparse_add() is not None


@pytest.mark.parametrize("in_f,out_f", [(64, 48), (48, 160)])
@pytest.mark.parametrize("n", [1, 3, 17])
@pytest.mark.parametrize("act,wdtype", PAIRS)
def test_sparse_add_matches_reference(act, wdtype, n, in_f, out_f):
    x, y, values, cols, row_ptr, index, S = _case(n * in_f, n, in_f, out_f, act, wdtype)
    want = _reference(x, y, values, cols, row_ptr, index, S)
    got = y.clone()
    assert native.sparse_add_(x, got, values, cols, row_ptr, index, S)
    assert got.dtype is act
    torch.testing.assert_close(got.double(), want, **_TOL[act])
    assert torch.equal(got[index == S], y[index == S])  # null tokens untouched, bit for bit
    empty = row_ptr.diff() == 0
    assert empty.any() and torch.equal(got[:, empty], y[:, empty])  # so are outputs without nonzeros


@pytest.mark.parametrize("act,wdtype", PAIRS)
def test_long_rows_split_over_several_blocks(act, wdtype):
    """A pattern of ~7k nonzeros (four row blocks per token, threaded) with three full rows, so the blocks are
    found by nonzero count, not row count; rows longer than a vector, with a tail."""
    x, y, values, cols, row_ptr, index, S = _case(7, 9, 531, 300, act, wdtype, max_len=45, long_rows=(3, 150, 299))
    assert row_ptr[-1] > 3 * 2048  # SPARSE_BLOCK_NNZ nonzeros per block
    want = _reference(x, y, values, cols, row_ptr, index, S)
    got = y.clone()
    assert native.sparse_add_(x, got, values, cols, row_ptr, index, S)
    torch.testing.assert_close(got.double(), want, **_TOL[act])
    assert torch.equal(got[index == S], y[index == S])


def test_bound_and_free_functions_agree_and_see_pool_writes():
    x, y, values, cols, row_ptr, index, S = _case(3, 17, 64, 48, torch.float32, torch.bfloat16)
    bound = native.BoundSparse.bind(values, cols, row_ptr)
    assert bound is not None
    free, got = y.clone(), y.clone()
    assert native.sparse_add_(x, free, values, cols, row_ptr, index, S)
    assert bound(x, got, index, S)
    assert torch.equal(got, free)
    values[1] = torch.randn(values.shape[1], generator=torch.Generator().manual_seed(9)).bfloat16()  # in place
    got = y.clone()
    assert bound(x.view(1, 17, 64), got.view(1, 17, 48), index, S)  # (..., in) and (..., out) as they come
    torch.testing.assert_close(got.double(), _reference(x, y, values, cols, row_ptr, index, S),
                               **_TOL[torch.float32])


def test_reads_a_wider_pool_through_a_row_strided_view():
    x, y, values, cols, row_ptr, index, S = _case(4, 5, 48, 160, torch.float32, torch.float32)
    pool = torch.randn(S + 1, values.shape[1] + 7)
    pool[:, 3:3 + values.shape[1]] = values
    view = pool[:, 3:]  # rows longer than nnz, contiguous within a row
    got = y.clone()
    assert native.sparse_add_(x, got, view, cols, row_ptr, index, S)
    torch.testing.assert_close(got.double(), _reference(x, y, values, cols, row_ptr, index, S),
                               **_TOL[torch.float32])


def test_refuses_what_it_cannot_do():
    x, y, values, cols, row_ptr, index, S = _case(5, 3, 64, 48, torch.float32, torch.float32)
    before = y.clone()

    def refused(*, x=x, y=y, values=values, cols=cols, row_ptr=row_ptr, index=index):
        return not native.sparse_add_(x, y, values, cols, row_ptr, index, S)

    wide = torch.zeros(S + 1, 2 * values.shape[1])
    wide[:, ::2] = values
    assert refused(values=wide[:, ::2])  # values with a non-unit column stride
    assert refused(values=values.half())  # no fp16 kernel
    assert refused(index=index.int())  # int32 index
    assert refused(x=x.bfloat16())  # x and y of different dtypes
    assert refused(x=x.half(), y=y.half())  # no fp16 activations
    assert refused(x=x[:, :32].contiguous())  # x narrower than the pattern's columns
    assert refused(x=x[:2])  # row counts disagree
    assert refused(y=torch.zeros(3, 47))  # y narrower than the pattern's rows
    assert refused(cols=cols.long())  # int64 columns
    assert refused(row_ptr=row_ptr.long())
    bad = row_ptr.clone()
    bad[5], bad[6] = bad[6], bad[5] - 1  # decreasing
    assert refused(row_ptr=bad)
    assert refused(row_ptr=torch.cat([row_ptr[:-1], row_ptr[-1:] + 1]))  # more nonzeros than values hold
    negative = cols.clone()
    negative[0] = -1
    assert refused(cols=negative)
    assert native.BoundSparse.bind(values, cols, bad) is None
    assert torch.equal(y, before)


def test_disabled_by_environment(monkeypatch):
    x, y, values, cols, row_ptr, index, S = _case(6, 3, 64, 48, torch.float32, torch.float32)
    monkeypatch.setenv("DELTAFLEET_NATIVE", "0")
    native._library.cache_clear()
    native.sparse_add.cache_clear()
    try:
        assert native.sparse_add() is None
        assert not native.sparse_add_(x, y, values, cols, row_ptr, index, S)
    finally:
        monkeypatch.undo()
        native._library.cache_clear()
        native.sparse_add.cache_clear()


def test_portable_build_matches_the_native_one(tmp_path):
    """The plain-loop build (no AVX-512, AVX2 or FMA, as on older CPUs) computes what this machine's build
    computes."""
    lib = build_with("sparse_cpu", tmp_path)
    for seed, ((act, wdtype), suffix) in enumerate(native._SUFFIX.items()):
        fn = getattr(lib, f"sparse_add_{suffix}")
        fn.argtypes = native._SPARSE_ARGS
        x, y, values, cols, row_ptr, index, S = _case(seed, 9, 77, 45, act, wdtype)
        want, got = y.clone(), y.clone()
        fn(9, 77, 45, x.data_ptr(), 77, got.data_ptr(), 45, values.data_ptr(), values.stride(0), cols.data_ptr(),
           row_ptr.data_ptr(), index.data_ptr(), S)
        assert native.sparse_add_(x, want, values, cols, row_ptr, index, S)
        torch.testing.assert_close(got, want, **_TOL[act])
        assert not torch.equal(got, y)
