"""Quantized bases of the tiny random Llama, built once per session (calibration on random token windows)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from deltafleet.quant.config import QuantConfig
from deltafleet.quant.pipeline import quantize_base

CALIB = torch.randint(0, 320, (8, 32), generator=torch.Generator().manual_seed(7))


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """These tests run many small ops: one intra-op thread avoids oversubscribing a shared 2-core CPU
    (measured: ApiQ on the tiny model 11 s with 2 threads under load, 1 s with one)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _random_calibration(monkeypatch):
    """Tiny checkpoints have no tokenizer: calibration reads fixed random windows instead of text."""
    import deltafleet.quant.pipeline as pipeline

    monkeypatch.setattr(pipeline, "calibration_windows",
                        lambda path, cfg, calib: (CALIB[: cfg.calib_samples, : cfg.calib_seq_len], "random"))


def tiny_config(method: str, bits: int, **kw) -> QuantConfig:
    defaults = dict(group_size=32, calib_samples=8, calib_seq_len=32, rank=4, alpha=8.0, apiq_epochs=2,
                    loftq_iters=2)
    return QuantConfig(method, bits=bits, **{**defaults, **kw})


@pytest.fixture(scope="session")
def quantized_tiny(tiny_llama, tmp_path_factory) -> dict[str, Path]:
    """method -> quantized base directory of the tiny llama, 4-bit, dense tensors fp32."""
    import deltafleet.quant.pipeline as pipeline

    saved = pipeline.calibration_windows
    pipeline.calibration_windows = lambda path, cfg, calib: (CALIB, "random")
    try:
        out = {}
        for method in ("rtn", "gptq", "loftq"):  # gptq: calibrated on 8 random windows of 32 tokens
            d = tmp_path_factory.mktemp(f"q-{method}") / "base"
            quantize_base(tiny_llama, tiny_config(method, 4), d, dense_dtype="float32")
            out[method] = d
        return out
    finally:
        pipeline.calibration_windows = saved
