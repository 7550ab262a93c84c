"""QuantLinear: every kernel equals the reference dequantize-then-matmul; bytes of a packed 4-bit matrix."""

from __future__ import annotations

import pytest
import torch

from deltafleet.quant.linear import KERNELS, QuantLinear, fast_unpack
from deltafleet.store.quantized import QuantizedMatrix, pack_codes, unpack_codes
from tests.conftest import assert_close


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("n", [1, 7, 8, 61, 4096])
def test_fast_unpack_equals_reference(bits, n):
    codes = torch.randint(0, 1 << bits, (n,), generator=torch.Generator().manual_seed(n))
    packed = pack_codes(codes, bits)
    assert torch.equal(fast_unpack(packed, bits, n), unpack_codes(packed, bits, n))


def _qlinear(bits: int, R: int = 48, C: int = 100, G: int = 32, bias: bool = True, kernel: str = "fast"):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(R, C, generator=g) * 0.1
    b = torch.randn(R, generator=g) if bias else None
    return QuantLinear(QuantizedMatrix.quantize(w, bits, G), b, kernel), w, b


@pytest.mark.parametrize("C", [100, 128], ids=["short-last-group", "whole-groups"])  # native: whole groups only
@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kernels_equal_reference(bits, dtype, C):
    layer, _, b = _qlinear(bits, C=C)
    layer = layer.to(dtype)
    x = torch.randn(3, 5, C, generator=torch.Generator().manual_seed(1)).to(dtype)
    W = layer.matrix().dequantize()  # fp32 reference weight
    want = torch.nn.functional.linear(x.float(), W, b).to(dtype)
    outs = {}
    for name in KERNELS:
        layer.set_kernel(name)
        outs[name] = layer(x)
        outs[name + "-again"] = layer(x)  # the cached kernel's second call reads its cache
    for name, y in outs.items():
        assert y.dtype == dtype and y.shape == (3, 5, 48)
        assert_close(y.float(), want.float(), "reordered" if dtype == torch.float32 else "rounded", dtype, k=C,
                     msg=name)
        assert torch.equal(y, outs["reference"]), name  # same W_hat, same matmul: bit-identical


def test_native_dequant_is_bit_identical_and_used():
    from deltafleet import native

    layer, _, _ = _qlinear(3, R=40, C=192, G=64)
    out = torch.empty(40, 192)
    assert native.dequant_groups_(layer.qcodes, layer.scale.float(), layer.qzero.float(), 3, 64, out)
    assert torch.equal(out, layer.dequantized_weight())
    assert not native.dequant_groups_(layer.qcodes, layer.scale.float(), layer.qzero.float(), 3, 60, out)


def test_native_kernel_under_autograd_keeps_each_weight():
    """With gradients recorded, W_hat must not live in the shared scratch (backward reads it after later layers
    of the same shape ran); the gradient equals the reference kernel's."""
    grads = {}
    for kernel in ("reference", "native"):
        l1, _, _ = _qlinear(4, R=64, C=64, G=32, kernel=kernel)
        l2, _, _ = _qlinear(2, R=64, C=64, G=32, kernel=kernel)
        x = torch.randn(5, 64, generator=torch.Generator().manual_seed(2), requires_grad=True)
        l2(torch.tanh(l1(x))).square().sum().backward()
        grads[kernel] = x.grad
    assert torch.equal(grads["native"], grads["reference"])


def test_module_to_keeps_stored_scales_exact():
    layer, _, _ = _qlinear(4)
    before = layer.scale.clone()
    layer = layer.to(torch.bfloat16)
    assert layer.scale.dtype == torch.float16 and torch.equal(layer.scale, before)
    assert layer.qcodes.dtype == torch.uint8 and layer.bias.dtype == torch.bfloat16


def test_quantized_matrix_error_is_small_and_bias_optional():
    layer, w, _ = _qlinear(8, bias=False)
    x = torch.randn(4, 100)
    # Quantization error, not rounding (so not conftest's model): w ~ 0.1 N(0, 1) in groups of 32 spans ~0.4, an
    # 8-bit step of 1.6e-3, off by 1.6e-3 / sqrt(12) = 4.6e-4 per weight; 100 inputs of N(0, 1) put each output off
    # by sqrt(100) * 4.6e-4 = 4.6e-3 (1 sigma), and 2e-2 is over 4 sigma.
    torch.testing.assert_close(layer(x), x @ w.t(), atol=2e-2, rtol=2e-2)
    assert layer.bias is None


@pytest.mark.parametrize("group_size", [64, 128])
def test_4bit_bytes_at_most_0_3_of_bf16(group_size):
    layer, _, _ = _qlinear(4, R=1536, C=576 if group_size == 64 else 512, G=group_size, bias=False)
    R, C = layer.shape
    assert layer.nbytes <= 0.3 * 2 * R * C
    assert layer.qcodes.numel() == R * C // 2  # two 4-bit codes per byte


def test_unknown_kernel_refused():
    layer, _, _ = _qlinear(4)
    with pytest.raises(ValueError, match="kernel='gpu'"):
        layer.set_kernel("gpu")
