#!/bin/sh
# OneBit measurements (README "OneBit: a 1-bit base"): the 1-bit bases, their held-out perplexity (the evaluator
# and windows of results/lowbit/measure.sh), decode with mixed tenants against the 4-bit and fp bases in one run,
# and LoRA fine-tunes on the distilled base (results/lowbit/finetune.sh's recipe), then a continued distillation on
# chat-formatted text and its fine-tunes. Resumable: a step whose output
# exists is skipped. Usage: results/lowbit/onebit.sh   (Q=/tmp/ob by default)
set -e
export HF_HUB_OFFLINE=1
Q=${Q:-/tmp/ob}
R=results/lowbit
D=.venv/bin/deltafleet
[ -f $Q/onebit/deltafleet.json ] || $D quantize --method onebit --out $Q/onebit --no-progress  # SVID + 1000 KD steps
[ -f $Q/onebit-svid/deltafleet.json ] || $D quantize --method onebit --kd-steps 0 --out $Q/onebit-svid
[ -f $Q/onebit-svid-nmf/deltafleet.json ] || $D quantize --method onebit --kd-steps 0 --svid nmf --out $Q/onebit-svid-nmf
[ -f $Q/rtn4/deltafleet.json ] || $D quantize --method rtn --bits 4 --out $Q/rtn4
[ -f $Q/rtn2/deltafleet.json ] || $D quantize --method rtn --bits 2 --out $Q/rtn2
for b in onebit onebit-svid onebit-svid-nmf rtn2; do
  grep -q "\"base\": \"$Q/$b\"" $R/onebit-ppl.jsonl 2>/dev/null || $D lowbit-ppl --json --base $Q/$b >> $R/onebit-ppl.jsonl
done
[ -f $R/onebit-decode.json ] || $D bench lowbit --base smollm2-135m --base $Q/rtn4 --base $Q/onebit --adapters 8 \
  --batch 8 --prompt-len 16 --max-tokens 16 --rounds 3 --dtype bfloat16 --json > $R/onebit-decode.json
[ -f $R/onebit-decode-fp32.json ] || $D bench lowbit --base smollm2-135m --base $Q/rtn4 --base $Q/onebit --adapters 8 \
  --batch 8 --prompt-len 16 --max-tokens 16 --rounds 3 --dtype float32 --json > $R/onebit-decode-fp32.json
[ -f $R/onebit-decode-b32.json ] || $D bench lowbit --base smollm2-135m --base $Q/rtn4 --base $Q/onebit --adapters 32 \
  --batch 32 --prompt-len 16 --max-tokens 16 --rounds 3 --dtype bfloat16 --json > $R/onebit-decode-b32.json
# the two fine-tunes side by side, one thread each (as the low-bit table's)
TASK=json-field Q=$Q results/lowbit/finetune.sh onebit $Q/onebit &
TASK=sort Q=$Q results/lowbit/finetune.sh onebit $Q/onebit
wait
# continued distillation on chat-formatted text of other tasks (never json-field or sort), then the same fine-tunes
[ -f $Q/kd-chat.txt ] || .venv/bin/python results/lowbit/make_kd_text.py $Q/kd-chat.txt
[ -f $Q/onebit-chat/deltafleet.json ] || $D quantize --method onebit --kd-init $Q/onebit --calib $Q/kd-chat.txt \
  --kd-steps 400 --kd-windows 800 --out $Q/onebit-chat --no-progress
grep -q "\"base\": \"$Q/onebit-chat\"" $R/onebit-ppl.jsonl || $D lowbit-ppl --json --base $Q/onebit-chat >> $R/onebit-ppl.jsonl
TASK=json-field Q=$Q results/lowbit/finetune.sh onebit-chat $Q/onebit-chat &
TASK=sort Q=$Q results/lowbit/finetune.sh onebit-chat $Q/onebit-chat
wait
