#!/bin/sh
# The whole-delta frontier at 1/8, 1/32 and 1/64 (issue 18 part 3 asks for every ratio from 1/8 to 1/256; 1/16, 1/128
# and 1/256 are in sort-whole/ and broad-whole/), on the same two fine-tunes (their run.sh / README commands build
# them). Run from the repository root.
set -e
export HF_HUB_OFFLINE=1
SORT=${SORT:-/tmp/ft-sort}
BROAD=${BROAD:-/tmp/ft-broad}
.venv/bin/deltafleet bench compress --finetuned "$SORT" --methods delta-come,lowrank --ratios 1/8,1/32,1/64 \
  --task sort --examples 16 --out results/compress/sort-whole/alloc-more > results/compress/sort-whole/alloc-more.log 2>&1
.venv/bin/deltafleet bench compress --finetuned "$BROAD" --methods delta-come,lowrank --ratios 1/8,1/32,1/64 \
  --task json-field,sort,reverse-words --examples 16 --out results/compress/broad-whole/alloc-more \
  > results/compress/broad-whole/alloc-more.log 2>&1
