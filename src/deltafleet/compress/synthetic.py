"""A synthetic full fine-tune with long-tailed projection deltas, for measuring compressors where the truth is known.

Each projection gets Delta = U diag(s) V^T with s_k = k^(-alpha) (k = 1..min(out, in)), U and V random orthonormal
(QR of Gaussian matrices), scaled so ||Delta||_F = rel * ||W||_F. Real fine-tunes' deltas have such slowly decaying
spectra (Delta-CoMe, Ping et al. 2024, arXiv:2406.08903, Sec. 2: a long tail that low-rank truncation drops);
alpha in [0.5, 1.0] and rel of a few percent is the regime issue 18 asks delta-come to win in. Nothing but the
projections changes, so every byte of the delta is in what the compressors see.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from torch import Tensor

from deltafleet.compress.delta import load_state, projection_name
from deltafleet.models.config import PROJECTIONS
from deltafleet.models.loading import resolve_base
from deltafleet.store.safetensors_io import save_tensors


def long_tailed_delta(W: Tensor, alpha: float, rel: float, generator: torch.Generator) -> Tensor:
    """(out, in) fp32 delta for weight W (out, in): power-law singular values, random singular vectors."""
    out_f, in_f = W.shape
    k = min(out_f, in_f)
    U, _ = torch.linalg.qr(torch.randn(out_f, k, generator=generator))
    V, _ = torch.linalg.qr(torch.randn(in_f, k, generator=generator))
    s = torch.arange(1, k + 1, dtype=torch.float32).pow(-alpha)
    delta = (U * s) @ V.T
    return delta * (rel * W.float().norm() / delta.norm())


def write_synthetic_finetune(base: str | Path, out: Path, alpha: float = 0.75, rel: float = 0.03,
                             seed: int = 0) -> Path:
    """A checkpoint directory `out`: the base with a long-tailed delta added to every projection (fp32 weights;
    config and tokenizer files copied)."""
    base_path = resolve_base(base)
    cfg, state = load_state(base_path)
    g = torch.Generator().manual_seed(seed)
    out.mkdir(parents=True, exist_ok=True)
    for f in base_path.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, out / f.name)
    tensors = {n: t.float().contiguous() for n, t in state.items()}
    for layer in range(cfg.num_layers):
        for proj in PROJECTIONS:
            name = projection_name(layer, proj)
            tensors[name] = (tensors[name] + long_tailed_delta(tensors[name], alpha, rel, g)).contiguous()
    save_tensors(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
