#!/bin/sh
# The compression frontier (issue: delta compression) on the zoo's full fine-tunes: every method at 1/8 .. 1/256,
# KL on the held-out test prompts + answers of the fine-tune's tasks, accuracy (mean over those tasks) and the
# share of the fine-tune's gain kept. Needs a built zoo (`deltafleet zoo build`).
# Each fine-tune runs as two one-thread processes side by side (ratios split over the two cores), then
# results/compress/combine.py joins them into results/compress/ENTRY/.
# Usage: results/compress/frontier.sh [ENTRY ...]   (default: broad-full)
#        RATIOS_A=1/16 RATIOS_B= results/compress/frontier.sh sort-full   (one ratio, one process)
set -e
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # one thread per process: two share the 2 cores
ZOO=${ZOO:-$HOME/.cache/deltafleet/zoo/smollm2-135m}
EXAMPLES=${EXAMPLES:-32}
RATIOS_A=${RATIOS_A-1/8,1/32,1/128}
RATIOS_B=${RATIOS_B-1/16,1/64,1/256}
for entry in ${@:-broad-full}; do
  case $entry in
    broad-full) tasks=json-field,sort,reverse-words ;;
    *) tasks=${entry%-full} ;;
  esac
  runs=""
  for part in A B; do
    eval ratios=\$RATIOS_$part
    [ -n "$ratios" ] || continue
    .venv/bin/deltafleet bench compress --finetuned "$ZOO/$entry" --task "$tasks" --examples "$EXAMPLES" \
      --ratios "$ratios" --out "results/compress/$entry-$part" > "results/compress/$entry-$part.log" 2>&1 &
    runs="$runs results/compress/$entry-$part"
  done
  wait
  .venv/bin/python results/compress/combine.py "results/compress/$entry" $runs
done
