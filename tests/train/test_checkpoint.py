"""Checkpoints: AdamW state and trainable weights round-trip exactly through safetensors + JSON (no pickle),
and a checkpoint of a different run is refused."""

from __future__ import annotations

import pytest
import torch

from deltafleet.errors import DeltafleetError
from deltafleet.train.checkpoint import Progress, latest_checkpoint, load_checkpoint, save_checkpoint

RUN = {"base_fingerprint": "sha256:0", "task": "sort", "method": "lora", "hyperparameters": {"lr": 0.1}}


def _trained(seed: int):
    g = torch.Generator().manual_seed(seed)
    params = {"a.weight": torch.nn.Parameter(torch.randn(4, 3, generator=g)),
              "b.bias": torch.nn.Parameter(torch.randn(5, generator=g))}
    opt = torch.optim.AdamW(params.values(), lr=0.1, weight_decay=0.01)
    for _ in range(3):
        loss = sum((p**2).sum() for p in params.values())
        loss.backward()
        opt.step()
        opt.zero_grad()
    return params, opt


def _step(params, opt):
    loss = sum((p**3).sum() for p in params.values())
    loss.backward()
    opt.step()
    opt.zero_grad()


def test_round_trip_continues_identically(tmp_path):
    params, opt = _trained(0)
    save_checkpoint(tmp_path, params, opt, Progress(step=3, losses=[3.0, 2.0, 1.0], train_seconds=1.5, tokens=9), RUN)
    save_checkpoint(tmp_path, params, opt, Progress(step=4, losses=[3.0, 2.0, 1.0, 0.5], tokens=12), RUN)
    last = latest_checkpoint(tmp_path)
    assert last.name == "step-00000004" and len(list((tmp_path / "checkpoints").iterdir())) == 1  # older removed
    assert sorted(p.name for p in last.iterdir()) == ["optimizer.safetensors", "state.json", "trainable.safetensors"]

    fresh, fresh_opt = _trained(1)  # other weights and moments, overwritten by the load
    progress = load_checkpoint(last, fresh, fresh_opt, RUN)
    assert progress == Progress(step=4, losses=[3.0, 2.0, 1.0, 0.5], train_seconds=0.0, tokens=12)
    _step(params, opt)
    _step(fresh, fresh_opt)
    for name in params:
        torch.testing.assert_close(fresh[name], params[name], atol=0, rtol=0)
        for k in ("exp_avg", "exp_avg_sq", "step"):
            torch.testing.assert_close(fresh_opt.state[fresh[name]][k], opt.state[params[name]][k], atol=0, rtol=0)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    params, opt = _trained(0)
    save_checkpoint(tmp_path, params, opt, Progress(step=3), RUN)
    other = {**RUN, "hyperparameters": {"lr": 0.2}}
    with pytest.raises(DeltafleetError, match=r"cannot resume: hyperparameters=\{'lr': 0.1\} in the checkpoint"):
        load_checkpoint(latest_checkpoint(tmp_path), params, opt, other)
    assert latest_checkpoint(tmp_path / "nothing-here") is None
