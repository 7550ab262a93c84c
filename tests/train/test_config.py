"""TrainConfig: method defaults, validation errors naming field, value and rule."""

from __future__ import annotations

import pytest

from deltafleet.dtypes import native_bf16
from deltafleet.models.config import PROJECTIONS
from deltafleet.train.config import TrainConfig


def _cfg(**kw):
    return TrainConfig(**{"base": "b", "task": "addition", "method": "lora", "out": "o", **kw})


def test_method_defaults():
    assert _cfg().lr == 3e-4 and _cfg().targets == PROJECTIONS
    assert _cfg(method="road").lr == pytest.approx(10 * _cfg().lr)
    assert _cfg(method="ia3").targets == ("k_proj", "v_proj", "down_proj")
    full = _cfg(method="full")
    assert full.lr == 2e-5 and full.targets == ()
    assert _cfg(lr=1e-3).lr == 1e-3
    assert _cfg(steps=50, warmup_ratio=0.1).warmup_steps == 5
    assert _cfg().precision == ("bf16" if native_bf16() else "fp32")  # auto: bf16 only with hardware support
    assert _cfg(precision="bf16").precision == "bf16" and _cfg(precision="fp32").precision == "fp32"


def test_hyperparameters_hold_only_this_methods_options():
    lora = _cfg().hyperparameters()
    assert lora["lora_rank"] == 8 and "road_variant" not in lora and lora["targets"] == list(PROJECTIONS)
    road = _cfg(method="road", road_variant="road_4").hyperparameters()
    assert road["road_variant"] == "road_4" and "lora_rank" not in road
    full = _cfg(method="full").hyperparameters()
    assert "targets" not in full and "lora_alpha" not in full and full["lr"] == 2e-5
    assert "out" not in lora and "save_every" not in lora and "resume" not in lora


@pytest.mark.parametrize(("kw", "message"), [
    ({"method": "dora"}, "method='dora': must be one of"),
    ({"task": "chess"}, "task='chess': must be one of"),
    ({"steps": 0}, "steps=0: must be a positive integer"),
    ({"batch_size": 2.5}, "batch_size=2.5: must be a positive integer"),
    ({"save_every": -1}, "save_every=-1: must be a non-negative integer"),
    ({"lr": -1.0}, "lr=-1.0: must be > 0"),
    ({"warmup_ratio": 1.0}, r"warmup_ratio=1.0: must be in \[0, 1\)"),
    ({"weight_decay": -0.1}, "weight_decay=-0.1: must be >= 0"),
    ({"road_variant": "road_3", "method": "road"}, "road_variant='road_3': must be one of"),
    ({"road_group_size": 63}, "road_group_size=63: must be even"),
    ({"precision": "fp16"}, "precision='fp16': must be one of"),
    ({"targets": ("q_proj", "lm_head")}, r"targets=\('q_proj', 'lm_head'\): must name one or more of"),
    ({"targets": ()}, r"targets=\(\): must name one or more of"),
    ({"method": "full", "targets": ("q_proj",)}, "method 'full' trains every weight; it takes no targets"),
])
def test_invalid_settings_are_refused(kw, message):
    with pytest.raises(ValueError, match=message):
        _cfg(**kw)
