#!/bin/sh
# Whole-delta frontier (issue 18 parts 2-3) on a SmolLM2 full fine-tune on json-field:
#   deltafleet train --task json-field --method full --steps 40 --batch-size 8 --lr 5e-5 --out /tmp/ft-json
# every byte counted (projections, tied embedding / LM-head table, 61 norm gains); GPTQ calibration on Shakespeare.
set -e
export HF_HUB_OFFLINE=1
FT=${FT:-/tmp/ft-json}
RATIOS=${RATIOS:-1/16,1/128,1/256}
.venv/bin/deltafleet bench compress --finetuned "$FT" --methods delta-come,lowrank --ratios "$RATIOS" \
  --task json-field --examples 16 --out results/compress/json-whole/fixed > results/compress/json-whole/fixed.log 2>&1
.venv/bin/deltafleet bench compress --finetuned "$FT" --methods delta-come --plan alloc --ratios "$RATIOS" \
  --task json-field --examples 16 --out results/compress/json-whole/alloc > results/compress/json-whole/alloc.log 2>&1
