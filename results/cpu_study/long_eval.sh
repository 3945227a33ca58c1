#!/usr/bin/env bash
# After long.sh: six tasks of the RULER-style suite (4 examples each; TASKS may be set from outside, e.g.
# every task of sparse_lm/ruler.py) and the loss by position (32 documents) of every finished run of the
# long setting at 1,024 tokens, then a table over seeds and the position-loss plot
# (results/cpu_study/long_eval.md, long_position_loss.png). Evaluations already in a run's eval.jsonl are
# skipped, so rerunning continues (and may start while long.sh still trains).
#
#     bash results/cpu_study/long_eval.sh                  # from the repository root
set -euo pipefail
ROOT=${ROOT:-runs/cpu_study}
OUT=${OUT:-results/cpu_study}
TASKS=${TASKS:-niah_single_1,niah_single_2,niah_multikey_1,niah_multivalue,vt,cwe}
for dir in "$ROOT"/long/seed*/*_C*/; do
  [[ -d "$dir/checkpoints" ]] && ls "$dir/checkpoints" | grep -q '^[0-9]' || continue  # not trained yet
  grep -qs '"task": "position_loss"' "$dir/eval.jsonl" || python -m sparse_lm.evaluate --workdir="$dir" \
    --task=position_loss --lengths=1024 --documents=32 > /dev/null
  grep -qs '"task": "ruler"' "$dir/eval.jsonl" || python -m sparse_lm.evaluate --workdir="$dir" \
    --task=ruler --lengths=1024 --num_samples=4 --tasks="$TASKS" > /dev/null
done
python results/cpu_study/long_eval.py --root="$ROOT/long" --out="$OUT"
