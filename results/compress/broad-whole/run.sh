#!/bin/sh
# Whole-delta frontier (issue 18 part 3) on a broad SmolLM2 full fine-tune (all-tasks, 100 steps; the zoo's
# broad-full takes 150): accuracy averaged over json-field, sort and reverse-words, every byte counted.
# Run from the repository root.
set -e
export HF_HUB_OFFLINE=1
FT=${FT:-/tmp/ft-broad}
[ -d "$FT" ] || .venv/bin/deltafleet train --task all-tasks --method full --steps 100 --batch-size 8 --lr 5e-5 --out "$FT"
.venv/bin/deltafleet bench compress --finetuned "$FT" --methods delta-come,lowrank --ratios 1/16,1/128,1/256 \
  --task json-field,sort,reverse-words --examples 16 --out results/compress/broad-whole/alloc \
  > results/compress/broad-whole/alloc.log 2>&1
