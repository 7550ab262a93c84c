"""A mixed decode step against the base's, paired step by step on the same 32 resident sequences (README: Tenant
density, session 11): 11 LoRA r16, 11 RoAd and 10 compressed whole fine-tunes (`ft`, 1/64), decoding; each step of
one variant is followed by the other's (same inputs, same cache rows), and the hook's time is split per call kind
(projection hooks with their fused native calls, the fused norms, the model-level calls). Needs the tenants
`deltafleet bench density` writes.
    python results/serve/mixed_step_paired.py > results/serve/mixed_step_paired.txt"""
import collections
import statistics
import time

import torch
from resident_engine import resident_engine

from deltafleet import native
from deltafleet.dtypes import cpu_flags
from deltafleet.models.config import MODEL_LAYER
from deltafleet.serve.engine import Request, SamplingParams
from deltafleet.serve.engine.layout import BatchLayout

model, e, mixed = resident_engine()
for i, a in enumerate(mixed):
    e.submit(Request([5 + i] * 8, SamplingParams(max_tokens=70, ignore_eos=True), adapter=a))
while len(e.running) < 32 or any(s.in_prefill for s in e.running):  # every tenant loaded and prefilled
    e.step()
    time.sleep(0.001)
seqs = list(e.running)
ids = torch.tensor([[s.out[-1]] for s in seqs])
pos = torch.tensor([[s.decode_position] for s in seqs])
slots, li, rows = slice(0, 32), torch.arange(32), e._rows(seqs)
acc: collections.Counter = collections.Counter()


def timed_hook():
    h = BatchLayout.build(rows, 1).hook(e.backend, li)

    def kind(layer, proj):
        return "model-level calls" if layer == MODEL_LAYER else "norm calls (unfused)" if "norm" in proj else \
            "projection hooks"

    def w(layer, proj, x, y):
        t0 = time.perf_counter_ns()
        out = h(layer, proj, x, y)
        acc[kind(layer, proj)] += time.perf_counter_ns() - t0
        return out

    def norm(layer, name, module, x):
        t0 = time.perf_counter_ns()
        out = h.norm(layer, name, module, x)
        acc["fused norms"] += time.perf_counter_ns() - t0
        return out

    w.norms, w.model_level = h.norms, h.model_level
    if hasattr(h, "norm"):
        w.norm = norm
    return w


chain_call = native.Chain.__call__


def timed_chain(self, x, y):
    t0 = time.perf_counter_ns()
    out = chain_call(self, x, y)
    acc["  of which native.Chain calls"] += time.perf_counter_ns() - t0
    return out


native.Chain.__call__ = timed_chain
steps = {"base": [], "mixed": []}
with torch.inference_mode():
    for _ in range(40):
        for v in steps:
            hook = None if v == "base" else timed_hook()
            t0 = time.perf_counter()
            model(ids, positions=pos, cache=e.cache, cache_slots=slots, hook=hook, logits_index=li)
            steps[v].append((time.perf_counter() - t0) * 1e3)
print(f"CPU: {'avx512_bf16' if 'avx512_bf16' in cpu_flags() else 'no avx512_bf16'}; 32 resident rows (11 LoRA, "
      "11 RoAd, 10 ft); 40 paired decode steps, ms")
for v, xs in steps.items():
    print(f"{v:6s} median {statistics.median(xs):6.1f}")
diff = [m - b for m, b in zip(steps["mixed"], steps["base"], strict=True)]
print(f"mixed - base, median of the pairs: {statistics.median(diff):.1f}; ratio of medians "
      f"{statistics.median(steps['base']) / statistics.median(steps['mixed']):.3f}")
print("hook time per mixed step (ms):")
for k, v in sorted(acc.items()):
    print(f"  {k:32s} {v / 40 / 1e6:6.2f}")
