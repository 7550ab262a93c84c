#!/bin/sh
# Per-matrix against per-shape bit allocation (`--alloc-per matrix` vs the `alloc` runs of json-whole/ and
# sort-whole/, which allocated per shape), same fine-tunes, same ratios. Run from the repository root.
set -e
export HF_HUB_OFFLINE=1
JSON=${JSON:-/tmp/ft-json}
SORT=${SORT:-/tmp/ft-sort}
.venv/bin/deltafleet bench compress --finetuned "$SORT" --methods delta-come --alloc-per matrix \
  --ratios 1/16,1/128,1/256 --task sort --examples 16 --out results/compress/sort-whole/alloc-matrix \
  > results/compress/sort-whole/alloc-matrix.log 2>&1
.venv/bin/deltafleet bench compress --finetuned "$JSON" --methods delta-come --alloc-per matrix \
  --ratios 1/16,1/128,1/256 --task json-field --examples 16 --out results/compress/json-whole/alloc-matrix \
  > results/compress/json-whole/alloc-matrix.log 2>&1
