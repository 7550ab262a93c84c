"""The native few-row matmul (`deltafleet.native.gemv_`, gemv_cpu.c) against F.linear in float64: bias or none,
tails in both K (not a multiple of the vector width) and N (not a multiple of the 4-row block), strided rows, NaN
propagation, contract violations refused (False, output untouched); the portable build (plain loops, as on a CPU
without AVX2) computes what this machine's build computes; and `PrepackedLinear` takes it for few rows."""

from __future__ import annotations

import ctypes

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from deltafleet import native
from deltafleet.models import prepack
from tests.conftest import assert_close
from tests.native.builds import build_with

SHAPES = [(1, 576, 576), (3, 577, 202), (8, 64, 7), (2, 31, 5), (16, 1536, 100)]  # (M, K, N)


def _operands(M, K, N, dtype, seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(M, K, generator=g).to(dtype)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).to(dtype)
    b = torch.randn(N, generator=g).to(dtype) if bias else None
    return x, w, b


def _want(x, w, b):
    return F.linear(x.double(), w.double(), None if b is None else b.double())


def test_kernel_builds_here():
    assert native.gemv(torch.float32) is not None and native.gemv(torch.bfloat16) is not None
    assert native.gemv_bf16_path() in ("avx512_bf16", "avx2", "portable")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,K,N", SHAPES)
@pytest.mark.parametrize("bias", [True, False])
def test_gemv_matches_float64(dtype, M, K, N, bias):
    x, w, b = _operands(M, K, N, dtype, bias=bias)
    out = torch.full((M, N), 7.0, dtype=dtype)
    assert native.gemv_(x, w, b, out)
    want = _want(x, w, b)
    # fp32: products summed in another order (reordered over K); bf16: the fp32 sum rounded once to bf16 (rounded)
    op = "reordered" if dtype is torch.float32 else "rounded"
    assert_close(out.double(), want, op, dtype, k=K, scale=float(want.abs().max()) + 1.0)


def test_strided_rows_and_nan_propagate():
    x, w, b = _operands(4, 96, 40, torch.bfloat16, seed=1)
    wide_x = torch.zeros(4, 200, dtype=torch.bfloat16)
    wide_x[:, 10:106] = x
    wide_out = torch.zeros(4, 64, dtype=torch.bfloat16)
    assert native.gemv_(wide_x[:, 10:106], w, b, wide_out[:, 3:43])
    assert_close(wide_out[:, 3:43].double(), _want(x, w, b), "rounded", torch.bfloat16)
    assert torch.equal(wide_out[:, :3], torch.zeros(4, 3, dtype=torch.bfloat16))  # nothing written outside
    x[2, 5] = float("nan")
    out = torch.empty(4, 40, dtype=torch.bfloat16)
    assert native.gemv_(x, w, b, out)
    assert out[2].isnan().all() and not out[[0, 1, 3]].isnan().any()


def test_refuses_what_it_cannot_do():
    x, w, b = _operands(2, 16, 8, torch.float32)
    out = torch.zeros(2, 8)
    assert not native.gemv_(x.half(), w.half(), None, out.half())  # no fp16 kernel
    assert not native.gemv_(x, w.bfloat16(), None, out)  # dtypes differ
    assert not native.gemv_(x, w, b.bfloat16(), out)  # bias dtype differs
    assert not native.gemv_(x, w, b[:4], out)  # bias length
    assert not native.gemv_(x, w[:, :8], None, out)  # K disagrees
    assert not native.gemv_(x, w, None, torch.zeros(2, 9))  # N disagrees
    assert not native.gemv_(x.t().contiguous().t(), w, None, out)  # columns not contiguous
    assert not native.gemv_(x[0], w, None, out[0])  # 1-d
    assert torch.equal(out, torch.zeros(2, 8))


