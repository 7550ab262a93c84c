"""LoRA (Hu et al., 2021, arXiv:2106.09685, Sec. 4.1), with rsLoRA scaling (Kalajdzievic, 2023, arXiv:2312.03732)."""

from deltafleet.adapters.lora.config import LoraConfig
from deltafleet.adapters.lora.functional import LoraKind
from deltafleet.adapters.lora.peft import LORA_PEFT
from deltafleet.adapters.peft_format import register_peft_format
from deltafleet.adapters.registry import register_kind

register_kind(LoraKind())
register_peft_format(LORA_PEFT)

__all__ = ["LoraConfig", "LoraKind"]
