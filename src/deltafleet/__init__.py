"""deltafleet: one base LLM, many tenants' customisations (LoRA, RoAd, compressed deltas) in the same batch."""

import os

# Nothing in deltafleet downloads from a model hub: fail at once instead of retrying for ~25 s.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

__version__ = "0.1.0"
