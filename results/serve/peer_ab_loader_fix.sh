#!/bin/bash
# Results: results/serve/peer_ab_loader_fix.txt (README: Served performance). Needs a worktree of the old commit: git worktree add /tmp/oldtree 0cdc997
# deltafleet served alone (bench peer --skip-llamacpp), the session's starting code (0cdc997) against HEAD, alternated
cd /work/main
for rep in 1 2; do
  for v in old new; do
    if [ $v = old ]; then PP=/tmp/oldtree/src; else PP=/work/main/src; fi
    PYTHONPATH=$PP HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false timeout 900 .venv/bin/python -m deltafleet.cli bench peer --skip-llamacpp --dtype bfloat16 --json > /tmp/prof/peer_$v$rep.json 2>/tmp/prof/peer_$v$rep.err
    echo "$v$rep rc=$?"
  done
done
