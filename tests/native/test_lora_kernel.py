"""The native BGMV LoRA and RoAd kernels against their torch references (fp32 and bf16 adapter weights, fp32 and
bf16 activations): null
rows untouched, ranks below the pool width, strided pool views and non-contiguous inputs; contract violations
fall back (return False) instead of computing garbage; the compiler is found on this machine (else the fast
path would vanish silently)."""

from __future__ import annotations

import pytest
import torch

from deltafleet import native
from deltafleet.adapters.road.functional import rotate_half_grouped
from tests.native.builds import build_with


def _reference(x, y, A, B, index, r, null):
    y = y.clone()
    for i, k in enumerate(index.tolist()):
        if k != null:
            y[i] += (x[i] @ A[k, :r].T) @ B[k, :r]
    return y


def test_kernel_builds_here():
    assert native.lora_bgmv() is not None


@pytest.mark.parametrize("r", [1, 5, 16])
def test_bgmv_matches_reference(r):
    g = torch.Generator().manual_seed(0)
    S, R, n, d_in, d_out = 6, 16, 11, 40, 72
    A = torch.randn(S + 1, R, d_in, generator=g)
    B = torch.randn(S + 1, R, d_out, generator=g)
    x = torch.randn(n, d_in, generator=g)
    y = torch.randn(n, d_out, generator=g)
    index = torch.tensor([0, 6, 3, 3, 5, 6, 1, 0, 2, 4, 6])  # 6 = the null row
    want = _reference(x, y, A, B, index, r, S)
    got = y.clone()
    assert native.lora_bgmv_(x, got, A, B, index, r, S)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    assert torch.equal(got[index == S], y[index == S])


def test_bgmv_bf16_weights_match_reference_on_widened_weights():
    g = torch.Generator().manual_seed(2)
    S, R, n, d_in, d_out = 4, 8, 9, 64, 96
    A = torch.randn(S + 1, R, d_in, generator=g).bfloat16()
    B = torch.randn(S + 1, R, d_out, generator=g).bfloat16()
    x, y = torch.randn(n, d_in, generator=g), torch.randn(n, d_out, generator=g)
    index = torch.tensor([0, 4, 3, 1, 1, 2, 4, 0, 3])
    got = y.clone()
    assert native.lora_bgmv_(x, got, A, B, index, 6, S)
    torch.testing.assert_close(got, _reference(x, y, A.float(), B.float(), index, 6, S), rtol=1e-5, atol=1e-4)


# bf16 activations: the kernel computes in fp32 and rounds y once to nearest even, so it may differ from the
# fp32 computation rounded by at most one bf16 ulp (2^-8 relative) where the two fp32 sums straddle a rounding point.
_KERNEL_TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-4}, torch.bfloat16: {"rtol": 2**-8, "atol": 1e-4}}


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_bgmv_bf16_activations_round_the_fp32_result_once(wdtype):
    """A bf16 model: x, y bf16. The kernel equals the fp32 computation on the widened tensors, rounded to bf16
    (within one ulp), and leaves non-member rows bit-identical."""
    g = torch.Generator().manual_seed(5)
    S, R, n, d_in, d_out = 4, 16, 10, 72, 136
    A = (torch.randn(S + 1, R, d_in, generator=g) * 0.1).to(wdtype)
    B = (torch.randn(S + 1, R, d_out, generator=g) * 0.1).to(wdtype)
    x = torch.randn(n, d_in, generator=g).bfloat16()
    y = torch.randn(n, d_out, generator=g).bfloat16()
    index = torch.tensor([0, 4, 3, 1, 1, 2, 4, 0, 3, 2])
    want = _reference(x.float(), y.float(), A.float(), B.float(), index, 11, S)
    got = y.clone()
    assert native.lora_bgmv_(x, got, A, B, index, 11, S)
    assert got.dtype is torch.bfloat16
    torch.testing.assert_close(got.float(), want, **_KERNEL_TOL[torch.bfloat16])
    assert torch.equal(got[index == S], y[index == S])
    # NaN and inf propagate as torch would propagate them (no silent clamp)
    x[2, 0] = float("nan")
    got = y.clone()
    assert native.lora_bgmv_(x, got, A, B, index, 11, S)
    assert got[2].isnan().all() and not got[7].isnan().any()


@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_road_bf16_activations_round_the_fp32_result_once(wdtype):
    g = torch.Generator().manual_seed(6)
    S, n, d_out, G = 3, 9, 128, 64
    c = torch.randn(S + 1, d_out, generator=g).to(wdtype)
    s = torch.randn(S + 1, d_out, generator=g).to(wdtype)
    y = torch.randn(n, d_out, generator=g).bfloat16()
    index = torch.tensor([0, 3, 2, 2, 1, 3, 0, 1, 2])
    want = _road_reference(y.float(), c.float(), s.float(), index, G, S)
    got = y.clone()
    assert native.road_apply_(got, c, s, index, G, S)
    torch.testing.assert_close(got.float(), want, **_KERNEL_TOL[torch.bfloat16])
    assert torch.equal(got[index == S], y[index == S])


