#!/bin/sh
# Low-bit base measurements on SmolLM2-135M (issue 7). One intra-op thread (the CPU is a shared 2-core VM).
# Writes quantized bases under $Q (default /tmp/lowbit) and JSON lines under results/lowbit/; steps whose output
# exists are skipped, so the script resumes.
set -e
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
Q=${Q:-/tmp/lowbit}
PY=${PY:-.venv/bin/python}
R=results/lowbit
CLI=${CLI:-.venv/bin/deltafleet}
mkdir -p "$Q"
touch $R/ppl.jsonl
ppl() {  # ppl BASE [ADAPTER]
  grep -q "\"base\": \"$1\", \"adapter\": ${2:+\"}${2:-null}${2:+\"}" $R/ppl.jsonl && return 0
  $CLI lowbit-ppl --json --base "$1" ${2:+--adapter "$2"} >> $R/ppl.jsonl
}
quant() {  # quant NAME OPTIONS...
  name=$1; shift
  [ -f $Q/$name/deltafleet.json ] && return 0
  rm -rf $Q/$name
  $CLI quantize --out $Q/$name "$@" >> $R/quantize.log 2>&1
}
ppl smollm2-135m
for bits in 2 3 4; do
  quant apiq$bits --method apiq --bits $bits --rank 16 --alpha 16 --epochs 2 --lr-lwc 5e-2 --lr-lora 2e-3
  ppl $Q/apiq$bits $Q/apiq$bits/lora_init
  quant loftq$bits --method loftq --bits $bits --rank 16 --alpha 16 --loftq-iters 5
  ppl $Q/loftq$bits $Q/loftq$bits/lora_init
  quant rtn$bits --method rtn --bits $bits
  ppl $Q/rtn$bits
done
for bits in 2 3 4; do  # GPTQ last: its column loop is the slowest step here (about 10 min per width)
  quant gptq$bits --method gptq --bits $bits
  ppl $Q/gptq$bits
done
# 4-bit with the embedding table (and the tied LM head) quantized too: whole-model bytes against bf16
quant rtn4-emb --method rtn --bits 4 --embedding rtn
ppl $Q/rtn4-emb
