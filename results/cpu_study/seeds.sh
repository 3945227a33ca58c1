#!/usr/bin/env bash
# The seed study of results/cpu_study/README.md: the dense twin and sparse variants at the largest
# budget of run.sh (4e12 FLOPs) and its compute-optimal size, each at train.seed 0..4 (initialisation
# and data order change; the validation batches do not), so that a variant's difference from dense is
# either resolved against seed noise or reported as not resolved. Needs run.sh's dense_fit.json. Runs
# are skipped once finished, so rerunning continues; VARIANTS and SEEDS may be set from outside.
#
#     bash results/cpu_study/seeds.sh                      # from the repository root
#     VARIANTS="dense moba dsa" SEEDS="0 1 2 3 4" bash results/cpu_study/seeds.sh
set -euo pipefail
ROOT=${ROOT:-runs/cpu_study}
OUT=${OUT:-results/cpu_study}
BUDGET=4e12
read -r -a VARIANTS <<< "${VARIANTS:-dense moba dsa nsa mosa_causal routing_causal moe}"
read -r -a SEEDS <<< "${SEEDS:-0 1 2 3 4}"
COMMON=(--set train.batch_size=8 --set train.eval_batches=32 --set train.eval_every=1000000
        --set checkpoint.every_steps=1000000 --set train.log_every=50)
N_OPT=$(python -c "import json; print(json.load(open('$OUT/dense_fit.json'))['approach2']['budgets'][-1]['N_opt'])")

for seed in "${SEEDS[@]}"; do
  for variant in "${VARIANTS[@]}"; do
    python -m sparse_lm.scaling sweep --variant "$variant" --budgets "$BUDGET" --sizes_per_budget 1 \
      --params "$N_OPT" --workdir_root "$ROOT/seeds/seed$seed" "${COMMON[@]}" --set train.seed="$seed" --run
  done
done
# One line per finished run, with its seed.
: > "$OUT/seed_runs.jsonl"
for dir in "$ROOT"/seeds/seed*/; do
  seed=${dir%/}; seed=${seed##*seed}
  python -m sparse_lm.scaling collect --workdir_root "$dir" --out "$ROOT/seeds/seed$seed.jsonl"
  python -c "
import json, sys
for line in open('$ROOT/seeds/seed$seed.jsonl'):
  print(json.dumps({**json.loads(line), 'seed': $seed}))" >> "$OUT/seed_runs.jsonl"
done
# A variant with no seed-0 run here takes run.sh's (variant_runs.jsonl: the same command at train.seed 0;
# the dense twin's seed 0 reran here to 2e-5 of run.sh's), marked with where it came from.
python results/cpu_study/seed_zero.py --out "$OUT"
python results/cpu_study/summarize.py --dir="$OUT" > "$OUT/tables.md"
