"""Where a mixed decode step's time goes (README: Tenant density). Batch 32, every tenant resident: 11 LoRA r16,
11 RoAd and 10 compressed whole fine-tunes (`ft`, 1/64), against the base alone, 3 interleaved rounds: the
decode forward per step; the time inside each family's native kernel call (LoRA BGMV, RoAd, the quantized
BGMV), timed around the call from Python; and the same mixed step with every bound kernel call (`BoundBgmv`,
`BoundRoad`, `BoundQBgmv`: its checks and the C call) replaced by a method that returns at once, which leaves the
adapters' dispatch above the kernels and the gain-norm path. (Before session 10 the no-op swapped each C function
in and out around every call, and that per-call swap inflated the no-op step by several ms.) Since session 11 the
projections' kernels run through `native.Chain` (one call per projection), which these timers and the no-op do not
see: only the LM-head and embedding calls still go through the bound kernels. `mixed_step_paired.py` splits the
time of the fused path. Needs the tenants `deltafleet bench density` writes.
    python results/serve/mixed_step_breakdown.py > results/serve/mixed_step_breakdown.txt"""
import collections
import statistics
import time

from resident_engine import resident_engine

from deltafleet import native
from deltafleet.dtypes import cpu_flags
from deltafleet.serve.engine import Request, SamplingParams
from deltafleet.serve.engine import engine as engine_module

acc: collections.Counter = collections.Counter()
NOOP = False
KERNELS = {"BoundBgmv": "lora", "BoundRoad": "road", "BoundQBgmv": "ft"}


def timed_kernel(call, family):
    def wrapper(self, *args):
        if NOOP:  # the bound call returns at once (the dispatch above it runs)
            return True
        t0 = time.perf_counter()
        out = call(self, *args)
        acc[family] += time.perf_counter() - t0
        return out
    return wrapper


for cls, family in KERNELS.items():
    C = getattr(native, cls)
    C.__call__ = timed_kernel(C.__call__, family)
forward = engine_module.Engine._decode_forward


def timed_forward(self, *args, **kwargs):
    t0 = time.perf_counter()
    out = forward(self, *args, **kwargs)
    acc["forward"] += time.perf_counter() - t0
    acc["steps"] += 1
    return out


engine_module.Engine._decode_forward = timed_forward
model, e, mixed = resident_engine()


def run(adapters, noop=False):
    global NOOP
    NOOP = noop
    reqs = [Request([5 + i] * 8, SamplingParams(max_tokens=48, ignore_eos=True), adapter=a)
            for i, a in enumerate(adapters)]
    acc.clear()
    e.generate(reqs)
    return {k: v * 1e3 / acc["steps"] for k, v in acc.items() if k != "steps"}


run(mixed)
cases = {"base": ([None] * 32, False), "mixed": (mixed, False), "mixed, kernels no-op": (mixed, True)}
res = {k: [] for k in cases}
for _ in range(3):
    for k, (a, noop) in cases.items():
        res[k].append(run(a, noop))
print(f"CPU: {'avx512_bf16' if 'avx512_bf16' in cpu_flags() else 'no avx512_bf16'}; kernel path "
      f"{native.qlora_path()}; ms per decode step (medians of 3 interleaved rounds; the rounds in brackets)")
for k, rows in res.items():
    for key in ("forward", *KERNELS.values()):
        vals = [r.get(key, 0.0) for r in rows]
        if any(vals):
            print(f"{k:22s} {key:8s} {statistics.median(vals):7.1f}   [{', '.join(f'{v:.1f}' for v in vals)}]")