def _road_reference(y, c, s, index, G, null):
    out = y.clone()
    for i, k in enumerate(index.tolist()):
        if k != null:
            out[i] = y[i] * c[k] + rotate_half_grouped(y[i], G) * s[k]
    return out


# (group, outputs, tokens): a group below one vector, one with a vector and a tail, and a batch large enough
# for the threaded loop
@pytest.mark.parametrize("G,d_out,n", [(8, 48, 8), (24, 48, 8), (64, 1536, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_road_kernel_matches_reference(dtype, G, d_out, n):
    g = torch.Generator().manual_seed(3)
    S = 5
    c = torch.randn(S + 1, d_out, generator=g).to(dtype)
    s = torch.randn(S + 1, d_out, generator=g).to(dtype)
    c[S], s[S] = 1, 0
    y = torch.randn(n, d_out, generator=g)
    index = torch.tensor([0, 5, 2, 2, 4, 1, 5, 3]).repeat(n // 8)
    want = _road_reference(y, c.float(), s.float(), index, G, S)
    got = y.clone()
    assert native.road_apply_(got, c, s, index, G, S)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[index == S], y[index == S])


def test_road_kernel_refuses_what_it_cannot_do():
    y, c, s, idx = torch.randn(2, 12), torch.ones(3, 12), torch.zeros(3, 12), torch.tensor([0, 1])
    assert not native.road_apply_(y, c, s, idx, 8, 2)  # 12 outputs are not whole groups of 8
    assert not native.road_apply_(y, c, s, idx, 3, 2)  # odd group
    assert not native.road_apply_(y.half(), c, s, idx, 4, 2)  # no fp16 activations
    assert not native.road_apply_(y, c, s.bfloat16(), idx, 4, 2)
    assert native.road_apply_(y, c, s, idx, 4, 2)


def test_bgmv_reads_strided_pool_views():
    g = torch.Generator().manual_seed(1)
    pool_A = torch.randn(5, 8, 24, generator=g)
    pool_B = torch.randn(5, 8, 30, generator=g)
    x = torch.randn(7, 48, generator=g)[:, ::2]  # non-contiguous rows: the wrapper rejects it
    y = torch.zeros(7, 30)
    index = torch.tensor([0, 1, 2, 3, 4, 4, 0])
    assert not native.lora_bgmv_(x, y, pool_A, pool_B, index, 4, 4)
    x = x.contiguous()
    A, B = pool_A[:, 2:], pool_B[:, 2:]  # a view with a pool-row stride larger than R * in
    got = torch.zeros(7, 30)
    assert native.lora_bgmv_(x, got, A, B, index, 5, 4)
    torch.testing.assert_close(got, _reference(x, torch.zeros(7, 30), A, B, index, 5, 4), rtol=1e-5, atol=1e-4)


def test_bgmv_refuses_what_it_cannot_do():
    x, y = torch.randn(3, 8), torch.zeros(3, 4)
    A, B = torch.randn(2, 4, 8), torch.randn(2, 4, 4)
    idx = torch.tensor([0, 1, 0])
    assert not native.lora_bgmv_(x.bfloat16(), y, A, B, idx, 4, 1)  # x and y of different dtypes
    assert not native.lora_bgmv_(x.half(), y.half(), A, B, idx, 4, 1)  # no fp16 activations
    assert not native.lora_bgmv_(x, y, A.bfloat16(), B, idx, 4, 1)  # A and B of different dtypes
    assert not native.lora_bgmv_(x, y, A.half(), B.half(), idx, 4, 1)  # no fp16 kernel
    assert not native.lora_bgmv_(x, y, A, B, idx, 5, 1)  # rank above the pool width
    assert not native.lora_bgmv_(x, y, A, B, idx.int(), 4, 1)  # int32 index
    assert not native.lora_bgmv_(x, torch.zeros(2, 4), A, B, idx, 4, 1)  # row counts disagree


def test_disabled_by_environment(monkeypatch):
    monkeypatch.setenv("DELTAFLEET_NATIVE", "0")
    native._library.cache_clear()
    native.lora_bgmv.cache_clear()
    try:
        assert native.lora_bgmv() is None
        assert not native.lora_bgmv_(torch.randn(1, 8), torch.zeros(1, 4), torch.randn(2, 4, 8),
                                     torch.randn(2, 4, 4), torch.tensor([0]), 4, 1)
    finally:
        monkeypatch.undo()
        native._library.cache_clear()
        native.lora_bgmv.cache_clear()


def test_portable_build_matches_the_native_one(tmp_path):
    """The plain-loop build (no AVX2/FMA, as on older CPUs) computes what this machine's build computes."""
    lib = build_with("lora_cpu", tmp_path)
    g = torch.Generator().manual_seed(4)
    idx = torch.tensor([0, 4, 1, 2, 3, 4, 0, 1, 2])
    for (act, dtype), suffix in native._SUFFIX.items():
        fn = getattr(lib, f"lora_bgmv_{suffix}")
        fn.argtypes = native._BGMV_ARGS
        A = torch.randn(5, 16, 77, generator=g).to(dtype)
        B = torch.randn(5, 16, 45, generator=g).to(dtype)
        x, y = torch.randn(9, 77, generator=g).to(act), torch.randn(9, 45, generator=g).to(act)
        want, got = y.clone(), y.clone()
        fn(9, 77, 45, 13, x.data_ptr(), 77, got.data_ptr(), 45, A.data_ptr(), A.stride(0), A.stride(1),
           B.data_ptr(), B.stride(0), B.stride(1), idx.data_ptr(), 4)
        assert native.lora_bgmv_(x, want, A, B, idx, 13, 4)
        torch.testing.assert_close(got, want, **_KERNEL_TOL[act])
        fn = getattr(lib, f"road_apply_{suffix}")
        fn.argtypes = native._ROAD_ARGS
        c, s = torch.randn(5, 48, generator=g).to(dtype), torch.randn(5, 48, generator=g).to(dtype)
        y = torch.randn(9, 48, generator=g).to(act)
        want, got = y.clone(), y.clone()
        fn(9, 48, 24, got.data_ptr(), 48, c.data_ptr(), 48, s.data_ptr(), 48, idx.data_ptr(), 4)
        assert native.road_apply_(want, c, s, idx, 24, 4)
        torch.testing.assert_close(got, want, **_KERNEL_TOL[act])


def test_loading_the_kernels_keeps_subnormal_floats():
    """The library must not switch the process to flush-to-zero (gcc's -ffast-math links crtfastmath.o, whose
    constructor does that on load): subnormals are still representable after every kernel is loaded."""
    from deltafleet import native

    native.lora_bgmv()
    native.road_apply()
    native.dequant_groups()
    tiny = 5e-324  # the smallest subnormal double
    assert tiny * 1.0 > 0.0 and tiny / 2.0 == 0.0
    assert float(torch.tensor(1e-40, dtype=torch.float32) * 1.0) > 0.0


@pytest.mark.parametrize(("act", "wdtype"), list(native._SUFFIX))
@pytest.mark.parametrize("d_in", [64, 77])  # a multiple of the vector loops, and one with tails
def test_bgmv_tokens_of_one_slot_share_rows_bit_identically(act, wdtype, d_in):
    """Tokens of one slot are worked in groups (`RUN_MAX`, each weight row read once for the group): every token's
    output equals what it gets alone, bit for bit, wherever its slot's other tokens sit (prefill runs, decode
    repeats, leftovers below a full group)."""
    g = torch.Generator().manual_seed(5)
    S, R, r, d_out = 5, 16, 13, 96 + d_in % 7
    A = torch.randn(S, R, d_in, generator=g).to(wdtype)
    B = torch.randn(S, R, d_out, generator=g).to(wdtype)
    runs = [0] * 9 + [4, 1, 2, 1, 4, 3] + [2] * 6 + [3, 1, 0, 0]  # 4 = null; slot 0: 11 tokens, slot 1: 3, ...
    index = torch.tensor(runs)
    x = torch.randn(len(runs), d_in, generator=g).to(act)
    y = torch.randn(len(runs), d_out, generator=g).to(act)
    together = y.clone()
    assert native.lora_bgmv_(x, together, A, B, index, r, S - 1)
    for i in range(len(runs)):
        alone = y[i:i + 1].clone()
        assert native.lora_bgmv_(x[i:i + 1], alone, A, B, index[i:i + 1], r, S - 1)
        assert torch.equal(together[i], alone[0]), i


def test_bgmv_reads_ids_outside_the_pool_as_the_null_row():
    """A corrupt index (negative, or past the pool) never reads outside A and B: those rows stay as they are."""
    g = torch.Generator().manual_seed(6)
    S, R, d_in, d_out = 4, 8, 64, 96
    A, B = torch.randn(S, R, d_in, generator=g), torch.randn(S, R, d_out, generator=g)
    index = torch.tensor([0, -1, 2, 99, S - 1, 1, -(2**62)])
    x, y = torch.randn(len(index), d_in, generator=g), torch.randn(len(index), d_out, generator=g)
    got = y.clone()
    assert native.lora_bgmv_(x, got, A, B, index, R, S - 1)
    bad = (index < 0) | (index >= S - 1)
    assert torch.equal(got[bad], y[bad])
    want = _reference(x, y, A, B, index.clamp(0, S - 1), R, S - 1)
    torch.testing.assert_close(got[~bad], want[~bad], rtol=1e-5, atol=1e-4)
