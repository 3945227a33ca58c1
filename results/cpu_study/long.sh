#!/usr/bin/env bash
# The second setting of results/cpu_study/README.md: sequences of 1,024 bytes, where a sparse variant
# reads a small part of the context (MoBA: 3 blocks of 32 plus its own, 128 of 1,024; DSA: 64 tokens), at
# 2e12 FLOPs (attention counted, so the sparse variants get more tokens for the same compute) and the
# seed study's size, train.seed 0..4 each; then a passkey evaluation at 1,024 of every run. Runs and
# evaluations are skipped once finished, so rerunning continues; VARIANTS, SEEDS and BUDGET may be set
# from outside, and TRAIN=0 only collects what has finished.
#
#     bash results/cpu_study/long.sh                       # from the repository root
#     SEEDS="0 1 2" bash results/cpu_study/long.sh
set -euo pipefail
ROOT=${ROOT:-runs/cpu_study}
OUT=${OUT:-results/cpu_study}
BUDGET=${BUDGET:-2e12}
read -r -a VARIANTS <<< "${VARIANTS:-dense nsa moba dsa}"
read -r -a SEEDS <<< "${SEEDS:-0 1 2 3 4}"
COMMON=(--set data.seq_len=1024 --set train.batch_size=8 --set train.eval_batches=32
        --set train.eval_every=1000000 --set checkpoint.every_steps=1000000 --set train.log_every=50)
N_OPT=$(python -c "import json; print(json.load(open('$OUT/dense_fit.json'))['approach2']['budgets'][-1]['N_opt'])")

if [[ "${TRAIN:-1}" == 1 ]]; then
  for seed in "${SEEDS[@]}"; do
    for variant in "${VARIANTS[@]}"; do
      python -m sparse_lm.scaling sweep --variant "$variant" --budgets "$BUDGET" --sizes_per_budget 1 \
        --params "$N_OPT" --workdir_root "$ROOT/long/seed$seed" "${COMMON[@]}" --set train.seed="$seed" --run
      for dir in "$ROOT/long/seed$seed/${variant}"_C*/; do
        grep -qs '"task": "passkey"' "$dir/eval.jsonl" || python -m sparse_lm.evaluate --workdir="$dir" \
          --task=passkey --lengths=1024 --num_samples=8 > /dev/null
      done
    done
  done
fi
# One line per finished run, with its seed and its passkey accuracy.
: > "$OUT/long_runs.jsonl"
for dir in "$ROOT"/long/seed*/; do
  seed=${dir%/}; seed=${seed##*seed}
  python -m sparse_lm.scaling collect --workdir_root "$dir" --out "$ROOT/long/seed$seed.jsonl"
  python -c "
import json, pathlib
for line in open('$ROOT/long/seed$seed.jsonl'):
  run = json.loads(line)
  evals = pathlib.Path('$dir', run['name'], 'eval.jsonl')
  keys = [e for e in map(json.loads, evals.read_text().splitlines()) if e['task'] == 'passkey'] \
      if evals.exists() else []
  print(json.dumps({**run, 'seed': $seed, 'passkey': keys[-1]['accuracy'] if keys else None}))" \
    >> "$OUT/long_runs.jsonl"
done
python results/cpu_study/summarize.py --dir="$OUT" > "$OUT/tables.md"
