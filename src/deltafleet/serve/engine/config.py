"""Typed engine configuration, validated on construction."""

from __future__ import annotations

from dataclasses import dataclass, fields

from deltafleet.adapters.pafi.functional import PPM
from deltafleet.adapters.qadditive import QADDITIVE
from deltafleet.adapters.serving import ADDITIVE, ELEMENTWISE, NORM, SPARSE
from deltafleet.dtypes import DTYPES
from deltafleet.serve.engine.pools import PoolSpec

# The fields that build the default pools (`standard_pools`); `EngineConfig.pools` replaces them.
POOL_FIELDS = ("lora_slots", "max_lora_rank", "delta_slots", "max_delta_rank", "road_slots", "road_group_size",
               "pafi_slots", "pafi_density", "hiwi_slots", "qdelta_slots")


def standard_pools(lora_slots: int, max_lora_rank: int, delta_slots: int, max_delta_rank: int, road_slots: int,
                   road_group_size: int, pafi_slots: int = 0, pafi_density: float = 0.02,
                   hiwi_slots: int = 0, qdelta_slots: int = 0) -> tuple[PoolSpec, ...]:
    """The default pools: 'lora' (additive, small rank: LoRA, small low-rank deltas), 'qdelta' (qadditive, up to
    `max_delta_rank` rows: compressed full fine-tunes kept quantized as stored), 'delta' (additive, large rank:
    compressed deltas in expanded form), 'road' (element-wise, one group size), 'pafi' (sparse, PaFi tenants of
    one mask density) and 'hiwi' (norm gains, HiWi tenants); a pool of 0 slots is left out."""
    specs = (("lora", ADDITIVE, lora_slots, max_lora_rank), ("qdelta", QADDITIVE, qdelta_slots, max_delta_rank),
             ("delta", ADDITIVE, delta_slots, max_delta_rank),
             ("road", ELEMENTWISE, road_slots, road_group_size),
             ("pafi", SPARSE, pafi_slots, max(1, round(pafi_density * PPM))), ("hiwi", NORM, hiwi_slots, 1))
    return tuple(PoolSpec(*spec) for spec in specs if spec[2])


