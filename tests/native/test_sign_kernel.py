"""sign_cpu.c (OneBit's packed sign matmul): equals the dense product with S = unpack(packed) up to fp32
reassociation, for any token count, column tail and row stride; refuses tensors outside its contract; the portable
(no-SIMD) build computes what this machine's build computes."""

from __future__ import annotations

import ctypes

import pytest
import torch

from deltafleet import native
from deltafleet.dtypes import cpu_flags
from deltafleet.store.signs import pack_signs, unpack_signs
from tests.conftest import assert_close
from tests.native.builds import build_with


def _case(seed: int, N: int, C: int, R: int):
    g = torch.Generator().manual_seed(seed)
    xg = torch.randn(N, C, generator=g)
    packed = pack_signs(torch.randn(R, C, generator=g))
    h = torch.rand(R, generator=g) + 0.05
    return xg, packed, h


def _want(xg, packed, h):
    return ((xg.double() @ unpack_signs(packed, xg.shape[1]).double().T) * h.double()).float()


@pytest.mark.parametrize("N,C,R", [(1, 16, 3), (3, 37, 5), (4, 64, 9), (5, 100, 17), (9, 576, 40), (32, 1536, 8)])
def test_matches_the_dense_product(N, C, R):
    if native.sign_matmul() is None:
        pytest.skip("native kernels unavailable")
    xg, packed, h = _case(N * C + R, N, C, R)
    out = torch.full((N, R), float("nan"))
    assert native.sign_matmul_(xg, packed, h, out)
    # 2 P - T: two sums of C terms each, in another order than the reference
    assert_close(out, _want(xg, packed, h), "reordered", k=2 * C, scale=float(xg.abs().sum(1).max() * h.max()))


def test_row_strides_of_x_and_out():
    if native.sign_matmul() is None:
        pytest.skip("native kernels unavailable")
    xg, packed, h = _case(3, 6, 40, 7)
    wide_x = torch.randn(6, 50)
    wide_x[:, :40] = xg
    wide_out = torch.zeros(6, 11)
    assert native.sign_matmul_(wide_x[:, :40], packed, h, wide_out[:, :7])
    assert_close(wide_out[:, :7], _want(xg, packed, h), "reordered", k=80, scale=float(xg.abs().sum(1).max()))
    assert torch.equal(wide_out[:, 7:], torch.zeros(6, 4))  # nothing written beyond the view


@pytest.mark.parametrize("C", [1, 8, 13, 576])
def test_unpack_writes_the_exact_signs(C):
    if native.sign_unpack() is None:
        pytest.skip("native kernels unavailable")
    packed = pack_signs(torch.randn(9, C, generator=torch.Generator().manual_seed(C)))
    for dtype in (torch.float32, torch.bfloat16):
        out = torch.full((9, C), 7.0, dtype=dtype)
        assert native.sign_unpack_(packed, out)
        assert torch.equal(out.float(), unpack_signs(packed, C))
    assert not native.sign_unpack_(packed, torch.zeros(9, C, dtype=torch.float16))  # dtype outside the contract
    assert not native.sign_unpack_(packed[:, :0], torch.zeros(9, C))  # row bytes do not fit C
    assert C == 1 or not native.sign_unpack_(packed, torch.zeros(C, 9).T)  # not contiguous


def test_refuses_tensors_outside_the_contract():
    xg, packed, h = _case(4, 2, 24, 5)
    out = torch.zeros(2, 5)
    bad = {
        "bf16 x": (xg.bfloat16(), packed, h, out),
        "short rows": (xg, packed[:, :2].contiguous(), h, out),
        "h length": (xg, packed, h[:4], out),
        "out shape": (xg, packed, h, torch.zeros(2, 6)),
        "x column stride": (torch.randn(24, 2).T, packed, h, out),
        "packed dtype": (xg, packed.to(torch.int8), h, out),
        "packed not contiguous": (xg, torch.zeros(3, 5, dtype=torch.uint8).T, h, out),
    }
    for name, args in bad.items():
        assert not native.sign_matmul_(*args), name
    assert torch.equal(out, torch.zeros(2, 5))


@pytest.mark.parametrize("arch,path", [(["-march=x86-64", "-mno-avx2", "-mno-fma"], 0), (["-march=x86-64-v3"], 1)])
def test_portable_and_avx2_builds_match_the_native_one(tmp_path, arch, path):
    """The plain-loop build (no AVX-512, AVX2 or FMA) and the AVX2 build (x86-64-v3, no AVX-512) compute what this
    machine's build computes (they run here only if this CPU has what they were built for: AVX2 for the second)."""
    if native.sign_matmul() is None:
        pytest.skip("no native kernels here")
    if path == 1 and "avx2" not in cpu_flags():
        pytest.skip("this CPU has no AVX2")
    lib = build_with("sign_cpu", tmp_path, tuple(arch))
    assert lib.sign_matmul_path() == path
    fn = lib.sign_matmul_f32
    fn.argtypes, fn.restype = native._SIGN_ARGS, ctypes.c_int
    for seed, (N, C, R) in enumerate([(1, 16, 3), (7, 77, 45), (5, 576, 12)]):
        xg, packed, h = _case(seed, N, C, R)
        got, want = torch.zeros(N, R), torch.zeros(N, R)
        assert fn(N, C, R, xg.data_ptr(), C, packed.data_ptr(), packed.shape[1], h.data_ptr(), got.data_ptr(), R) == 0
        assert native.sign_matmul_(xg, packed, h, want)
        assert_close(got, want, "reordered", k=2 * C, scale=float(xg.abs().sum(1).max() * h.max()))
