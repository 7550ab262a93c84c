"""Our Llama-family model, its config, and loading of checkpoints (HF directories and the embedded GGUF)."""

from deltafleet.models.config import ModelConfig
from deltafleet.models.llama import KVCache, Transformer

__all__ = ["KVCache", "ModelConfig", "Transformer"]
