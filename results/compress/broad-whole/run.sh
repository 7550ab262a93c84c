cd /work/main
export HF_HUB_OFFLINE=1
.venv/bin/deltafleet train --task all-tasks --method full --steps 100 --batch-size 8 --lr 5e-5 --out /tmp/ft-broad > /tmp/wt/train-broad.log 2>&1
mkdir -p results/compress/broad-whole
.venv/bin/deltafleet bench compress --finetuned /tmp/ft-broad --methods delta-come,lowrank --ratios 1/16,1/128,1/256 --task json-field,sort,reverse-words --examples 16 --out results/compress/broad-whole/alloc > results/compress/broad-whole/alloc.log 2>&1
echo done > /tmp/wt/round5.done
