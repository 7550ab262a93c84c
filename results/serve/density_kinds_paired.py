"""Decode at batch 32 with every tenant resident (64 qdelta slots, compressed tenants kept quantized as stored: the `ft` and `delta` sets both stay in theirs), per adapter kind, relative to the base alone: the cases
interleaved, 3 rounds, medians (README: Tenant density). Needs the tenants `deltafleet bench density` writes
(`ft`: whole fine-tunes with table and gains); `delta-NNNN` directories, projection-only compressed tenants that
earlier versions of the bench wrote, are measured too when present."""
import time, torch
from pathlib import Path
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
from deltafleet.models.loading import load_model, load_tokenizer
from deltafleet.bench.density import kind_configs, tenant_names
model, path = load_model("smollm2-135m", dtype=torch.bfloat16)
kc = kind_configs(model.config, 1/64)
rank = max(sum(r for _, r in kc["ft"].ranks(*model.config.linear_shape(p))) for p in ("q_proj", "k_proj", "gate_proj", "down_proj"))
e = Engine(model, load_tokenizer(path), EngineConfig(dtype="bfloat16", max_batch=32, max_model_len=80, lora_slots=32, road_slots=32, delta_slots=0, qdelta_slots=64, max_delta_rank=rank, pafi_slots=0, hiwi_slots=0))
root = Path.home() / ".cache/deltafleet/density-tenants"
names = tenant_names(96)
for n, k in names: e.adapters.add(n, root / n)
by = {k: [n for n, kk in names if kk == k] for k in ("lora", "road", "ft")}
by["delta"] = [f"delta-{i:04d}" for i in range(2, 96, 3) if (root / f"delta-{i:04d}").is_dir()]
for n in by["delta"]: e.adapters.add(n, root / n)
def run(adapters):
    reqs = [Request([5 + i] * 8, SamplingParams(max_tokens=48, ignore_eos=True), adapter=a) for i, a in enumerate(adapters)]
    t0 = time.perf_counter(); outs = e.generate(reqs); dt = time.perf_counter() - t0
    return sum(len(o.token_ids) for o in outs) / dt
cases = {"base": [None]*32, "32 lora": by["lora"][:32], "1 lora x32": [by["lora"][0]]*32, "32 road": by["road"][:32],
         "32 ft": by["ft"][:32], "1 ft x32": [by["ft"][0]]*32,
         "mixed 11/11/10": by["lora"][:11] + by["road"][:11] + by["ft"][:10]}
if len(by["delta"]) >= 32:
    cases |= {"32 delta (proj only)": by["delta"][:32]}
for c in cases.values(): run(c)
res = {k: [] for k in cases}
for rep in range(3):
    for k, c in cases.items(): res[k].append(run(c))
b = sorted(res["base"])[1]
for k, v in res.items(): print(f"{k:22s} " + " ".join(f"{x:6.1f}" for x in v) + f"   median/base {sorted(v)[1]/b:.2f}")
