"""Quantization primitives: packing round trips, RTN/GPTQ error bounds, GPTQ beats RTN on correlated inputs."""

from __future__ import annotations

import pytest
import torch

from deltafleet.quant.functional import gptq_quantize, hessian
from deltafleet.store.quantized import (
    QuantizedMatrix,
    dequantize,
    pack_codes,
    packed_nbytes,
    rtn_quantize,
    unpack_codes,
)


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (3, 64)])
def test_pack_unpack_round_trip_is_exact_and_dense(bits, shape):
    g = torch.Generator().manual_seed(bits)
    codes = torch.randint(0, 1 << bits, shape, generator=g)
    n = codes.numel()
    packed = pack_codes(codes, bits)
    assert packed.dtype == torch.uint8 and packed.numel() == packed_nbytes(n, bits) == -(-n * bits // 8)
    assert torch.equal(unpack_codes(packed, bits, n).reshape(shape), codes.to(torch.uint8))


def test_pack_refuses_out_of_range_codes_and_wrong_lengths():
    with pytest.raises(ValueError, match=r"\[0, 3\]"):
        pack_codes(torch.tensor([4]), 2)
    with pytest.raises(ValueError, match="expected uint8 of shape"):
        unpack_codes(torch.zeros(3, dtype=torch.uint8), 3, 16)
    with pytest.raises(ValueError, match="bits=9"):
        pack_codes(torch.tensor([1]), 9)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_rtn_error_is_at_most_half_a_step(bits):
    W = torch.randn(16, 100, generator=torch.Generator().manual_seed(0))  # 100 = one short last group of 36
    codes, scale, zero = rtn_quantize(W, bits, 64)
    assert scale.shape == zero.shape == (16, 2) and scale.dtype == torch.float16
    err = (dequantize(codes, scale, zero, 64) - W).abs()
    step = scale.float().repeat_interleave(64, dim=1)[:, :100]
    assert (err <= step / 2 + 1e-6).all()


def test_zero_group_is_exact():
    W = torch.zeros(4, 64)
    W[0, :3] = torch.tensor([0.5, -0.25, 1.0])
    assert torch.equal(dequantize(*rtn_quantize(W, 2, 32), 32)[1:], W[1:])


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_has_lower_output_error_than_rtn(bits, act_order):
    g = torch.Generator().manual_seed(1)
    W = torch.randn(48, 160, generator=g)
    X = torch.randn(800, 160, generator=g) @ torch.randn(160, 160, generator=g) * 0.2  # correlated inputs
    H = hessian(X)

    def out_err(Wh):
        return ((X @ (W - Wh).t()) ** 2).sum()

    rtn = dequantize(*rtn_quantize(W, bits, 64), 64)
    gptq = dequantize(*gptq_quantize(W, H, bits, 64, act_order=act_order), 64)
    assert out_err(gptq) < 0.8 * out_err(rtn)


def test_gptq_with_identity_hessian_equals_rtn():
    W = torch.randn(8, 128, generator=torch.Generator().manual_seed(2))
    a = gptq_quantize(W, torch.eye(128), 4, 64, damp=0.0)
    b = rtn_quantize(W, 4, 64)
    for x, y in zip(a, b, strict=True):
        assert torch.equal(x, y)


def test_quantized_matrix_store_round_trip_and_bad_tensors():
    W = torch.randn(10, 70, generator=torch.Generator().manual_seed(3))
    q = QuantizedMatrix.quantize(W, 3, 32)
    assert q.nbytes == packed_nbytes(700, 3) + 10 * 3 * 2 + 10 * 3
    t = q.tensors("m")
    back = QuantizedMatrix.from_tensors(t, "m", (10, 70), 3, 32)
    assert torch.equal(back.dequantize(), q.dequantize())
    with pytest.raises(ValueError, match="'m.qscale' is torch.float32"):
        QuantizedMatrix.from_tensors({**t, "m.qscale": t["m.qscale"].float()}, "m", (10, 70), 3, 32)
    with pytest.raises(ValueError, match="'m.qcodes' is missing"):
        QuantizedMatrix.from_tensors({k: v for k, v in t.items() if k != "m.qcodes"}, "m", (10, 70), 3, 32)
    with pytest.raises(ValueError, match="zero points outside"):
        QuantizedMatrix.from_tensors({**t, "m.qzero": torch.full((10, 3), 9, dtype=torch.uint8)}, "m",
                                     (10, 70), 3, 32)