@dataclass(frozen=True)
class EngineConfig:
    """
    max_batch: running sequences at most (one KV-cache slot each).
    max_model_len: prompt + generated tokens per sequence (the KV slot length).
    kv_cache_bytes: if set, caps max_batch so the KV cache fits this budget.
    prefill_tokens: prompt tokens processed per step at most (longer prompts are chunked).
    mixed_steps: a step with both decode tokens and prompt chunks runs them in one forward (the tokens laid end to
        end, attention per sequence; padded to a multiple of `prefill_bucket` tokens). Each forward reads every base
        weight once, so a prompt admitted while others decode costs its tokens' compute, not a second pass over the
        weights. False: a prefill forward, then a decode forward.
    prefill_bucket: a prefill step's rows are padded to a multiple of this many tokens (padding is masked: it is
        neither attended to nor written to the KV cache). Every distinct token count that reaches a oneDNN matmul
        creates a primitive that stays cached, so without buckets memory grows with every new prompt length
        (`deltafleet bench memory`); 1 turns padding off.
    pools: the adapter slot pools (`PoolSpec`s), in the order an adapter is placed (the first that accepts it
        and has a free slot); `pools.pool_specs_for` sizes them for a known set of adapters. None: the standard
        five (`standard_pools`), built from the nine fields below; given, it replaces them.
    lora_slots / max_lora_rank: resident additive adapters up to that rank (LoRA, small low-rank deltas).
    delta_slots / max_delta_rank: resident additive adapters of larger rank (compressed deltas in expanded form).
    qdelta_slots: resident compressed full fine-tunes kept quantized as stored (Delta-CoMe's `qlowrank` with U
        grouped along out, the `compress` default), up to `max_delta_rank` rows per projection; a decode step
        reads their stored bytes (about 8x fewer than an expanded bf16 copy at 2 bits). 0: they are served
        expanded, in 'delta'.
    road_slots / road_group_size: resident element-wise (RoAd) adapters with that group size.
    pafi_slots / pafi_density: resident sparse (PaFi) adapters whose shared mask has that density.
    hiwi_slots: resident RMSNorm-gain (HiWi) adapters.
    host_cache_bytes: loaded adapters kept in host memory (LRU).
    preload_adapters: read the adapters of `adapters_dir` into host memory in the background from start-up, in
        name order, until `host_cache_bytes` is full (S-LoRA's main-memory tier: a request for one then waits only
        for its copy into a slot); requests' own loads go first. False: each is read when first requested.
    loader_threads: threads reading adapters from disk (and expanding compact ones for their slots).
    adapter_load_timeout: seconds a request waits for its adapter to load (from submission); then it fails with
        finish reason error. A request waiting only for a free slot of a loaded adapter does not time out.
    max_queue: waiting requests at most; more are refused (QueueFullError).
    adapter_dtype: dtype of the resident adapter pools and host cache (None: the model's dtype). bfloat16 under a
        float32 model halves the adapter bytes a decode step reads; the CPU kernels widen them to fp32 as read.
    prepack: on a float32 or bfloat16 CPU model, compute the base projections and LM head with oneDNN over weights
        reordered once at start-up (`deltafleet.models.prepack`; few-row steps on the native streaming kernel), and
        the RMSNorms in one native call each: faster decode for one more copy of those weights.
    """

    dtype: str = "bfloat16"
    backend: str = "cpu"
    max_batch: int = 32
    max_model_len: int = 2048
    kv_cache_bytes: int | None = None
    prefill_tokens: int = 1024
    pools: tuple[PoolSpec, ...] | None = None
    lora_slots: int = 32
    max_lora_rank: int = 16
    delta_slots: int = 4
    max_delta_rank: int = 256
    road_slots: int = 64
    road_group_size: int = 64
    pafi_slots: int = 32
    pafi_density: float = 0.02
    hiwi_slots: int = 64
    qdelta_slots: int = 32
    host_cache_bytes: int = 4 << 30
    preload_adapters: bool = False
    loader_threads: int = 1
    adapter_load_timeout: float = 60.0
    max_queue: int = 1024
    adapter_dtype: str | None = None
    prepack: bool = True
    prefill_bucket: int = 16
    mixed_steps: bool = True

    def __post_init__(self) -> None:
        for name in ("max_batch", "max_model_len", "prefill_tokens", "max_queue", "host_cache_bytes", "prefill_bucket",
                     "loader_threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 1")
        if not self.adapter_load_timeout > 0:  # also refuses NaN
            raise ValueError(f"adapter_load_timeout={self.adapter_load_timeout}: must be > 0 (seconds)")
        if not 0 < self.pafi_density <= 1:
            raise ValueError(f"pafi_density={self.pafi_density}: must be in (0, 1]")
        for name in ("lora_slots", "max_lora_rank", "delta_slots", "max_delta_rank", "road_slots", "pafi_slots",
                     "hiwi_slots", "qdelta_slots"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)}: must be >= 0")
        if self.road_group_size < 2 or self.road_group_size % 2:
            raise ValueError(f"road_group_size={self.road_group_size}: must be a positive even integer")
        if self.pools is None:
            object.__setattr__(self, "pools", standard_pools(*(getattr(self, n) for n in POOL_FIELDS)))
        else:
            self._check_pools()
        for name in ("dtype", "adapter_dtype"):
            value = getattr(self, name)
            if value not in DTYPES and not (name == "adapter_dtype" and value is None):
                raise ValueError(f"{name}={value!r}: must be one of {sorted(DTYPES)}")

    def _check_pools(self) -> None:
        defaults = {f.name: f.default for f in fields(self)}
        for name in POOL_FIELDS:
            if getattr(self, name) != defaults[name]:
                raise ValueError(f"{name}={getattr(self, name)}: pools= replaces the lora/delta/qdelta/road/pafi/hiwi "
                                 f"fields; give one or the other")
        object.__setattr__(self, "pools", tuple(self.pools))
        names = set()
        for spec in self.pools:
            if not isinstance(spec, PoolSpec):
                raise ValueError(f"pools: {spec!r} must be a PoolSpec")
            if spec.name in names:
                raise ValueError(f"pools: name {spec.name!r} used twice; pool names must be unique")
            names.add(spec.name)
