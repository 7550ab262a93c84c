"""The typed configuration of one training run, validated on construction.

Defaults follow the method papers: LoRA (Hu et al. 2021) lr 3e-4, rank 8, alpha 16 on all seven projections;
RoAd (Liao et al. 2024, "2D Rotary Adaptation", arXiv 2409.00119, sec. 4) about 10x LoRA's lr, 3e-3, group
size 64; IA3 (Liu et al. 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", sec. 3.3) lr 3e-3 on keys, values and the feed-forward input; full fine-tuning 2e-5.
`lora_init` starts LoRA from a peft LoRA directory (LoftQ or ApiQ initialisation, `deltafleet quantize`) instead
of B = 0; its rank, alpha and targets must equal the run's.
PaFi (Liao et al. 2023, arXiv 2305.16742): `pafi_density`, the fraction of each target projection's entries
trained (the smallest-magnitude ones of the base); default 0.02, about LoRA rank 8's trainable parameters on
SmolLM2's seven projections. MEFT (Liao et al. 2023, arXiv 2306.00477): `meft_variant` (meft1/2/3),
`meft_rev_layers` (the lowest k layers reversible, default 4: the inverse divides by lambda, beta = 0.1, so
rounding grows ~10x per reversible layer and 8 layers already lose the activations, see `train.meft`; None: all),
`meft_bottleneck` (adapter width, 8 as the paper's scripts). HiWi (the same paper as PaFi): `hiwi_bottleneck`, the
width of the adapter that maps each RMSNorm gain to its change; its targets are norms (`models.config.NORMS`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from deltafleet.adapters.road.config import ROAD_VARIANTS
from deltafleet.dtypes import native_bf16
from deltafleet.models.config import NORMS, PROJECTIONS
from deltafleet.tasks import TASKS
from deltafleet.train.methods import METHODS

PRECISIONS = ("auto", "bf16", "fp32")
MEFT_VARIANTS = ("meft1", "meft2", "meft3")
# Fields that change nothing in the trained weights; a resumed run may differ in them.
NON_RESULT_FIELDS = ("out", "resume", "save_every", "eval_examples")


@dataclass(frozen=True)
class TrainConfig:
    """One run. `lr` and `targets` left as None take the method's default (see `train.methods.METHODS`).

    Effective batch per optimizer step = batch_size * grad_accum examples; the loss is the mean over the
    answer tokens of the whole step. The learning rate warms up linearly over warmup_ratio * steps, then
    decays linearly to 0 at `steps`.

    precision: `bf16` runs forward passes under CPU bf16 autocast (weights, gradients and optimizer state stay
    fp32); `fp32` runs them in fp32; `auto` (default) resolves on construction to bf16 where the CPU has native
    bf16 matmuls (AVX512-BF16 / AMX, per oneDNN) and to fp32 elsewhere: on an AVX2-only CPU, bf16 training of
    SmolLM2 measured 6 tokens/s against 107 in fp32.
    """

    base: str
    task: str
    method: str
    out: Path
    steps: int = 100
    batch_size: int = 8
    grad_accum: int = 1
    lr: float | None = None
    warmup_ratio: float = 0.1
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 8
    lora_alpha: float = 16.0
    targets: tuple[str, ...] | None = None
    lora_init: Path | None = None
    road_variant: str = "road_1"
    road_group_size: int = 64
    pafi_density: float = 0.02
    meft_variant: str = "meft1"
    meft_rev_layers: int | None = 4
    meft_bottleneck: int = 8
    hiwi_bottleneck: int = 64
    max_seq_len: int = 512
    precision: str = "auto"
    seed: int = 0
    save_every: int = 50
    eval_examples: int = 32
    resume: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "out", Path(self.out))
        if self.lora_init is not None:
            object.__setattr__(self, "lora_init", Path(self.lora_init))
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r}: must be one of {sorted(METHODS)}")
        if self.task not in TASKS:
            raise ValueError(f"task={self.task!r}: must be one of {sorted(TASKS)}")
        method = METHODS[self.method]
        if self.lr is None:
            object.__setattr__(self, "lr", method.default_lr)
        if self.targets is None:
            object.__setattr__(self, "targets", method.default_targets)
        object.__setattr__(self, "targets", tuple(self.targets))
        for name in ("steps", "batch_size", "grad_accum", "lora_rank", "road_group_size", "max_seq_len",
                     "hiwi_bottleneck"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{name}={v!r}: must be a positive integer")
        for name in ("save_every", "eval_examples", "seed"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"{name}={v!r}: must be a non-negative integer")
        if not self.lr > 0:
            raise ValueError(f"lr={self.lr!r}: must be > 0")
        if not 0 <= self.warmup_ratio < 1:
            raise ValueError(f"warmup_ratio={self.warmup_ratio!r}: must be in [0, 1)")
        if self.weight_decay < 0 or self.max_grad_norm < 0:
            bad = "weight_decay" if self.weight_decay < 0 else "max_grad_norm"
            raise ValueError(f"{bad}={getattr(self, bad)!r}: must be >= 0")
        if self.lora_alpha <= 0:
            raise ValueError(f"lora_alpha={self.lora_alpha!r}: must be > 0")
        if self.road_group_size % 2:
            raise ValueError(f"road_group_size={self.road_group_size}: must be even")
        if self.road_variant not in ROAD_VARIANTS:
            raise ValueError(f"road_variant={self.road_variant!r}: must be one of {ROAD_VARIANTS}")
        if not 0 < self.pafi_density <= 1:
            raise ValueError(f"pafi_density={self.pafi_density!r}: must be in (0, 1]")
        if self.meft_variant not in MEFT_VARIANTS:
            raise ValueError(f"meft_variant={self.meft_variant!r}: must be one of {MEFT_VARIANTS}")
        if self.meft_rev_layers is not None and (isinstance(self.meft_rev_layers, bool)
                                                 or not isinstance(self.meft_rev_layers, int)
                                                 or self.meft_rev_layers < 0):
            raise ValueError(f"meft_rev_layers={self.meft_rev_layers!r}: must be a non-negative integer or None (all)")
        if isinstance(self.meft_bottleneck, bool) or not isinstance(self.meft_bottleneck, int) \
                or self.meft_bottleneck < 1:
            raise ValueError(f"meft_bottleneck={self.meft_bottleneck!r}: must be a positive integer")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision={self.precision!r}: must be one of {PRECISIONS}")
        if self.precision == "auto":
            object.__setattr__(self, "precision", "bf16" if native_bf16() else "fp32")
        if "targets" in method.options:
            allowed = NORMS if self.method == "hiwi" else PROJECTIONS
            unknown = [t for t in self.targets if t not in allowed]
            if not self.targets or unknown:
                raise ValueError(f"targets={self.targets!r}: must name one or more of {allowed}")
        elif self.targets:
            raise ValueError(f"targets={self.targets!r}: method {self.method!r} trains every weight; "
                             f"it takes no targets")
        if self.lora_init is not None and "lora_init" not in method.options:
            raise ValueError(f"lora_init={str(self.lora_init)!r}: only method 'lora' starts from an initialisation")

    @property
    def warmup_steps(self) -> int:
        return int(self.warmup_ratio * self.steps)

    def hyperparameters(self) -> dict[str, Any]:
        """The fields that shape the trained weights (JSON-ready), without other methods' options."""
        d = asdict(self)
        foreign = {o for m in METHODS.values() for o in m.options} - set(METHODS[self.method].options)
        for k in (*NON_RESULT_FIELDS, *foreign, "base", "task", "method"):
            d.pop(k)
        if "targets" in d:
            d["targets"] = list(self.targets)
        if d.get("lora_init") is not None:
            d["lora_init"] = str(self.lora_init)
        return d