def test_portable_build_matches_the_native_one(tmp_path):
    """The plain-loop build (no AVX2/FMA/AVX-512, as on older CPUs) computes what this machine's build computes."""
    lib = build_with("gemv_cpu", tmp_path)
    path = lib.gemv_bf16_path
    path.restype = ctypes.c_int
    assert path() == 0
    for dtype, suffix in ((torch.float32, "f32"), (torch.bfloat16, "bf16")):
        fn = getattr(lib, f"gemv_{suffix}")
        fn.argtypes = native._GEMV_ARGS
        x, w, b = _operands(5, 77, 45, dtype, seed=3)
        got, want = torch.empty(5, 45, dtype=dtype), torch.empty(5, 45, dtype=dtype)
        fn(5, 77, 45, x.data_ptr(), 77, w.data_ptr(), 77, b.data_ptr(), got.data_ptr(), 45)
        assert native.gemv_(x, w, b, want)
        op = "reordered" if dtype is torch.float32 else "rounded"
        assert_close(got.double(), want.double(), op, dtype, k=77, scale=float(want.abs().max()) + 1.0)


@pytest.mark.skipif(not prepack.available(), reason="this torch build has no oneDNN")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_prepacked_linear_takes_the_kernel_for_few_rows(dtype, monkeypatch):
    if dtype is torch.bfloat16 and not prepack._bf16_supported():
        pytest.skip("oneDNN computes no bf16 on this CPU")
    torch.manual_seed(0)
    lin = nn.Linear(64, 24).to(dtype).requires_grad_(False)
    packed = prepack.PrepackedLinear(lin)
    calls = []
    real = native.gemv_
    monkeypatch.setattr(native, "gemv_", lambda *a: calls.append(a[0].shape) or real(*a))
    rows = prepack.GEMV_ROWS[dtype]
    for shape in ((1, 1, 64), (rows, 64), (rows + 1, 64), (2, 3, 64)):
        x = torch.randn(*shape).to(dtype)
        op = "reordered" if dtype is torch.float32 else "rounded"
        assert_close(packed(x).double(), _want(x, lin.weight, lin.bias), op, dtype, k=64)
    assert calls == [(1, 64), (rows, 64)] + ([(6, 64)] if rows >= 6 else [])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_native_rms_norm_equals_the_model_norm(dtype):
    """bf16: bit-identical to HF's semantics here (fp32 normalization, cast, times the weight); fp32: the same
    sum in another order. Non-contiguous input and gradients take the module's own path."""
    from deltafleet.models.llama import RMSNorm

    torch.manual_seed(0)
    norm = RMSNorm(200, 1e-5).to(dtype)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.2)
    fast = prepack.NativeRMSNorm(norm)
    x = (torch.randn(2, 3, 200) * 4).to(dtype)
    with torch.no_grad():
        want = norm(x)
        op = "reordered" if dtype is torch.float32 else "rounded"
        assert_close(fast(x).double(), want.double(), op, dtype, k=200)
        assert_close(fast(x[:, :, ::1].transpose(0, 1)).double(), norm(x.transpose(0, 1)).double(), op, dtype,
                     k=200)
    xg = x.float().requires_grad_(True) if dtype is torch.float32 else None
    if xg is not None:
        fast(xg).sum().backward()  # autograd: the module's own formula
        assert xg.grad is not None


def test_pack_norms_swaps_and_restores(tiny_llama):
    from deltafleet.models.llama import RMSNorm
    from deltafleet.models.loading import load_model

    model, _ = load_model(tiny_llama, dtype=torch.float32)
    keys = set(model.state_dict())
    n = sum(type(m) is RMSNorm for m in model.modules())
    assert prepack.pack_norms_(model) == n > 0
    assert not any(type(m) is RMSNorm for m in model.modules()) and set(model.state_dict()) == keys
    prepack.unpack_norms_(model)
    assert sum(type(m) is RMSNorm for m in model.modules()) == n and set(model.state_dict()) == keys
