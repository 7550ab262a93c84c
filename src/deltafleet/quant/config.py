"""Typed configuration of one base-model quantization run, validated on construction.

Defaults: group size 64 and asymmetric group-wise quantization as in ApiQ's released scripts (Liao et al. 2024,
arXiv 2402.05147, `scripts/quantize.sh`); ApiQ's LWC factors start at 4.0 (sigmoid 0.982), LWC lr 5e-3, LoRA lr
5e-4, weight decay 0.1 (ApiQ `apiq/calibrate.py`); LoftQ runs T = 5 alternations (Li et al. 2024, arXiv
2310.08659, README). Calibration is scaled down from ApiQ's 128 x 2048 tokens x 20 epochs so that the 135M model
calibrates in minutes on a 2-core CPU: 32 sequences x 128 tokens, 2 epochs, micro-batch 1 (64 steps per block).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from deltafleet.models.config import PROJECTIONS
from deltafleet.quant.registry import QUANTIZERS

QUANT_BITS = (2, 3, 4, 8)
EMBEDDINGS = ("dense", "rtn")  # the embedding table (and an untied LM head): kept dense, or RTN at `bits`


@dataclass(frozen=True)
class QuantConfig:
    """One quantization run. `rank`, `alpha` and `targets` describe the LoRA initialisation written by the methods
    that make one (apiq, loftq); fine-tuning from it must use the same values. `embedding` 'rtn' also quantizes
    the embedding table (and an untied LM head) with RTN at `bits` and `group_size`, after the method has run
    on the full-precision table."""

    method: str
    bits: int | None = None  # None: the method's default (4; OneBit 1)
    group_size: int = 64
    embedding: str = "dense"
    calib_samples: int = 32
    calib_seq_len: int = 128
    seed: int = 0
    rank: int = 16
    alpha: float = 16.0
    targets: tuple[str, ...] = PROJECTIONS
    gptq_damp: float = 0.01
    gptq_act_order: bool = False
    loftq_iters: int = 5
    apiq_epochs: int = 2
    apiq_batch_size: int = 1
    apiq_lr_lwc: float = 5e-3
    apiq_lr_lora: float = 5e-4
    apiq_weight_decay: float = 0.1
    apiq_clip_init: float = 4.0
    onebit_svid: str = "svd"
    onebit_layernorm: bool = False
    kd_steps: int = 1000
    kd_windows: int = 2048
    kd_seq_len: int = 128
    kd_batch_size: int = 2
    kd_lr: float = 4e-4
    kd_warmup: float = 0.1
    kd_loss_scale: float = 0.01
    kd_beta: float = 1.0
    kd_save_every: int = 50
    kd_precision: str = "bf16"
    kd_init: str | None = None  # a OneBit base directory to start from instead of SVID (continued distillation)

    def __post_init__(self) -> None:

        if self.method not in QUANTIZERS:
            raise ValueError(f"method={self.method!r}: must be one of {sorted(QUANTIZERS)}")
        if self.embedding not in EMBEDDINGS:
            raise ValueError(f"embedding={self.embedding!r}: must be one of {EMBEDDINGS}")
        allowed = QUANTIZERS[self.method].bits
        if self.bits is None:
            object.__setattr__(self, "bits", allowed[0])
        if self.bits not in allowed:
            raise ValueError(f"bits={self.bits!r}: {self.method} quantizes to {' or '.join(map(str, allowed))} bits")
        if self.method == "onebit" and self.embedding != "dense":
            raise ValueError(f"embedding={self.embedding!r}: onebit keeps the tables dense")
        if self.kd_precision not in ("bf16", "fp32"):
            raise ValueError(f"kd_precision={self.kd_precision!r}: must be 'bf16' (autocast) or 'fp32'")
        if self.onebit_svid not in ("svd", "nmf"):
            raise ValueError(f"onebit_svid={self.onebit_svid!r}: must be 'svd' or 'nmf'")
        for name in ("group_size", "calib_samples", "calib_seq_len", "rank", "loftq_iters", "apiq_epochs",
                     "apiq_batch_size", "kd_windows", "kd_seq_len", "kd_batch_size"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r}: must be a positive integer")
        if not isinstance(self.kd_steps, int) or isinstance(self.kd_steps, bool) or self.kd_steps < 0:
            raise ValueError(f"kd_steps={self.kd_steps!r}: must be an integer >= 0 (0: SVID only)")
        if not isinstance(self.kd_save_every, int) or self.kd_save_every < 0:
            raise ValueError(f"kd_save_every={self.kd_save_every!r}: must be an integer >= 0 (0: never)")
        if not 0 <= self.kd_warmup < 1:
            raise ValueError(f"kd_warmup={self.kd_warmup!r}: the warm-up fraction of the steps must be in [0, 1)")
        for name in ("alpha", "apiq_lr_lwc", "apiq_lr_lora", "kd_lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be > 0")
        for name in ("gptq_damp", "apiq_weight_decay", "kd_loss_scale", "kd_beta"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 0")
        object.__setattr__(self, "targets", tuple(self.targets))
        unknown = [t for t in self.targets if t not in PROJECTIONS]
        if not self.targets or unknown:
            raise ValueError(f"targets={self.targets!r}: must name one or more of {PROJECTIONS}")

    @property
    def calibration_shape(self) -> tuple[int, int]:
        """(windows, tokens per window) of the text the method reads: OneBit's distillation text (none without
        distillation steps), else the calibration windows."""
        if self.method == "onebit":
            return (self.kd_windows if self.kd_steps else 0), self.kd_seq_len
        return self.calib_samples, self.calib_seq_len

    @property
    def scaling(self) -> float:
        """peft's LoRA scale alpha / r."""
        return self.alpha / self.rank

    def settings(self) -> dict[str, Any]:
        """JSON-ready fields for the manifest: the method's own options only."""
        d = asdict(self)
        d["targets"] = list(self.targets)
        if self.embedding == "dense":
            d.pop("embedding")  # absent: the tables stay dense (as in bases written before the option)
        own = {"gptq": ("gptq_",), "loftq": ("loftq_",), "apiq": ("apiq_",),
               "onebit": ("onebit_", "kd_")}.get(self.method, ())
        for k in list(d):
            if any(k.startswith(p) for p in ("gptq_", "loftq_", "apiq_", "onebit_", "kd_")) and not k.startswith(own):
                d.pop(k)
        if self.method == "onebit":
            d.pop("group_size")
        if self.method not in ("apiq", "loftq"):
            for k in ("rank", "alpha", "targets"):
                d.pop(k)
        if self.method not in ("gptq", "apiq", "onebit"):
            for k in ("calib_samples", "calib_seq_len", "seed"):
                d.pop(k)
        return d
