#!/bin/sh
# LoRA fine-tunes (rank 16, alpha 16, all seven projections, the zoo's LoRA rate 2e-3) from each start, on $TASK,
# then held-out perplexity of the fine-tuned model. Appends JSON lines to results/lowbit/finetune.jsonl and
# results/lowbit/ppl.jsonl; a run whose line exists is skipped, so the script resumes.
# Usage: TASK=sort results/lowbit/finetune.sh NAME BASE [LORA_INIT]
#        TASK=sort results/lowbit/finetune.sh all     (fp, then rtn/loftq/apiq at 4, 3 and 2 bits)
set -e
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} MKL_NUM_THREADS=${OMP_NUM_THREADS:-1}
Q=${Q:-/tmp/lowbit}
TASK=${TASK:-sort}
STEPS=${STEPS:-40}
LR=${LR:-2e-3}
R=results/lowbit
touch $R/finetune.jsonl $R/ppl.jsonl
one() {  # one NAME BASE [LORA_INIT]
  name=$1; base=$2; init=${3:+--lora-init $3}
  out=$Q/ft-$TASK-$name-lr$LR-s$STEPS
  lrj=$(.venv/bin/python -c "print(float('$LR'))")
  grep -q "\"name\": \"$name\", \"task\": \"$TASK\", \"lr\": $lrj, \"steps\": $STEPS," $R/finetune.jsonl && return 0
  rm -rf "$out"
  .venv/bin/deltafleet train --base "$base" --task $TASK --method lora --rank 16 --alpha 16 $init --steps $STEPS \
    --lr $LR --batch-size 8 --precision fp32 --save-every 0 --eval-examples 32 --out "$out" > "$out.log" 2>&1
  .venv/bin/deltafleet lowbit-ppl --json --base "$base" --adapter "$out" > "$out.ppl"
  .venv/bin/python - "$out" "$name" "$TASK" "$LR" "$STEPS" "$base" "${3:-}" >> $R/finetune.jsonl <<'PY'
import json, sys
out, name, task, lr, steps, base, init = sys.argv[1:]
m = json.load(open(f"{out}/deltafleet.json"))
ppl = json.load(open(f"{out}.ppl"))["perplexity"]
print(json.dumps({"name": name, "task": task, "lr": float(lr), "steps": int(steps), "base": base,
                  "lora_init": init or None, "train_loss": m["train_loss"], "final_metrics": m["final_metrics"],
                  "heldout_ppl": ppl, "train_seconds": m["train_seconds"]}))
PY
}
if [ "$1" = all ]; then
  one fp smollm2-135m
  for bits in 4 3 2; do
    one rtn$bits $Q/rtn$bits
    one loftq$bits $Q/loftq$bits $Q/loftq$bits/lora_init
    one apiq$bits $Q/apiq$bits $Q/apiq$bits/lora_init
  done
else
  one "$@"
fi
