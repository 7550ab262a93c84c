"""Typed config of a Llama-family decoder, read from a Hugging Face `config.json`.

Supported `model_type`s: llama (optionally llama3 RoPE scaling), qwen2 (q/k/v bias) and mistral without a
sliding window. Anything else is refused with `UnsupportedModelError` naming the file and the rule; a config.json
that is unreadable, not JSON, or holds a missing or out-of-range field raises `ArtifactError` (nothing else:
`tests/fuzz`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from deltafleet.errors import ArtifactError, UnsupportedModelError
from deltafleet.store.manifest import read_json_object

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "mistral")
SUPPORTED_ROPE_TYPES = ("default", "llama3")
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
NORMS = ("input_layernorm", "post_attention_layernorm")  # a decoder layer's RMSNorms (adapted by HiWi tenants)
# Model-level modules a whole fine-tune changes, keyed (MODEL_LAYER, name) beside the decoder layers' (layer, name):
# the embedding table and the LM head (one table when tied), and the final RMSNorm.
MODEL_LAYER = -1
TABLES = ("embed_tokens", "lm_head")
FINAL_NORM = "norm"
GAIN_NORMS = (*NORMS, FINAL_NORM)  # every RMSNorm gain a whole fine-tune may change


MAX_ELEMENTS = 2**60  # a tensor's bytes must fit torch's signed 64-bit sizes, at up to 8 bytes an element


def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _finite_positive(v: object) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0 and (
        v <= 2**1023 if isinstance(v, int) else math.isfinite(v))


def _token_id(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class RopeConfig:
    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise ValueError(f"rope_type={self.rope_type!r}: must be one of {SUPPORTED_ROPE_TYPES}")
        for name in ("theta", "factor", "low_freq_factor", "high_freq_factor"):
            value = getattr(self, name)
            if not _finite_positive(value):
                raise ValueError(f"rope {name}={value!r}: must be a finite number > 0")
        if self.rope_type == "llama3" and not self.low_freq_factor < self.high_freq_factor:
            raise ValueError(f"rope low_freq_factor={self.low_freq_factor} must be < high_freq_factor="
                             f"{self.high_freq_factor} (llama3 interpolates between them)")
        if not _positive_int(self.original_max_position_embeddings):
            raise ValueError(f"rope original_max_position_embeddings={self.original_max_position_embeddings!r}: "
                             f"must be a positive integer")


@dataclass(frozen=True)
class ModelConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope: RopeConfig = field(default_factory=RopeConfig)
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim"):
            value = getattr(self, name)
            if not _positive_int(value):
                raise ValueError(f"{name}={value!r}: must be a positive integer")
        biggest = max(self.vocab_size, self.intermediate_size, self.num_heads * self.head_dim) * self.hidden_size
        if biggest > MAX_ELEMENTS:
            raise ValueError(f"the config's largest weight would have {biggest} elements, more than a tensor can "
                             f"hold ({MAX_ELEMENTS})")
        if not _finite_positive(self.rms_norm_eps):
            raise ValueError(f"rms_norm_eps={self.rms_norm_eps!r}: must be a finite number > 0")
        if not _positive_int(self.max_position_embeddings):
            raise ValueError(f"max_position_embeddings={self.max_position_embeddings!r}: must be a positive integer")
        if not (self.bos_token_id is None or _token_id(self.bos_token_id)):
            raise ValueError(f"bos_token_id={self.bos_token_id!r}: must be a token id or null")
        eos = self.eos_token_id
        if not (eos is None or _token_id(eos) or (isinstance(eos, list | tuple) and all(map(_token_id, eos)))):
            raise ValueError(f"eos_token_id={eos!r}: must be a token id, a list of token ids, or null")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads} (GQA)"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim}: must be even for RoPE")

    def linear_shape(self, proj: str) -> tuple[int, int]:
        """(out_features, in_features) of one of the seven projections."""
        h, i, hd = self.hidden_size, self.intermediate_size, self.head_dim
        shapes = {
            "q_proj": (self.num_heads * hd, h),
            "k_proj": (self.num_kv_heads * hd, h),
            "v_proj": (self.num_kv_heads * hd, h),
            "o_proj": (h, self.num_heads * hd),
            "gate_proj": (i, h),
            "up_proj": (i, h),
            "down_proj": (h, i),
        }
        if proj not in shapes:
            raise ValueError(f"projection {proj!r}: must be one of {PROJECTIONS}")
        return shapes[proj]

    def module_shape(self, name: str) -> tuple[int, int]:
        """(out, in) of an adaptable module: a projection's, (H, H) for an RMSNorm (its gain is an (H,) vector;
        out = in = H keeps the kinds' `param_shapes(cfg, out, in)` signature), or (V, H) for a table (`TABLES`: the
        LM head's orientation; the embedding table is stored (V, H) too, a token's row is its embedding)."""
        if name in GAIN_NORMS:
            return self.hidden_size, self.hidden_size
        if name in TABLES:
            return self.vocab_size, self.hidden_size
        return self.linear_shape(name)

    def module_keys(self) -> list[tuple[int, str]]:
        """Every module a whole fine-tune's delta may change, (layer, name): the projections and norms of each
        decoder layer, then the model-level ones (`MODEL_LAYER`): the tables (one when tied) and the final norm."""
        tables = TABLES[1:] if self.tie_word_embeddings else TABLES
        return ([(layer, n) for layer in range(self.num_layers) for n in (*PROJECTIONS, *NORMS)]
                + [(MODEL_LAYER, n) for n in (*tables, FINAL_NORM)])

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        if self.eos_token_id is None:
            return ()
        if isinstance(self.eos_token_id, int):
            return (self.eos_token_id,)
        return tuple(self.eos_token_id)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_hf_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ModelConfig:
        """Build from a transformers config dict (v4 `rope_theta`/`rope_scaling` or v5 `rope_parameters`)."""
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type={model_type!r} is not a Llama-family decoder; "
                f"deltafleet supports {SUPPORTED_MODEL_TYPES}"
            )
        if cfg.get("use_sliding_window") or (model_type == "mistral" and cfg.get("sliding_window")):
            raise UnsupportedModelError(f"{source}: sliding-window attention is not supported")
        act = cfg.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedModelError(f"{source}: hidden_act={act!r}; only SwiGLU ('silu') is supported")
        try:
            heads = int(cfg["num_attention_heads"])
            hidden = int(cfg["hidden_size"])
            rope_src = dict(cfg.get("rope_parameters") or {})
            rope_src.update(cfg.get("rope_scaling") or {})
            theta = rope_src.get("rope_theta", cfg.get("rope_theta", 10000.0))
            rope_type = rope_src.get("rope_type", rope_src.get("type", "default"))
            rope = RopeConfig(
                theta=float(theta),
                rope_type=rope_type,
                factor=float(rope_src.get("factor", 1.0)),
                low_freq_factor=float(rope_src.get("low_freq_factor", 1.0)),
                high_freq_factor=float(rope_src.get("high_freq_factor", 4.0)),
                original_max_position_embeddings=int(
                    rope_src.get("original_max_position_embeddings", cfg.get("max_position_embeddings", 8192))
                ),
            )
            return cls(
                vocab_size=int(cfg["vocab_size"]),
                hidden_size=hidden,
                intermediate_size=int(cfg["intermediate_size"]),
                num_layers=int(cfg["num_hidden_layers"]),
                num_heads=heads,
                num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
                head_dim=int(cfg.get("head_dim") or hidden // heads),
                rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
                rope=rope,
                max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                # Llama's attention_bias covers q, k, v and o; Qwen2 always has q/k/v bias and no o bias.
                qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
                o_bias=model_type != "qwen2" and bool(cfg.get("attention_bias", False)),
                mlp_bias=bool(cfg.get("mlp_bias", False)),
                model_type=model_type,
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_id=cfg.get("eos_token_id"),
            )
        except KeyError as e:
            raise ArtifactError(source, f"missing required field {e.args[0]!r}") from None
        except (TypeError, ValueError, ArithmeticError) as e:  # int()/float() of JSON values (inf, 0 heads), rules
            raise ArtifactError(source, f"invalid value: {str(e)[:200]}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> ModelConfig:
        path = Path(path)
        if not path.exists():
            raise ArtifactError(path, "config.json not found; a checkpoint directory needs one")
        return cls.from_hf_dict(read_json_object(path), source=str(path))
