"""LoftQ lowers the weight error of RTN; ApiQ lowers the block-output error of RTN + zero LoRA at 2 bits, its
fake quantizer equals the stored one, and its LoRA initialisation is a peft adapter."""

from __future__ import annotations

import json

import pytest
import torch

from deltafleet.adapters import load_adapter
from deltafleet.models.loading import load_model
from deltafleet.quant.apiq import lwc_fake_quant, lwc_quantize
from deltafleet.quant.base import LORA_INIT, MANIFEST
from deltafleet.quant.calib import attention_inputs, embed
from deltafleet.quant.config import QuantConfig
from deltafleet.quant.loftq import loftq_matrix
from deltafleet.quant.pipeline import quantize_base
from deltafleet.store.quantized import QuantizedMatrix
from tests.conftest import assert_close, forward_chain
from tests.quant.conftest import CALIB, tiny_config


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_lwc_fake_quant_equals_stored_quantizer(bits):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(24, 100, generator=g)  # 100 columns: a short last group
    gamma, beta = torch.randn(24, 4, generator=g) * 2, torch.randn(24, 4, generator=g) * 2
    fake = lwc_fake_quant(w, gamma, beta, bits, 32)
    assert torch.equal(fake, lwc_quantize(w, gamma, beta, bits, 32).dequantize())
    big = torch.full((24, 4), 30.0)  # sigmoid = 1: plain min/max clipping is RTN
    assert torch.equal(lwc_fake_quant(w, big, big, bits, 32), QuantizedMatrix.quantize(w, bits, 32).dequantize())


def test_lwc_gradients_reach_clipping_factors():
    w = torch.randn(8, 64)
    gamma = torch.full((8, 2), 4.0, requires_grad=True)
    beta = torch.full((8, 2), 4.0, requires_grad=True)
    lwc_fake_quant(w, gamma, beta, 2, 32).pow(2).sum().backward()
    assert gamma.grad.abs().sum() > 0 and beta.grad.abs().sum() > 0


@pytest.mark.parametrize("bits", [2, 4])
def test_loftq_reduces_weight_error(bits):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 96, generator=g) @ torch.diag(torch.linspace(0.1, 2, 96))
    rtn_err = (QuantizedMatrix.quantize(w, bits, 32).dequantize() - w).norm()
    errs = []
    for iters in (1, 3):
        qm, A, B = loftq_matrix(w, bits, 32, rank=8, scaling=2.0, iters=iters)
        assert A.shape == (8, 96) and B.shape == (64, 8)
        errs.append((qm.dequantize() + 2.0 * B @ A - w).norm())
    assert errs[0] < rtn_err and errs[1] <= errs[0] * 1.001


def _stream_mse(model, path, windows) -> list[float]:
    """Per block: MSE between the full-precision block output on the fp stream and the quantized model's
    (with lora_init when present) block output on its own stream."""
    qmodel, _ = load_model(path)
    init = path / LORA_INIT
    hook = load_adapter(init, model.config).hook() if init.is_dir() else None
    N, T = windows.shape
    a = attention_inputs(model, N, T, torch.float32)
    x_fp, x_q = embed(model, windows), embed(qmodel, windows)
    out = []
    with torch.no_grad():
        for fb, qb in zip(model.model.layers, qmodel.model.layers, strict=True):
            x_fp, x_q = fb(x_fp, a, None), qb(x_q, a, hook)
            out.append(float(torch.nn.functional.mse_loss(x_q, x_fp)))
    return out


def test_apiq_beats_rtn_with_zero_lora_at_2_bits(tiny_llama, tmp_path):
    cfg = tiny_config("apiq", 2, apiq_epochs=4, apiq_lr_lwc=2e-2, apiq_lr_lora=2e-3)
    quantize_base(tiny_llama, cfg, tmp_path / "apiq", dense_dtype="float32")
    quantize_base(tiny_llama, tiny_config("rtn", 2), tmp_path / "rtn", dense_dtype="float32")
    model, _ = load_model(tiny_llama)
    apiq = _stream_mse(model, tmp_path / "apiq", CALIB)
    rtn = _stream_mse(model, tmp_path / "rtn", CALIB)
    assert all(a < r for a, r in zip(apiq, rtn, strict=True)), (apiq, rtn)
    held_out = torch.randint(0, 320, (4, 32), generator=torch.Generator().manual_seed(99))
    assert _stream_mse(model, tmp_path / "apiq", held_out)[-1] < _stream_mse(model, tmp_path / "rtn", held_out)[-1]
    m = json.loads((tmp_path / "apiq" / MANIFEST).read_text())
    assert m["lora_init"] == "lora_init" and m["calibration"]["windows"] == [8, 32]
    assert all(b < a for a, b in zip(m["stats"]["block_loss_first_epoch"], m["stats"]["block_loss_last_epoch"],
                                     strict=True))


def test_lora_init_is_a_peft_adapter_matching_our_hook(quantized_tiny):
    from peft import PeftModel

    from deltafleet.quant.base import hf_causal_lm

    path = quantized_tiny["loftq"]
    cfg = json.loads((path / LORA_INIT / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0
    peft_model = PeftModel.from_pretrained(hf_causal_lm(path), str(path / LORA_INIT)).eval()
    ours, _ = load_model(path)
    hook = load_adapter(path / LORA_INIT, ours.config).hook()
    ids = CALIB[:2, :12]
    with torch.no_grad():
        assert_close(peft_model(ids).logits, ours(ids, hook=hook), "reordered", **forward_chain(ours.config))
        assert (ours(ids, hook=hook) - ours(ids)).abs().max() > 1e-3  # the initialisation is not zero


def test_config_refuses_bad_values():
    with pytest.raises(ValueError, match="method='awq'"):
        QuantConfig("awq")
    with pytest.raises(ValueError, match="bits=5"):
        QuantConfig("rtn", bits=5)
    with pytest.raises(ValueError, match="group_size=0"):
        QuantConfig("rtn", group_size=0)
    with pytest.raises(ValueError, match="targets"):
        QuantConfig("apiq", targets=("lm_head",))
