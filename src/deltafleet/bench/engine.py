"""`deltafleet bench engine`: decode throughput of mixed multi-adapter batches against the base model and peft.

Every scenario runs the same prompts and lengths through one engine on the embedded base: base only; one adapter;
8, 32 and 128 distinct LoRA adapters (r=16 on all seven projections) mixed uniformly; Zipf-mixed adapters; 32
distinct RoAd (`road_1`) adapters; 32 distinct PaFi tenants (density 0.02, one shared mask); 32 HiWi tenants (both
norms); and peft's own mixed- batch generation (`adapter_names=`) on the LoRA-32 workload. Decode throughput counts
only decode steps (prefill is timed apart, as time to first token). The machine's speed drifts by tens of percent
within seconds to minutes, so every engine scenario runs step by step in alternation with the base scenario on a
second engine over the same model weights, and each `X_vs_base` ratio is the median over the pairs of adjacent
decode steps.

The hardware limit printed next to each ratio: a decode step must at least compute the base step and read the
step's distinct adapter bytes once, so limit = t_base / (t_base + bytes / bandwidth), with the bandwidth measured
here by a streaming read. S-LoRA (Sheng et al. 2023, section 7) and Punica (Chen et al. 2023) report the same
quantities on GPUs; ../shared/reference/serving.md summarises them.
"""

from __future__ import annotations

import random
import resource
import statistics
import time
from dataclasses import dataclass, field

import torch

from deltafleet.adapters import LoraConfig, RoadConfig, random_adapter
from deltafleet.adapters.hiwi import HiwiConfig
from deltafleet.adapters.pafi import PafiConfig
from deltafleet.adapters.serving import ADDITIVE, ELEMENTWISE, NORM, SPARSE
from deltafleet.models import prepack
from deltafleet.models.config import PROJECTIONS
from deltafleet.models.loading import load_model, load_tokenizer
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from deltafleet.serve.engine.pools import pool_specs_for

LORA = LoraConfig(r=16, alpha=32.0, targets=PROJECTIONS)
ROAD = RoadConfig(variant="road_1", group_size=64, targets=PROJECTIONS)
PAFI = PafiConfig(density=0.02, targets=PROJECTIONS)
HIWI = HiwiConfig()


@dataclass
class BenchConfig:
    base: str = "smollm2-135m"
    dtype: str = "float32"
    adapter_dtype: str = "bfloat16"  # resident adapter pools (the bf16); compute stays in `dtype`
    batch: int = 32
    prompt_len: int = 64
    max_tokens: int = 32
    waves: int = 2  # the 128-adapter scenario runs batch * waves requests so batches rotate through adapters
    rounds: int = 2  # scenarios run round-robin this many times; each figure is the median over rounds
    quick: bool = False
    seed: int = 0
    scenarios: list[str] = field(default_factory=lambda: list(SCENARIOS))


@dataclass
class Result:
    name: str
    decode_tok_s: float
    ttft_ms: float
    step_ms: float
    distinct_per_step: float
    adapter_bytes_per_step: float
    rss_mb: float
    extra: dict = field(default_factory=dict)


def _zipf_choice(rng: random.Random, n: int, k: int, s: float = 1.0) -> list[int]:
    weights = [1.0 / (i + 1) ** s for i in range(n)]
    return rng.choices(range(n), weights=weights, k=k)


# scenario -> (adapter pool prefix, number of adapters registered, request count factor, chooser)
SCENARIOS: dict[str, tuple[str | None, int, str]] = {
    "base": (None, 0, "none"),
    "lora1": ("lora", 1, "uniform"),
    "lora8": ("lora", 8, "uniform"),
    "lora32": ("lora", 32, "uniform"),
    "lora128": ("lora", 128, "rotate"),
    "zipf128": ("lora", 128, "zipf"),
    "road32": ("road", 32, "uniform"),
    "pafi32": ("pafi", 32, "uniform"),
    "hiwi32": ("hiwi", 32, "uniform"),
    "peft32": ("lora", 32, "peft"),
}


def measure_bandwidth(nbytes: int = 512 << 20, repeats: int = 5) -> float:
    """Streaming read bandwidth in bytes/s (a sum over a buffer larger than the caches)."""
    x = torch.ones(nbytes // 4, dtype=torch.float32)
    x.sum()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t)
    return nbytes / best


def _prompts(cfg: BenchConfig, vocab: int, n: int) -> list[list[int]]:
    rng = random.Random(cfg.seed)
    return [[rng.randrange(100, vocab) for _ in range(cfg.prompt_len)] for _ in range(n)]


