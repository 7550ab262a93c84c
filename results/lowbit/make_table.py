"""Collect the low-bit measurements into results/lowbit/results.json and print the README table.

Reads results/lowbit/ppl.jsonl (lowbit-ppl --json lines), the manifests of the quantized bases under $Q
(default /tmp/lowbit), results/lowbit/bench.jsonl (lowbit-bench --json lines) and results/lowbit/finetune.jsonl.
Run: .venv/bin/python results/lowbit/make_table.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

R = Path(__file__).parent
Q = Path(os.environ.get("Q", "/tmp/lowbit"))


def lines(name: str) -> list[dict]:
    p = R / name
    return [json.loads(x) for x in p.read_text().splitlines() if x.strip()] if p.is_file() else []


ppl = {(Path(r["base"]).name, r["adapter"] is not None): r["perplexity"] for r in lines("ppl.jsonl")}
FT_LR, FT_STEPS = 0.002, 40  # the fine-tunes of the table: the zoo's LoRA rate, 40 steps of 8 examples
fine_all = lines("finetune.jsonl")
fine = {r["name"]: r for r in fine_all if r.get("lr") == 0.0003}  # the first, 2-bit-only runs (lr 3e-4)
tuned = {(r["name"], r["task"]): r for r in fine_all if r.get("lr") == FT_LR and r.get("steps") == FT_STEPS}
rows = []
fp = ppl.get(("smollm2-135m", False))
rows.append({"method": "full precision (fp32 weights)", "bits": 32, "init_ppl": fp, "bytes": None})
for bits in (4, 3, 2):
    for label, name, with_lora in (("RTN + zero LoRA (QLoRA-style)", f"rtn{bits}", False),
                                   ("GPTQ (no LoRA)", f"gptq{bits}", False),
                                   ("LoftQ init", f"loftq{bits}", True), ("ApiQ init", f"apiq{bits}", True)):
        mpath = Q / name / "deltafleet.json"
        if not mpath.is_file():
            continue
        m = json.loads(mpath.read_text())
        rows.append({"method": label, "bits": bits, "name": name, "init_ppl": ppl.get((name, with_lora)),
                     "bytes": m["bytes"], "quantize_seconds": m["seconds"], "settings": m["settings"],
                     "calibration": m.get("calibration"), "finetune": fine.get(name)})
out = {"model": "smollm2-135m (SmolLM2-135M-Instruct, Q4_1 GGUF dequantized)",
       "heldout": "Shakespeare test plays, 32 windows x 256 tokens, fp32 compute",
       "rows": rows, "finetune_fp": fine.get("fp"), "bench": lines("bench.jsonl"),
       "finetune_lr2e-3": [r for r in fine_all if r.get("lr") == FT_LR and r.get("steps") == FT_STEPS]}
(R / "results.json").write_text(json.dumps(out, indent=2))


def fmt(x, spec=".2f"):
    return "-" if x is None else format(x, spec)


print("| bits | start | held-out ppl after init | projection bytes (x bf16) | whole model bytes (x bf16) |")
print("|---|---|---|---|---|")
for r in rows:
    b = r["bytes"]
    proj = "-" if b is None else f"{b['projections'] / 1e6:.1f} MB ({b['projections'] / b['projections_bf16']:.3f})"
    tot = "-" if b is None else f"{b['total'] / 1e6:.1f} MB ({b['total'] / b['total_bf16']:.3f})"
    print(f"| {r['bits']} | {r['method']} | {fmt(r['init_ppl'])} | {proj} | {tot} |")

print()
print("| start (task sort, 40 steps, lr 3e-4) | base | train loss first -> last | val loss | val accuracy |")
print("|---|---|---|---|---|")
for r in fine.values():
    m = r["final_metrics"]
    print(f"| {r['name']} | {Path(r['base']).name} | {r['train_loss']['first']:.3f} -> {r['train_loss']['last']:.3f} "
          f"| {m.get('val_loss', float('nan')):.3f} | {m.get('val_accuracy', float('nan')):.3f} |")
print()
TASKS = ("json-field", "sort")
print(f"LoRA r16 fine-tunes, lr {FT_LR}, {FT_STEPS} steps of 8 (accuracy on 32 validation examples):")
print("| bits | start | ppl after init | " + " | ".join(f"{t} ppl after ft | {t} val loss | {t} accuracy"
                                                    for t in TASKS) + " | mean accuracy |")
print("|---|---|---|" + "---|---|---|" * len(TASKS) + "---|")
STARTS = (("fp", "full-precision base + zero LoRA", 32), *((f"{m}{b}", label, b) for b in (4, 3, 2)
          for m, label in (("rtn", "RTN + zero LoRA (QLoRA-style)"), ("loftq", "LoftQ init"), ("apiq", "ApiQ init"))))
for name, label, bits in STARTS:
    runs = [tuned.get((name, t)) for t in TASKS]
    if not any(runs):
        continue
    init = ppl.get((name if name != "fp" else "smollm2-135m", name.startswith(("loftq", "apiq"))))
    cells = []
    for r in runs:
        m = (r or {}).get("final_metrics", {})
        cells += [fmt((r or {}).get("heldout_ppl")), fmt(m.get("val_loss"), ".3f"), fmt(m.get("val_accuracy"), ".3f")]
    accs = [r["final_metrics"]["val_accuracy"] for r in runs if r]
    mean = fmt(sum(accs) / len(accs), ".3f") if len(accs) == len(TASKS) else "-"
    print(f"| {bits if bits < 32 else 'fp'} | {label} | {fmt(init)} | " + " | ".join(cells) + f" | {mean} |")
print()
print("| base | kernel | decode tokens/s | projection bytes |")
print("|---|---|---|---|")
for r in lines("bench.jsonl"):
    print(f"| {Path(r['base']).name} | {r['kernel'] or '-'} | {r['decode_tokens_per_s']:.1f} | "
          f"{r['projection_bytes'] / 1e6:.1f} MB |")
