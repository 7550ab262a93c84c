"""Another thread's idle OpenMP team slows the engine loop (README: Tenant density). Run each variant in its own
process, alternated:
    python results/serve/openmp_team_ab.py micro kept|released
        the main thread runs one two-thread op (its team exists), then another thread times a 200k-element
        multiply (5,000 times, median-free mean): `kept` leaves the main thread's team, `released` frees it first
        (`native.openmp.release_team`, what `Engine.spawn` now does).
    python results/serve/openmp_team_ab.py stream kept|released
        the density stream (100 tenants preloaded, 256 requests, batch 32, 32 closed-loop clients) on an engine
        spawned after the model was loaded on the main thread, as `bench density` does: tokens/s on the base, then
        with tenants. `kept` turns the release in `Engine.spawn` off.
Needs the tenants `deltafleet bench density` writes (stream only)."""
import sys
import threading
import time

import torch

from deltafleet.native import openmp

what, variant = sys.argv[1], sys.argv[2]
if variant == "kept":
    openmp.release_team = lambda: False  # noqa: E731 (the behaviour before the fix)

if what == "micro":
    torch.randn(4000, 4000) + 1  # a two-thread op on the main thread: its team exists from now on
    openmp.release_team()
    x = torch.randn(200_000)
    out = []

    def bench():
        for _ in range(200):
            x * 2
        t0 = time.perf_counter()
        for _ in range(5000):
            x * 2
        out.append((time.perf_counter() - t0) / 5000 * 1e6)

    t = threading.Thread(target=bench)
    t.start()
    t.join()
    print(f"micro {variant}: {out[0]:.1f} us per 200k-element multiply on another thread")
else:
    import random
    from pathlib import Path

    from deltafleet.bench import density as D
    from deltafleet.models.config import PROJECTIONS
    from deltafleet.models.loading import load_model, load_tokenizer
    from deltafleet.serve.engine import Engine, EngineConfig

    cfg = D.DensityConfig(requests=256)
    root = Path.home() / ".cache/deltafleet/density-tenants"
    model, path = load_model(cfg.base, dtype=torch.bfloat16)  # on the main thread, as bench density does
    ft = D.kind_configs(model.config, cfg.ratio)["ft"]
    rows = max(sum(r for _, r in ft.ranks(*model.config.linear_shape(p))) for p in PROJECTIONS)
    ecfg = EngineConfig(dtype="bfloat16", max_batch=32, max_model_len=40, lora_slots=32, max_lora_rank=16,
                        road_slots=32, delta_slots=0, qdelta_slots=32, max_delta_rank=rows, pafi_slots=0,
                        hiwi_slots=0)
    engine = Engine.spawn(lambda: Engine(model, load_tokenizer(path), ecfg))
    names = [n for n, _ in D.tenant_names(100)]
    for n in names:
        engine.adapters.add(n, root / n)
    engine.adapters.preload(names)
    while engine.adapters.preloading:
        time.sleep(0.05)
    reqs = D._stream(list(names), cfg, random.Random(0), model.config.vocab_size)
    D._run(engine, reqs[:64], True, 32)
    D._run(engine, reqs[:64], False, 32)
    base, _, _ = D._run(engine, reqs, True, 32)
    tenants, _, _ = D._run(engine, reqs, False, 32)
    print(f"stream {variant}: base {base:.1f} tok/s, tenants {tenants:.1f} tok/s, ratio {tenants / base:.3f}")
    engine.shutdown()