def _adapter_names(kind: str, count: int, chooser: str, n_requests: int, rng: random.Random) -> list[str | None]:
    if chooser == "none":
        return [None] * n_requests
    if chooser in ("uniform", "peft"):
        return [f"{kind}{i % count}" for i in range(n_requests)]
    if chooser == "rotate":  # every adapter used, each batch a different distinct subset
        order = list(range(count))
        rng.shuffle(order)
        return [f"{kind}{order[i % count]}" for i in range(n_requests)]
    return [f"{kind}{i}" for i in _zipf_choice(rng, count, n_requests)]


class _Driver:
    """One scenario's requests on one engine, advanced one engine step at a time."""

    def __init__(self, engine: Engine, cfg: BenchConfig, name: str, prompts: list[list[int]]):
        kind, count, chooser = SCENARIOS[name]
        self.engine, self.cfg, self.name, self.kind = engine, cfg, name, kind
        n_requests = cfg.batch * (cfg.waves if chooser == "rotate" else 1)
        self.names = _adapter_names(kind or "", count, chooser, n_requests, random.Random(cfg.seed + 1))
        params = SamplingParams(max_tokens=cfg.max_tokens, ignore_eos=True)
        reqs = [Request(prompts[i % len(prompts)], params, adapter=a) for i, a in enumerate(self.names)]
        # Warm-up outside the measurement: the first batch's adapters become resident, allocators settle.
        engine.generate([Request(prompts[0], SamplingParams(max_tokens=2, ignore_eos=True), adapter=a)
                         for a in list(dict.fromkeys(self.names))[: engine.max_batch]])
        self.handles = [engine.submit(r) for r in reqs]
        self.rates: list[float] = []
        self.steps: list[float] = []

    @property
    def done(self) -> bool:
        return all(h.done.is_set() for h in self.handles)

    def step(self) -> float | None:
        """One engine step; its decode tokens/s if it was a full-batch decode-only step, else None."""
        if self.done:
            return None
        c = self.engine.counters
        pre, tok = c["prefill_seconds"], c["decode_tokens"]
        t = time.perf_counter()
        worked = self.engine.step()
        dt = time.perf_counter() - t
        if not worked:
            time.sleep(0.001)
        elif c["prefill_seconds"] == pre and c["decode_tokens"] - tok == self.cfg.batch:
            self.rates.append(self.cfg.batch / dt)
            self.steps.append(dt)
            return self.cfg.batch / dt
        return None

    def result(self) -> Result:
        cfg, names = self.cfg, self.names
        outs = [h.result for h in self.handles]
        n_requests = len(names)
        distinct = [len({n for n in names[w * cfg.batch:(w + 1) * cfg.batch] if n is not None})
                    for w in range(max(1, n_requests // cfg.batch))]
        per_adapter = _adapter_bytes(self.engine, self.kind)
        return Result(
            name=self.name, decode_tok_s=statistics.median(self.rates),
            ttft_ms=1e3 * statistics.median(o.time_to_first_token for o in outs[: cfg.batch]),
            step_ms=1e3 * statistics.median(self.steps), distinct_per_step=sum(distinct) / len(distinct),
            adapter_bytes_per_step=per_adapter * sum(distinct) / len(distinct), rss_mb=_rss_mb(),
            extra={"decode_steps": len(self.steps)},
        )


def run_engine_scenario(engine: Engine, cfg: BenchConfig, name: str, prompts: list[list[int]]) -> Result:
    """Drive the engine step by step; decode throughput is the median over full-batch decode-only steps."""
    d = _Driver(engine, cfg, name, prompts)
    while not d.done:
        d.step()
    return d.result()


def run_interleaved(engine: Engine, base_engine: Engine, cfg: BenchConfig, name: str,
                    prompts: list[list[int]]) -> tuple[Result, Result, list[float]]:
    """The scenario on `engine` and the base scenario on `base_engine` (same model, same prompts and lengths),
    advanced step by step in alternation (which goes first alternates too): both see the same machine speed
    within a fraction of a second. Returns both results and, for every pair of adjacent full-batch decode
    steps, the scenario's throughput over the base's."""
    d, b = _Driver(engine, cfg, name, prompts), _Driver(base_engine, cfg, "base", prompts)
    pairs, i = [], 0
    while not (d.done and b.done):
        first, second = (d, b) if i % 2 == 0 else (b, d)
        r1, r2 = first.step(), second.step()
        if r1 is not None and r2 is not None:
            pairs.append(r1 / r2 if first is d else r2 / r1)
        i += 1
    return d.result(), b.result(), pairs


def _adapter_bytes(engine: Engine, kind: str | None) -> float:
    if kind is None:
        return 0.0
    sizes = [e.info.get("bytes", 0) for n, e in engine.adapters.entries.items() if n.startswith(kind)]
    return sum(sizes) / max(len(sizes), 1)


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def run_peft_scenario(cfg: BenchConfig, prompts: list[list[int]], model_path) -> Result:
    """peft's own mixed batch: one PeftModel holding 32 LoRA adapters of the same shape (random weights: the
    values do not change the work), `generate(adapter_names=...)`."""
    from peft import LoraConfig as PeftLora
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, cfg.dtype)
    hf = AutoModelForCausalLM.from_pretrained(str(model_path), dtype=dtype).eval()
    names = [f"lora{i}" for i in range(32)]
    pcfg = PeftLora(r=LORA.r, lora_alpha=LORA.alpha, target_modules=list(LORA.targets), init_lora_weights=False)
    pm = get_peft_model(hf, pcfg, adapter_name=names[0])
    for n in names[1:]:
        pm.add_adapter(n, pcfg)
    pm.eval()
    ids = torch.tensor([prompts[i % len(prompts)] for i in range(cfg.batch)])
    adapter_names = [names[i % len(names)] for i in range(cfg.batch)]

    def gen(n_new: int, names: list[str] | None) -> float:
        t = time.perf_counter()
        with torch.inference_mode():
            kwargs = {} if names is None else {"adapter_names": names}
            pm.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                        min_new_tokens=n_new, do_sample=False, pad_token_id=0, **kwargs)
        return time.perf_counter() - t

    def decode_step(names: list[str] | None) -> tuple[float, float]:
        gen(2, names)  # warm-up
        t1 = min(gen(1, names) for _ in range(2))  # best of two: a noisy machine must not make decode time < 0
        tn = min(gen(cfg.max_tokens, names) for _ in range(2))
        return t1, (tn - t1) / (cfg.max_tokens - 1)

    t1, step = decode_step(adapter_names)
    extra = {}
    if not cfg.quick:  # transformers' own base decode step, for scale (not a scenario; --quick skips it)
        with pm.disable_adapter():
            extra["transformers_base_step_ms"] = 1e3 * decode_step(None)[1]
    return Result(name="peft32", decode_tok_s=cfg.batch / step, ttft_ms=1e3 * t1, step_ms=1e3 * step,
                  distinct_per_step=len(set(adapter_names)), adapter_bytes_per_step=0.0, rss_mb=_rss_mb(),
                  extra=extra)


def _engine_config(cfg: BenchConfig, n_lora: int, n_road: int, n_pafi: int = 0, n_hiwi: int = 0) -> EngineConfig:

    shapes = ([(ADDITIVE, LORA.r)] * max(n_lora, 1) + [(ELEMENTWISE, ROAD.group_size)] * max(n_road, 1)
              + [(SPARSE, PAFI.ppm)] * max(n_pafi, 1) + [(NORM, 1)] * max(n_hiwi, 1))
    return EngineConfig(dtype=cfg.dtype, adapter_dtype=cfg.adapter_dtype, max_batch=cfg.batch,
                        max_model_len=cfg.prompt_len + cfg.max_tokens + 8,
                        prefill_tokens=cfg.batch * cfg.prompt_len, pools=pool_specs_for(shapes),
                        host_cache_bytes=64 << 30)


def build_engine(cfg: BenchConfig, n_lora: int, n_road: int, n_pafi: int = 0,
                 n_hiwi: int = 0) -> tuple[Engine, object]:

    model, path = load_model(cfg.base, dtype=getattr(torch, cfg.dtype))
    engine = Engine(model, load_tokenizer(path), _engine_config(cfg, n_lora, n_road, n_pafi, n_hiwi))
    for i in range(n_lora):
        engine.add_adapter(f"lora{i}", random_adapter(model.config, LORA, seed=1000 + i))
    for i in range(n_road):
        engine.add_adapter(f"road{i}", random_adapter(model.config, ROAD, seed=5000 + i))
    for i in range(n_pafi):
        engine.add_adapter(f"pafi{i}", random_adapter(model.config, PAFI, seed=7000 + i))
    for i in range(n_hiwi):
        engine.add_adapter(f"hiwi{i}", random_adapter(model.config, HIWI, seed=9000 + i))
    return engine, path


def run(cfg: BenchConfig, progress=None) -> dict:
    """All scenarios in one process; returns the report (figures, ratios, limits)."""
    wanted = [s for s in SCENARIOS if s in cfg.scenarios]
    n_lora = max([SCENARIOS[s][1] for s in wanted if SCENARIOS[s][0] == "lora" and s != "peft32"] or [0])
    n_road = max([SCENARIOS[s][1] for s in wanted if SCENARIOS[s][0] == "road"] or [0])
    n_pafi = max([SCENARIOS[s][1] for s in wanted if SCENARIOS[s][0] == "pafi"] or [0])
    n_hiwi = max([SCENARIOS[s][1] for s in wanted if SCENARIOS[s][0] == "hiwi"] or [0])
    engine, path = build_engine(cfg, n_lora, n_road, n_pafi, n_hiwi)
    # The base runs beside every scenario on a second engine over the same model (no adapters, own KV cache).
    base_engine = Engine(engine.model, engine.tokenizer, _engine_config(cfg, 0, 0))
    prompts = _prompts(cfg, engine.model.config.vocab_size, cfg.batch)
    bandwidth = measure_bandwidth()
    runs: dict[str, list[Result]] = {n: [] for n in wanted}
    paired: dict[str, list[float]] = {}  # scenario -> per decode-step throughput over the base's adjacent step
    for r in range(cfg.rounds):
        for name in wanted:
            if progress:
                progress(f"round {r + 1}/{cfg.rounds}: {name}")
            if name == "peft32":
                runs[name].append(run_peft_scenario(cfg, prompts, path))
            elif name != "base" and "base" in wanted:  # the machine's speed drifts: interleave with the base
                res, base_res, pairs = run_interleaved(engine, base_engine, cfg, name, prompts)
                runs[name].append(res)
                runs["base"].append(base_res)
                paired.setdefault(name, []).extend(pairs)
            else:
                runs[name].append(run_engine_scenario(engine, cfg, name, prompts))
    results = {n: sorted(rs, key=lambda x: x.decode_tok_s)[len(rs) // 2] for n, rs in runs.items()}
    return report(cfg, results, bandwidth, engine, paired)


def quick_config(**overrides) -> BenchConfig:
    """The `--quick` preset: under two minutes on a 2-core CPU."""
    return BenchConfig(**{"prompt_len": 16, "max_tokens": 8, "waves": 1, "rounds": 1, "quick": True, **overrides})


RATIOS = {  # key -> (numerator, denominator)
    "lora1_vs_base": ("lora1", "base"),
    "lora8_vs_base": ("lora8", "base"),
    "lora32_vs_base": ("lora32", "base"),
    "road32_vs_base": ("road32", "base"),
    "pafi32_vs_base": ("pafi32", "base"),
    "hiwi32_vs_base": ("hiwi32", "base"),
    "zipf128_vs_base": ("zipf128", "base"),
    "lora32_vs_peft": ("lora32", "peft32"),
    "lora128_vs_lora32": ("lora128", "lora32"),
}


def report(cfg: BenchConfig, results: dict[str, Result], bandwidth: float, engine: Engine,
           paired: dict[str, list[float]] | None = None) -> dict:
    """Ratios over the base are medians of paired decode steps (the scenario's step over the base engine's
    adjacent step); a ratio of two paired scenarios is the ratio of their paired medians; others (peft) divide
    median throughputs."""
    ratios, limits, fractions = {}, {}, {}
    paired = paired or {}
    base = results.get("base")
    for key, (num, den) in RATIOS.items():
        if num not in results or den not in results:
            continue
        if den == "base" and paired.get(num):
            ratios[key] = statistics.median(paired[num])
        elif paired.get(num) and paired.get(den):  # both normalised by their adjacent base runs
            ratios[key] = statistics.median(paired[num]) / statistics.median(paired[den])
        else:
            ratios[key] = results[num].decode_tok_s / results[den].decode_tok_s
        if base is None or den == "peft32":
            continue
        t_base = base.step_ms / 1e3

        def bound(r: Result, t_base=t_base) -> float:
            return t_base + r.adapter_bytes_per_step / bandwidth

        limits[key] = bound(results[den]) / bound(results[num])  # best ratio this hardware allows
        fractions[key] = ratios[key] / limits[key]
    return {
        "config": {k: v for k, v in vars(cfg).items() if k != "scenarios"},
        "hardware": {"threads": torch.get_num_threads(), "read_bandwidth_gb_s": bandwidth / 1e9,
                     "device": "cpu", "grouped_mm": getattr(engine.backend, "grouped", False)},
        "scenarios": {n: vars(r) for n, r in results.items()},
        "ratios": ratios,
        "paired_ratios_vs_base": paired,
        "limits": limits,
        "achieved_fraction_of_limit": fractions,
        "targets": {"lora32_vs_base": 0.80, "road32_vs_base": 0.95, "pafi32_vs_base": 0.85, "hiwi32_vs_base": 0.85,
                    "lora32_vs_peft": 5.0,
                    "lora128_vs_lora32": 0.90},
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kv_cache_mb": (engine.cache.k.numel() + engine.cache.v.numel()) * engine.cache.k.element_size() / 2**20,
        "adapter_pools_mb": sum(p.nbytes for p in engine.adapters.pools) / 2**20,
        "prepacked_weights_mb": prepack.packed_bytes(engine.model) / 2**20,
    }
