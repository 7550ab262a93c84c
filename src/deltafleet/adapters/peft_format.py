"""Translation between peft's on-disk adapter format and our typed configs, one entry per peft type.

peft writes `adapter_config.json` and `adapter_model.safetensors` whose keys look like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`. Each kind that peft knows registers a
`PeftFormat`: its peft type, how our parameter names map to peft's key suffixes, and config conversion.
Options we do not serve (DoRA, trained biases, `modules_to_save`, per-module rank patterns) are refused
with an error naming the field, and so is a field of the wrong JSON type (`int_field`, `number_field`, ...: no
silent coercion of, say, `"r": 4.5` or `"lora_alpha": NaN`).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltafleet.adapters.registry import AdapterConfig
from deltafleet.errors import ArtifactError
from deltafleet.models.config import PROJECTIONS
from deltafleet.registry import Registry
from deltafleet.store.safetensors_io import short

# A layer index of at most 9 digits: int() of a longer one can exceed Python's digit limit, and no model is that deep.
KEY_RE = re.compile(r"^base_model\.model\.model\.layers\.([0-9]{1,9})\.(self_attn|mlp)\.(\w+)\.(.+)$")
PEFT_KEY_PREFIX = "base_model.model."


@dataclass(frozen=True)
class PeftFormat:
    kind: str
    peft_type: str
    key_suffix: dict[str, str]  # our parameter name -> peft key suffix
    config_from_peft: Callable[[dict[str, Any], tuple[str, ...], Path], AdapterConfig]
    config_to_peft: Callable[[AdapterConfig], dict[str, Any]]


PEFT_FORMATS: Registry[PeftFormat] = Registry("peft type")


def register_peft_format(fmt: PeftFormat) -> None:
    PEFT_FORMATS.register(fmt.peft_type, fmt)


def peft_format_for_kind(kind: str) -> PeftFormat | None:
    return next((f for f in PEFT_FORMATS.values() if f.kind == kind), None)


def peft_format_of(cfg: dict[str, Any], path: Path) -> PeftFormat:
    """The registered format of an `adapter_config.json` by its `peft_type` (a string)."""
    peft_type = cfg.get("peft_type")
    fmt = PEFT_FORMATS.get(peft_type) if isinstance(peft_type, str) else None
    if fmt is None:
        raise ArtifactError(path, f"peft_type={short(peft_type)} is not supported; supported: {sorted(PEFT_FORMATS)}")
    return fmt


_MISSING = object()


def is_finite_number(v: Any) -> bool:
    """A JSON number that is a finite float (an int beyond float's range is not: it would overflow)."""
    if isinstance(v, bool) or not isinstance(v, int | float):
        return False
    return abs(v) <= sys.float_info.max if isinstance(v, int) else math.isfinite(v)


def _field(cfg: dict[str, Any], field: str, path: Path, default: Any, ok: Callable[[Any], bool], what: str) -> Any:
    value = cfg.get(field)
    if value is None:
        if default is _MISSING:
            raise ArtifactError(path, f"missing field {field!r}")
        return default
    if not ok(value):
        raise ArtifactError(path, f"field {field!r}={short(value)}: must be {what}")
    return value


def int_field(cfg: dict[str, Any], field: str, path: Path, default: Any = _MISSING) -> int:
    """cfg[field] as an integer (JSON null or absent: `default`, required when none is given)."""
    return _field(cfg, field, path, default, lambda v: isinstance(v, int) and not isinstance(v, bool), "an integer")


def number_field(cfg: dict[str, Any], field: str, path: Path, default: Any = _MISSING) -> float:
    """cfg[field] as a finite number."""
    return float(_field(cfg, field, path, default, is_finite_number, "a finite number"))


def bool_field(cfg: dict[str, Any], field: str, path: Path, default: Any = _MISSING) -> bool:
    return _field(cfg, field, path, default, lambda v: isinstance(v, bool), "true or false")


def str_field(cfg: dict[str, Any], field: str, path: Path, default: Any = _MISSING) -> str:
    return _field(cfg, field, path, default, lambda v: isinstance(v, str), "a string")


def check_target_modules(value: Any, path: Path) -> None:
    """peft's target_modules: a list of module names/suffixes, a regex string, or 'all-linear'."""
    if value is None or isinstance(value, str):
        return  # regex or "all-linear": the tensors present decide what is adapted
    if not isinstance(value, list):
        raise ArtifactError(path, f"field 'target_modules' must be a list or a string, got {type(value).__name__}")
    for name in value:
        if str(name).rsplit(".", 1)[-1] not in PROJECTIONS:
            raise ArtifactError(
                path, f"field 'target_modules' names unknown module {short(name)}; adapters may target {PROJECTIONS}"
            )


def refuse_options(cfg: dict[str, Any], path: Path, rules: dict[str, Callable[[Any], bool]]) -> None:
    """rules: field -> predicate that is True when the value is one we cannot serve."""
    for field, unsupported in rules.items():
        if field in cfg and unsupported(cfg[field]):
            raise ArtifactError(path, f"field {field!r}={short(cfg[field])} is not supported by deltafleet")


def nonempty(v: Any) -> bool:
    return bool(v)
