#!/bin/sh
# Engine decode throughput: fp32 and bf16 base vs the 4-bit RTN base (fast, cached and native kernels), one intra-op thread.
set -e
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
Q=${Q:-/tmp/lowbit}
CLI="${CLI:-.venv/bin/deltafleet}"
[ -f $Q/rtn4/deltafleet.json ] || $CLI quantize --method rtn --bits 4 --out $Q/rtn4 >> results/lowbit/quantize.log
B="--batch 8 --prompt-len 16 --max-tokens 8 --json"
$CLI bench lowbit --base smollm2-135m $B >> results/lowbit/bench.jsonl
$CLI bench lowbit --base smollm2-135m --dtype bfloat16 $B >> results/lowbit/bench.jsonl
$CLI bench lowbit --base $Q/rtn4 --kernel fast $B >> results/lowbit/bench.jsonl
$CLI bench lowbit --base $Q/rtn4 --kernel cached $B >> results/lowbit/bench.jsonl
$CLI bench lowbit --base $Q/rtn4 --kernel native $B >> results/lowbit/bench.jsonl
[ -f $Q/rtn4-emb/deltafleet.json ] || $CLI quantize --method rtn --bits 4 --embedding rtn --out $Q/rtn4-emb >> results/lowbit/quantize.log
$CLI bench lowbit --base $Q/rtn4-emb --kernel native $B >> results/lowbit/bench.jsonl
