"""The synthetic long-tailed fine-tune: its deltas have the asked spectrum and size, and only projections change."""

from __future__ import annotations

import torch

from deltafleet.compress import extract_deltas
from deltafleet.compress.synthetic import long_tailed_delta, write_synthetic_finetune


def test_long_tailed_delta_has_a_power_law_spectrum_and_the_asked_size():
    W = torch.randn(48, 32)
    d = long_tailed_delta(W, alpha=0.75, rel=0.05, generator=torch.Generator().manual_seed(0))
    s = torch.linalg.svdvals(d)
    k = torch.arange(1, 33, dtype=torch.float32)
    assert torch.allclose(s / s[0], k.pow(-0.75), rtol=1e-4, atol=1e-6)
    assert abs(float(d.norm() / W.norm()) - 0.05) < 1e-5


def test_the_synthetic_finetune_changes_projections_only(tiny_llama, tmp_path):
    out = write_synthetic_finetune(tiny_llama, tmp_path / "ft", alpha=0.5, rel=0.02, seed=1)
    ds = extract_deltas(tiny_llama, out)
    assert ds.extras == {} and len(ds.deltas) > 0
    for d in ds.deltas.values():
        s = torch.linalg.svdvals(d)
        assert float(s[-1] / s[0]) > 0.05  # a long tail, not a low-rank delta
