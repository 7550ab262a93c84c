"""Quantize a base model into a quantized-base directory (`deltafleet quantize`), one linear function:

    resolve + load the full-precision base (fp32) -> calibration windows (methods that need them) -> quantizer
    (registry `QUANTIZERS`) -> write config, tokenizer, quantized.safetensors, manifest -> [lora_init/]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from deltafleet.dtypes import DTYPES
from deltafleet.errors import DeltafleetError
from deltafleet.models.config import PROJECTIONS
from deltafleet.models.loading import load_model, load_tokenizer
from deltafleet.quant.base import TABLES, is_quantized_base, module_name, write_lora_init, write_quantized_base
from deltafleet.quant.config import QuantConfig
from deltafleet.quant.registry import QUANTIZERS, RunContext
from deltafleet.store.fingerprint import base_fingerprint
from deltafleet.store.quantized import QuantizedMatrix
from deltafleet.tasks.text import shakespeare_text, text_file, token_windows


def calibration_windows(path: Path, cfg: QuantConfig, calib: str | Path | None) -> tuple[torch.Tensor, str]:
    """(N, T) windows of the calibration text, tokenized by the base at `path`: `calib` (a UTF-8 file) or the
    Shakespeare train plays."""

    tokenizer = load_tokenizer(path)
    text, source = (text_file(calib), str(calib)) if calib else (shakespeare_text("train"), "shakespeare:train")
    n, seq_len = cfg.calibration_shape
    return token_windows(tokenizer, text, n, seq_len, cfg.seed), source


def quantize_base(base: str | Path, cfg: QuantConfig, out: str | Path, calib: str | Path | None = None,
                  dense_dtype: str = "bfloat16", progress: Callable[[str], None] = lambda _: None,
                  resume: bool = False, show_progress: bool = True) -> dict[str, Any]:
    """Write the quantized base of `base` into `out`; returns its manifest. A method that trains (OneBit) keeps
    checkpoints in `out` while it runs and continues from the latest with `resume`."""

    if dense_dtype not in DTYPES:
        raise DeltafleetError(f"dense_dtype={dense_dtype!r}: must be one of {sorted(DTYPES)}")
    out = Path(out)
    quantizer = QUANTIZERS[cfg.method]
    model, path = load_model(base, dtype=torch.float32, progress=progress)
    if is_quantized_base(path):
        raise DeltafleetError(f"{path}: is already a quantized base; quantize the full-precision source instead")
    manifest: dict[str, Any] = {"method": cfg.method, "bits": cfg.bits, "group_size": cfg.group_size,
                                "dense_dtype": dense_dtype, "settings": cfg.settings(),
                                "source": {"base": str(base), "fingerprint": base_fingerprint(path)}}
    windows = None
    if quantizer.needs_calibration and cfg.calibration_shape[0] > 0:
        windows, source = calibration_windows(path, cfg, calib)
        manifest["calibration"] = {"text": source, "windows": list(windows.shape)}
    t0 = time.perf_counter()
    result = quantizer.run(model, cfg, windows, progress, RunContext(out, resume, show_progress))
    manifest["seconds"] = round(time.perf_counter() - t0, 2)
    manifest["stats"] = result.stats
    if quantizer.codec != "affine":  # absent: affine (every base written before OneBit)
        manifest["codec"] = quantizer.codec
        manifest.pop("group_size")
    manifest["lora_init"] = "lora_init" if result.lora else None
    projection_keys = {f"{module_name(layer, p)}.weight" for layer in range(model.config.num_layers)
                       for p in PROJECTIONS}
    dense = {k: v.detach().to(DTYPES[dense_dtype]) for k, v in model.state_dict().items()
             if k not in projection_keys}
    if model.config.tie_word_embeddings:
        dense.pop("lm_head.weight", None)
    tables = {}
    if cfg.embedding == "rtn":
        for prefix in TABLES:
            w = dense.pop(f"{prefix}.weight", None)
            if w is not None:
                tables[prefix] = QuantizedMatrix.quantize(w.float(), cfg.bits, cfg.group_size)
    written = write_quantized_base(out, path, result.matrices, dense, manifest, tables)
    if result.lora:
        write_lora_init(out, result.lora, cfg.rank, cfg.alpha, cfg.targets, base_fingerprint(out), cfg.method)
    return written
