"""RoAd: 2D rotary adaptation (Liao & Monz, NeurIPS 2024, arXiv:2409.00119, Sec. 3.2, Eqs. 2-4).

Pairing follows Hugging Face peft's `RoadConfig` (`group_size` convention), so adapters trained with peft
load unchanged: see ../shared/reference/methods.md section 1.5.
"""

from deltafleet.adapters.peft_format import register_peft_format
from deltafleet.adapters.registry import register_kind
from deltafleet.adapters.road.config import RoadConfig
from deltafleet.adapters.road.functional import RoadKind
from deltafleet.adapters.road.peft import ROAD_PEFT

register_kind(RoadKind())
register_peft_format(ROAD_PEFT)

__all__ = ["RoadConfig", "RoadKind"]
