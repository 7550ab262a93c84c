"""A short RoAd run on the real SmolLM2-135M (30 layers, k/v out 192 = 3 RoAd groups of 64)."""

from __future__ import annotations

import json

import pytest

from deltafleet.adapters import load_adapter
from deltafleet.models.config import ModelConfig
from deltafleet.store.fingerprint import base_fingerprint
from deltafleet.train.config import TrainConfig
from deltafleet.train.recipe import train


@pytest.mark.integration
def test_road_on_smollm2_loads_with_the_base_fingerprint(smollm2_path, tmp_path):
    cfg = TrainConfig(base="smollm2-135m", task="multiplication", method="road", out=tmp_path, steps=2,
                      batch_size=2, precision="fp32", eval_examples=2)
    result = train(cfg, show_progress=False)
    assert result.completed and all(0 < loss < 20 for loss in result.losses)
    manifest = json.loads((tmp_path / "deltafleet.json").read_text())
    fingerprint = base_fingerprint(smollm2_path)
    assert manifest["base_fingerprint"] == fingerprint and manifest["base_model"] == "smollm2-135m"
    model_cfg = ModelConfig.from_file(smollm2_path / "config.json")
    adapter = load_adapter(tmp_path, model_cfg, expected_fingerprint=fingerprint)
    assert adapter.config.variant == "road_1" and len(adapter.layers) == 30
    # road_1: theta and alpha, out/2 each, per projection
    assert adapter.num_params == manifest["trainable_params"] == 30 * (576 + 192 + 192 + 576 + 1536 + 1536 + 576)
