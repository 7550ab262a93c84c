"""The per-token gain delta on RMSNorm outputs (`native/norm_cpu.c`: `norm_gain_`, what `CpuBackend.apply_norm`
runs) against the torch reference (`Backend.apply_norm`'s addcmul), and `NativeRMSNorm.unit`'s native bf16 path
against `unit_rms`, the torch one."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from deltafleet import native
from deltafleet.models.llama import RMSNorm, unit_rms
from deltafleet.models.prepack import NativeRMSNorm
from tests.conftest import assert_close


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_gain_matches_addcmul_and_leaves_null_rows(dtype):
    g = torch.Generator().manual_seed(0)
    S, d = 5, 192
    delta = (torch.randn(S, d, generator=g) * 0.1).to(dtype)
    delta[S - 1] = 0  # the null row, as a pool keeps it
    index = torch.tensor([0, 4, 2, 2, 4, 1, 3])
    u = torch.randn(len(index), d, generator=g).to(dtype)
    y = torch.randn(len(index), d, generator=g).to(dtype)
    want = torch.addcmul(y, u, delta.index_select(0, index))
    got = y.clone()
    assert native.norm_gain_(u, got, delta, index, S - 1)
    assert torch.equal(got[index == S - 1], y[index == S - 1])
    op = "reordered" if dtype is torch.float32 else "rounded"
    assert_close(got.float(), want.float(), op, dtype, k=2)


def test_norm_gain_reads_ids_outside_the_pool_as_null_and_refuses_misfits():
    S, d = 3, 64
    delta, u, y = torch.ones(S, d), torch.ones(4, d), torch.zeros(4, d)
    got = y.clone()
    assert native.norm_gain_(u, got, delta, torch.tensor([0, -1, 3, 99]), 2)
    assert torch.equal(got[0], torch.ones(d)) and torch.equal(got[1:], y[1:])
    assert not native.norm_gain_(u.bfloat16(), y.clone(), delta, torch.tensor([0, 1, 2, 0]), 2)  # dtypes differ
    assert not native.norm_gain_(u, y.clone(), delta[:, :32], torch.tensor([0, 1, 2, 0]), 2)  # widths differ
    assert not native.norm_gain_(u, y.clone(), delta, torch.tensor([0, 1, 2]), 2)  # one id short


def test_unit_native_bf16_equals_the_torch_path():
    x = (torch.randn(3, 7, 576) * 3).bfloat16()
    want = F.rms_norm(x.float(), (576,), eps=1e-5).to(torch.bfloat16)
    norm = NativeRMSNorm(RMSNorm(576, 1e-5).bfloat16())
    assert torch.equal(unit_rms(x, 1e-5), want) and torch.equal(norm.unit(x), want)
    xg = x.float().requires_grad_()  # gradients: the torch path
    NativeRMSNorm(RMSNorm(576, 1e-5)).unit(xg).sum().backward()
    assert xg.grad is not None


@pytest.mark.parametrize("d", [192, 77])
def test_the_fused_norm_and_gain_equal_the_three_calls_bit_for_bit(d):
    """`rms_norm_gain_` (one pass) against the native RMSNorm, its unit and `norm_gain_` in turn: every row, members
    and the null row and out-of-range ids (read as null) alike, bit for bit."""
    g = torch.Generator().manual_seed(3)
    S, bf = 5, torch.bfloat16
    norm = NativeRMSNorm(RMSNorm(d, 1e-5))
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d, generator=g))
    norm.weight.data = norm.weight.data.to(bf)
    delta = (torch.randn(S, d, generator=g) * 0.1).to(bf)
    index = torch.tensor([0, 4, 2, 2, -1, 1, 3, 7])
    x = (torch.randn(len(index), d, generator=g) * 3).to(bf)
    with torch.inference_mode():
        want = norm(x)
        assert native.norm_gain_(norm.unit(x), want, delta, index, S - 1)
        got = torch.empty_like(x)
        assert native.rms_norm_gain_(x, norm.weight, norm.eps, got, delta, index, S - 1)
    assert torch.equal(got, want)
    assert not native.rms_norm_gain_(x.float(), norm.weight, norm.eps, got, delta, index, S - 1)  # bf16 only
    assert not native.rms_norm_gain_(x, norm.weight, norm.eps, got, delta, index[:-1], S - 1)  # index too short
