"""HiWi: an adapter on the pretrained RMSNorm gains, stored as the changed gains (Liao et al., ACL 2023,
arXiv 2305.16742); one kind (`hiwi`) and its tenant format (`io`)."""

from deltafleet.adapters.hiwi.functional import HiwiConfig, HiwiKind, apply_gain_delta
from deltafleet.adapters.registry import register_kind

register_kind(HiwiKind())

__all__ = ["HiwiConfig", "HiwiKind", "apply_gain_delta"]
