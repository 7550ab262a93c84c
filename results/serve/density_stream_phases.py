"""Where a density stream's time goes (README: Tenant density): N=1000 tenants, a 192-request Zipf stream at batch 32,
run three times on one engine: on the base, with tenants (cold: loads from disk), with tenants again (warm: every
tenant in host memory, slot misses only). Prints tokens/s, the mean running and waiting requests (sampled every
50 ms), and the engine's prefill and decode seconds and loads of each run. SWI: sys.setswitchinterval (default
0.005). Needs the tenants `deltafleet bench density` writes."""
import random, threading, time, torch, statistics, sys, os
sys.setswitchinterval(float(os.environ.get("SWI", "0.005")))
from pathlib import Path
from deltafleet.bench import density as D
from deltafleet.serve.engine import Engine, EngineConfig
from deltafleet.models.loading import load_model, load_tokenizer
from deltafleet.models.config import PROJECTIONS
cfg = D.DensityConfig(requests=192)
root = Path.home()/".cache/deltafleet/density-tenants"
model, path = load_model(cfg.base, dtype=torch.bfloat16)
ft = D.kind_configs(model.config, cfg.ratio)["ft"]
rows = max(sum(r for _, r in ft.ranks(*model.config.linear_shape(p))) for p in PROJECTIONS)
ecfg = EngineConfig(mixed_steps=os.environ.get("MIXED", "1") == "1", dtype="bfloat16", max_batch=32, max_model_len=40, lora_slots=32, max_lora_rank=16, road_slots=32, delta_slots=0, qdelta_slots=32, max_delta_rank=rows, pafi_slots=0, hiwi_slots=0)
engine = Engine.spawn(lambda: Engine(model, load_tokenizer(path), ecfg))
names = [n for n, _ in D.tenant_names(1000)]
for n in names: engine.adapters.add(n, root / n)
reqs = D._stream(list(names), cfg, random.Random(0), model.config.vocab_size)
samples = []
stop = False
def sampler():
    while not stop:
        s = engine.stats(); samples.append((s["running"], s["waiting"])); time.sleep(0.05)
for base in (True, False, False):
    c0 = dict(engine.stats())
    samples.clear(); stop = False
    th = threading.Thread(target=sampler if os.environ.get("SAMPLER", "1") == "1" else (lambda: samples.append((0, 0)))); th.start()
    tps, failed, _ = D._run(engine, reqs, base, 32)
    stop = True; th.join()
    run = [r for r, _ in samples]; wait = [w for _, w in samples]
    print("base" if base else "tenants", f"tok/s {tps:.1f}", f"running mean {statistics.mean(run):.1f}", f"waiting mean {statistics.mean(wait):.1f}", "steps", engine.stats()["steps"]-c0["steps"], "decode_s %.1f" % (engine.stats()["decode_seconds"]-c0["decode_seconds"]), "prefill_s %.1f" % (engine.stats()["prefill_seconds"]-c0["prefill_seconds"]), "mixed_s %.1f" % (engine.stats()["mixed_seconds"]-c0["mixed_seconds"]), "mixed_steps", engine.stats()["mixed_steps"]-c0["mixed_steps"], "loads", engine.stats()["adapter_cache"]["loads"]-c0["adapter_cache"]["loads"], "misses", engine.stats()["adapter_cache"]["misses"]-c0["adapter_cache"]["misses"])
print(engine.stats())
engine.shutdown() if hasattr(engine, "shutdown") else None
