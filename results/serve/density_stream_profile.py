"""Where the density stream's time goes (README: Tenant density, session 11): `deltafleet bench density`'s own
measurement (preloaded host tier, 2 rounds) with timers around the engine's forwards (decode and prefill), the
native adapter calls (`native.Chain`: a projection's fused pools; `Bound*`: the calls outside chains, e.g. the LM
head's table), the projection hooks, the RMSNorms (with their gain hooks) and the batch layout, summed per side
(tenants / base). Timers cost about 0.3 us each. Needs the tenants `deltafleet bench density` writes.
    python results/serve/density_stream_profile.py 100 > results/serve/density_stream_profile.txt"""
import collections
import json
import sys
import time
from pathlib import Path

from deltafleet import native
from deltafleet.bench import density
from deltafleet.dtypes import cpu_flags
from deltafleet.models import llama
from deltafleet.serve.engine import engine as engine_module
from deltafleet.serve.engine import layout as layout_module

ACC: collections.Counter = collections.Counter()
SIDE, FORWARD = ["-"], ["-"]


def timed(fn, name, counts=False):
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        ACC[(SIDE[0], FORWARD[0], name)] += time.perf_counter() - t0
        if counts:
            ACC[(SIDE[0], FORWARD[0], name + " calls")] += 1
        return out
    return wrapper


for cls in ("Chain", "BoundBgmv", "BoundRoad", "BoundQBgmv"):
    C = getattr(native, cls)
    C.__call__ = timed(C.__call__, f"native {cls}")
for fn in ("_decode_forward", "_prefill_forward", "_mixed_forward"):
    inner = timed(getattr(engine_module.Engine, fn), "forward", counts=True)

    def entered(self, *args, _inner=inner, _name=fn, **kwargs):
        FORWARD[0] = _name.strip("_").replace("_forward", "")
        return _inner(self, *args, **kwargs)
    setattr(engine_module.Engine, fn, entered)
build = layout_module.BatchLayout.build.__func__
layout_module.BatchLayout.build = classmethod(timed(build, "batch layout"))
make_hook = layout_module.BatchLayout.hook


def hook(self, *args, **kwargs):
    h = make_hook(self, *args, **kwargs)
    if h is None:
        return h
    w = timed(h, "hooks (incl. native)")
    w.norms, w.model_level = h.norms, h.model_level
    if hasattr(h, "norm"):  # the fused norms (timed with the norms)
        w.norm = h.norm
    return w


layout_module.BatchLayout.hook = hook
llama._norm = timed(llama._norm, "norms (incl. gain hooks)")
run = density._run


def side_run(engine, requests, base, clients):
    SIDE[0] = "base" if base else "tenants"
    t0 = time.perf_counter()
    out = run(engine, requests, base, clients)
    ACC[(SIDE[0], "-", "wall")] += time.perf_counter() - t0
    return out


density._run = side_run
n = int(sys.argv[1]) if len(sys.argv) > 1 else 100
cfg = density.DensityConfig(tenants=(n,), tiers=("preloaded",), rounds=2)
res = density.measure(cfg, Path.home() / ".cache/deltafleet/density-tenants", n, "preloaded")
print(f"CPU: {'avx512_bf16' if 'avx512_bf16' in cpu_flags() else 'no avx512_bf16'}; {n} tenants, preloaded, 2 rounds "
      "(+ warm-up); seconds summed over the run")
print(json.dumps({k: res[k] for k in ("throughput_vs_base", "pairs", "decode_tok_s", "base_decode_tok_s")}))
for key in sorted(ACC, key=lambda k: (k[1], k[2], k[0])):
    print(f"{key[1]:8s} {key[2]:28s} {key[0]:8s} {ACC[key]:9.3f}")
