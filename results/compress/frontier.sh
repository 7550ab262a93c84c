#!/bin/sh
# The compression frontier (issue: delta compression) on the zoo's full fine-tunes: every method at 1/8 .. 1/256,
# KL on the held-out test prompts + answers of the fine-tune's tasks, accuracy (mean over those tasks) and the
# share of the fine-tune's gain kept. Needs a built zoo (`deltafleet zoo build`).
# Usage: results/compress/frontier.sh [ENTRY ...]   (default: broad-full and the three single-task fine-tunes)
set -e
export HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 MKL_NUM_THREADS=1  # one thread: GPTQ/SVD crawl on an oversubscribed CPU
ZOO=${ZOO:-$HOME/.cache/deltafleet/zoo/smollm2-135m}
EXAMPLES=${EXAMPLES:-32}
for entry in ${@:-broad-full json-field-full sort-full reverse-words-full}; do
  case $entry in
    broad-full) tasks=json-field,sort,reverse-words ;;
    *) tasks=${entry%-full} ;;
  esac
  .venv/bin/deltafleet bench compress --finetuned "$ZOO/$entry" --task "$tasks" --examples "$EXAMPLES" \
    --out "results/compress/$entry"
done
