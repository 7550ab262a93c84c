"""Paired A/B (README: Tenant density): decode on the base at batch 32 in an engine that has loaded an adapter, with
the loader thread as it is now (OpenMP set to one thread before its first parallel op) and as it was (a first
parallel op on two threads, then one thread: the thread keeps an idle OpenMP worker). Each variant runs in its
own process, alternated 3 times; prints each run's decode tokens/s (median of 3 generate calls)."""
import os, subprocess, sys, statistics

CHILD = r'''
import ctypes, os, statistics, sys, threading, time, torch
from pathlib import Path
from deltafleet.bench.density import tenant_names
from deltafleet.models.loading import load_model, load_tokenizer
from deltafleet.serve.engine import Engine, EngineConfig, Request, SamplingParams
model, path = load_model("smollm2-135m", dtype=torch.bfloat16)
e = Engine(model, load_tokenizer(path), EngineConfig(dtype="bfloat16", max_batch=32, max_model_len=80))
root = Path.home() / ".cache/deltafleet/density-tenants"
name = tenant_names(1)[0][0]
e.adapters.add(name, root / name)
e.generate([Request([5] * 8, SamplingParams(max_tokens=2, ignore_eos=True), adapter=name)])  # loader thread exists
if sys.argv[1] == "old":
    def old_init():  # the previous loader_thread_init, on a thread that then idles like a pool worker
        torch.ones(1 << 17).sum()
        ctypes.CDLL("libgomp.so.1", mode=os.RTLD_NOLOAD).omp_set_num_threads(1)
        threading.Event().wait()
    threading.Thread(target=old_init, daemon=True).start()
    time.sleep(0.2)
def run():
    reqs = [Request([5 + i] * 8, SamplingParams(max_tokens=48, ignore_eos=True)) for i in range(32)]
    c0 = dict(e.counters); e.generate(reqs)
    return (e.counters["decode_tokens"] - c0["decode_tokens"]) / (e.counters["decode_seconds"] - c0["decode_seconds"])
run()
print(statistics.median(run() for _ in range(3)))
'''
res = {"new": [], "old": []}
for _ in range(3):
    for v in ("new", "old"):
        out = subprocess.run([sys.executable, "-c", CHILD, v], capture_output=True, text=True, env=os.environ)
        res[v].append(float(out.stdout.strip().splitlines()[-1]))
for v, xs in res.items():
    print(f"{v}: decode tokens/s " + " ".join(f"{x:.1f}" for x in xs) + f"   median {statistics.median(xs):.1f}")
print(f"new / old: {statistics.median(res['new']) / statistics.median(res['old']):.2f}x")
