#!/bin/sh
# Low-bit base measurements on SmolLM2-135M (issue 7). One intra-op thread (the CPU is a shared 2-core VM).
# Writes quantized bases under $Q (default /tmp/lowbit) and JSON lines under results/lowbit/.
set -e
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
Q=${Q:-/tmp/lowbit}
PY=${PY:-.venv/bin/python}
R=results/lowbit
CLI="$PY -m deltafleet.quant.cli"
mkdir -p "$Q"
ppl() { $CLI lowbit-ppl --json "$@" >> $R/ppl.jsonl; }
quant() { /usr/bin/time -f '%e s wall' $CLI quantize "$@" 2>&1 | tee -a $R/quantize.log; }
[ -s $R/ppl.jsonl ] || ppl --base smollm2-135m
for bits in 2 3 4; do
  quant --method apiq --bits $bits --rank 16 --alpha 16 --epochs 2 --lr-lwc 5e-2 --lr-lora 2e-3 --out $Q/apiq$bits
  ppl --base $Q/apiq$bits --adapter $Q/apiq$bits/lora_init
  quant --method loftq --bits $bits --rank 16 --alpha 16 --loftq-iters 5 --out $Q/loftq$bits
  ppl --base $Q/loftq$bits --adapter $Q/loftq$bits/lora_init
  [ -d $Q/rtn$bits ] || quant --method rtn --bits $bits --out $Q/rtn$bits
  ppl --base $Q/rtn$bits
  quant --method gptq --bits $bits --out $Q/gptq$bits
  ppl --base $Q/gptq$bits
done
