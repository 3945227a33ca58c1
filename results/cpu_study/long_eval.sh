#!/usr/bin/env bash
# After long.sh: the RULER-style suite (every task of sparse_lm/ruler.py, 4 examples each; TASKS may be set
# from outside) and the loss by position (32 documents) of every finished run of the long setting at 1,024
# tokens, then a table over seeds and the position-loss plot (results/cpu_study/long_eval.md,
# long_position_loss.png). Evaluations already in a run's eval.jsonl are skipped (the suite when its latest
# summary covers TASKS), so rerunning continues (and may start while long.sh still trains).
#
#     bash results/cpu_study/long_eval.sh                  # from the repository root
set -euo pipefail
ROOT=${ROOT:-runs/cpu_study}
OUT=${OUT:-results/cpu_study}
TASKS=${TASKS:-$(python -c "from sparse_lm import ruler; print(','.join(ruler.TASKS))")}
suite_done() {  # whether the latest suite summary in eval.jsonl $1 covers exactly TASKS (with answer_loss)
  python -c "
import json, pathlib, sys
evals = pathlib.Path(sys.argv[1])
lines = [json.loads(x) for x in evals.read_text().splitlines()] if evals.exists() else []
done = [x for x in lines if x['task'] == 'ruler' and 'ruler_task' not in x]
sys.exit(0 if done and done[-1]['tasks'] == sys.argv[2].split(',') and 'answer_loss_by_length' in done[-1]
         else 1)" "$1" "$TASKS"
}
for dir in "$ROOT"/long/seed*/*_C*/; do
  [[ -d "$dir/checkpoints" ]] && ls "$dir/checkpoints" | grep -q '^[0-9]' || continue  # not trained yet
  grep -qs '"task": "position_loss"' "$dir/eval.jsonl" || python -m sparse_lm.evaluate --workdir="$dir" \
    --task=position_loss --lengths=1024 --documents=32 > /dev/null
  suite_done "$dir/eval.jsonl" || python -m sparse_lm.evaluate --workdir="$dir" \
    --task=ruler --lengths=1024 --num_samples=4 --tasks="$TASKS" > /dev/null
done
python results/cpu_study/long_eval.py --root="$ROOT/long" --out="$OUT"
