"""peft's LORA format <-> LoraConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltafleet.adapters.lora.config import LoraConfig
from deltafleet.adapters.peft_format import (
    PeftFormat,
    bool_field,
    check_target_modules,
    int_field,
    nonempty,
    number_field,
    refuse_options,
)
from deltafleet.errors import ArtifactError


def _from_peft(cfg: dict[str, Any], targets: tuple[str, ...], path: Path) -> LoraConfig:
    refuse_options(cfg, path, {
        "use_dora": nonempty, "fan_in_fan_out": nonempty, "modules_to_save": nonempty,
        "rank_pattern": nonempty, "alpha_pattern": nonempty, "lora_bias": nonempty,
        "bias": lambda v: v not in (None, "none"), "layer_replication": nonempty,
        "trainable_token_indices": nonempty, "use_qalora": nonempty,
    })
    check_target_modules(cfg.get("target_modules"), path)
    r, alpha = int_field(cfg, "r", path), number_field(cfg, "lora_alpha", path, 8.0)
    try:
        return LoraConfig(targets=targets, r=r, alpha=alpha, use_rslora=bool_field(cfg, "use_rslora", path, False))
    except ValueError as e:
        raise ArtifactError(path, str(e)) from None


def _to_peft(cfg: LoraConfig) -> dict[str, Any]:
    return {"peft_type": "LORA", "r": cfg.r, "lora_alpha": cfg.alpha, "use_rslora": cfg.use_rslora,
            "target_modules": list(cfg.targets), "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
            "use_dora": False, "init_lora_weights": True}


LORA_PEFT = PeftFormat(kind="lora", peft_type="LORA", key_suffix={"A": "lora_A.weight", "B": "lora_B.weight"},
                       config_from_peft=_from_peft, config_to_peft=_to_peft)
