#!/bin/sh
# Short LoRA fine-tunes (rank 16, alpha 16, all seven projections) from each start, on task $TASK.
# Usage: results/lowbit/finetune.sh NAME BASE [LORA_INIT]; appends a JSON line to results/lowbit/finetune.jsonl.
set -e
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
Q=${Q:-/tmp/lowbit}
TASK=${TASK:-sort}
STEPS=${STEPS:-40}
name=$1; base=$2; init=${3:+--lora-init $3}
out=$Q/ft-$TASK-$name
.venv/bin/deltafleet train --base "$base" --task $TASK --method lora --rank 16 --alpha 16 $init --steps $STEPS \
  --batch-size 8 --precision fp32 --save-every 0 --eval-examples 32 --out "$out"
.venv/bin/python -c "import json,sys; m=json.load(open('$out/deltafleet.json')); print(json.dumps({'name': '$name', 'task': '$TASK', 'base': '$base', 'lora_init': '${3:-}' or None, 'steps': m['steps'], 'train_loss': m['train_loss'], 'final_metrics': m['final_metrics'], 'train_seconds': m['train_seconds']}))" >> results/lowbit/finetune.jsonl
