"""peft's ROAD format <-> RoadConfig."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deltafleet.adapters.peft_format import (
    PeftFormat,
    check_target_modules,
    int_field,
    nonempty,
    refuse_options,
    str_field,
)
from deltafleet.adapters.road.config import RoadConfig
from deltafleet.errors import ArtifactError


def _from_peft(cfg: dict[str, Any], targets: tuple[str, ...], path: Path) -> RoadConfig:
    refuse_options(cfg, path, {"modules_to_save": nonempty})
    check_target_modules(cfg.get("target_modules"), path)
    variant, group_size = str_field(cfg, "variant", path, "road_1"), int_field(cfg, "group_size", path, 64)
    try:
        return RoadConfig(targets=targets, variant=variant, group_size=group_size)
    except ValueError as e:
        raise ArtifactError(path, str(e)) from None


def _to_peft(cfg: RoadConfig) -> dict[str, Any]:
    return {"peft_type": "ROAD", "variant": cfg.variant, "group_size": cfg.group_size,
            "target_modules": list(cfg.targets), "init_weights": True}


ROAD_PEFT = PeftFormat(kind="road", peft_type="ROAD", key_suffix={"theta": "road_theta", "alpha": "road_alpha"},
                       config_from_peft=_from_peft, config_to_peft=_to_peft)
