"""Translation between peft's on-disk adapter format and our typed configs, one entry per peft type.

peft writes `adapter_config.json` and `adapter_model.safetensors` whose keys look like
`base_model.model.model.layers.3.self_attn.q_proj.lora_A.weight`. Each kind that peft knows registers a
`PeftFormat`: its peft type, how our parameter names map to peft's key suffixes, and config conversion.
Options we do not serve (DoRA, trained biases, `modules_to_save`, per-module rank patterns) are refused
with an error naming the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deltafleet.adapters.registry import AdapterConfig
from deltafleet.errors import ArtifactError
from deltafleet.models.config import PROJECTIONS
from deltafleet.registry import Registry

KEY_RE = re.compile(r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.(.+)$")
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


def check_target_modules(value: Any, path: Path) -> None:
    """peft's target_modules: a list of module names/suffixes, a regex string, or 'all-linear'."""
    if value is None or isinstance(value, str):
        return  # regex or "all-linear": the tensors present decide what is adapted
    if not isinstance(value, list):
        raise ArtifactError(path, f"field 'target_modules' must be a list or a string, got {type(value).__name__}")
    for name in value:
        if str(name).rsplit(".", 1)[-1] not in PROJECTIONS:
            raise ArtifactError(
                path, f"field 'target_modules' names unknown module {name!r}; adapters may target {PROJECTIONS}"
            )


def refuse_options(cfg: dict[str, Any], path: Path, rules: dict[str, Callable[[Any], bool]]) -> None:
    """rules: field -> predicate that is True when the value is one we cannot serve."""
    for field, unsupported in rules.items():
        if field in cfg and unsupported(cfg[field]):
            raise ArtifactError(path, f"field {field!r}={cfg[field]!r} is not supported by deltafleet")


def nonempty(v: Any) -> bool:
    return bool(v)
