"""The fine-tuning methods, one registry entry each: how to make a model trainable and how to export it.

Adapter methods wrap the transformers model with peft (`get_peft_model`) and export peft's own directory
layout (`save_pretrained`: `adapter_config.json` + `adapter_model.safetensors`):
- `lora`: LoRA (Hu et al. 2021, arXiv 2106.09685), W x + (alpha / r) B A x, B = 0 at init, or started from a
  peft LoRA directory (`lora_init`: LoftQ / ApiQ initialisations written by `deltafleet quantize`);
- `road`: RoAd (Liao et al. 2024, arXiv 2409.00119), a learned 2x2 rotation-and-scale of output pairs;
- `ia3`: IA3 (Liu et al. 2022, arXiv 2205.05638), learned scaling of keys, values and the FFN input.
`pafi` (PaFi, Liao et al. 2023, arXiv 2305.16742) trains a data-free magnitude mask of each target projection and
exports a `deltafleet-pafi` tenant (`train.pafi`); `meft` (MEFT, Liao et al. 2023, arXiv 2306.00477) makes the
network reversible with bottleneck adapters and recomputes activations in the backward pass (`train.meft`); `hiwi`
(HiWi, the PaFi paper) maps the RMSNorm gains through an adapter and exports the changed gains (`train.hiwi`).
`full` trains every weight and exports a safetensors Hugging Face checkpoint plus the tokenizer, without a
`quantization_config`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from deltafleet.errors import ArtifactError
from deltafleet.models.config import PROJECTIONS
from deltafleet.train.registry import METHODS, Method, register_method

if TYPE_CHECKING:
    from deltafleet.train.config import TrainConfig

MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def _peft(make_config: Callable[[TrainConfig], object]) -> Callable:
    def prepare(model, cfg: TrainConfig):
        from peft import get_peft_model

        return get_peft_model(model, make_config(cfg))

    return prepare


def _lora_config(cfg: TrainConfig):
    from peft import LoraConfig

    return LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha, target_modules=list(cfg.targets),
                      lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")


def _prepare_lora(model, cfg: TrainConfig):
    """Fresh LoRA (B = 0), or the peft LoRA directory `cfg.lora_init` loaded trainable."""
    if cfg.lora_init is None:
        return _peft(_lora_config)(model, cfg)
    from peft import PeftModel


    path = Path(cfg.lora_init) / "adapter_config.json"
    try:
        init = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(path, "lora_init must be a peft LoRA directory (adapter_config.json not found)") from None
    except json.JSONDecodeError as e:
        raise ArtifactError(path, f"not valid JSON ({e})") from None
    want = {"peft_type": "LORA", "r": cfg.lora_rank, "lora_alpha": cfg.lora_alpha}
    for field, value in want.items():
        if init.get(field) != value:
            raise ArtifactError(path, f"{field}={init.get(field)!r}, but this run uses {value!r}")
    if sorted(init.get("target_modules") or []) != sorted(cfg.targets):
        raise ArtifactError(path, f"target_modules={init.get('target_modules')!r}, but this run targets "
                                  f"{list(cfg.targets)!r}")
    return PeftModel.from_pretrained(model, str(cfg.lora_init), is_trainable=True)


def _road_config(cfg: TrainConfig):
    from peft import RoadConfig

    return RoadConfig(variant=cfg.road_variant, group_size=cfg.road_group_size, target_modules=list(cfg.targets),
                      task_type="CAUSAL_LM")


def _ia3_config(cfg: TrainConfig):
    from peft import IA3Config

    return IA3Config(target_modules=list(cfg.targets),
                     feedforward_modules=[t for t in cfg.targets if t in MLP_PROJECTIONS], task_type="CAUSAL_LM")


def _export_peft(model, tokenizer, out: Path) -> str:
    model.save_pretrained(str(out))
    return "peft"


def _prepare_full(model, cfg: TrainConfig):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def _export_full(model, tokenizer, out: Path) -> str:
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(out), safe_serialization=True)
    tokenizer.save_pretrained(str(out))
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    if "quantization_config" in config:
        del config["quantization_config"]
        config_path.write_text(json.dumps(config, indent=2))
    return "hf-checkpoint"


register_method(Method("lora", "lora", 3e-4, PROJECTIONS, ("targets", "lora_rank", "lora_alpha", "lora_init"),
                       _prepare_lora, _export_peft))
register_method(Method("road", "road", 3e-3, PROJECTIONS, ("targets", "road_variant", "road_group_size"),
                       _peft(_road_config), _export_peft))
register_method(Method("ia3", "ia3", 3e-3, ("k_proj", "v_proj", "down_proj"), ("targets",),
                       _peft(_ia3_config), _export_peft))
register_method(Method("full", "full", 2e-5, (), (), _prepare_full, _export_full))

# Methods in their own modules register themselves on import.
from deltafleet.train import hiwi, meft, pafi  # noqa: E402, F401

__all__ = ["METHODS", "MLP_PROJECTIONS", "Method", "register_method"]
