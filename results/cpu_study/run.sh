#!/usr/bin/env bash
# The CPU-scale study of results/cpu_study/README.md, end to end: a dense isoFLOP ladder, its fits,
# then NSA, MoSA, routing (paper-faithful and causal) and MoE at the largest budget, at the size the
# dense fit calls compute-optimal, each with its causality leak, and the noise of one run (the dense
# twin at two more seeds). Runs are skipped once finished, so rerunning continues an interrupted
# study. About 90 minutes on 2 CPU cores.
#
#     bash results/cpu_study/run.sh            # from the repository root
set -euo pipefail
ROOT=${ROOT:-runs/cpu_study}
OUT=${OUT:-results/cpu_study}
BUDGETS=4e11,1.2e12,4e12
LARGEST=4e12
VARIANTS=(nsa mosa mosa_causal routing routing_causal moe)
# Batches of 8 sequences of 256 bytes so the smallest budget still takes a few hundred steps; one
# evaluation at the end on 32 validation batches (65K tokens); no checkpoints but the final one.
COMMON=(--set train.batch_size=8 --set train.eval_batches=32 --set train.eval_every=1000000
        --set checkpoint.every_steps=1000000 --set train.log_every=50)

python -m sparse_lm.scaling sweep --budgets "$BUDGETS" --sizes_per_budget 6 --spread 5 \
  --workdir_root "$ROOT/dense" "${COMMON[@]}" --run
# The two smaller budgets' best runs were their smallest sizes: centring them on 400 tokens per
# parameter instead of 20 adds the next smaller shape (1 layer, d_model 16) below them.
python -m sparse_lm.scaling sweep --budgets 4e11,1.2e12 --sizes_per_budget 6 --spread 5 \
  --tokens_per_param 400 --workdir_root "$ROOT/dense" "${COMMON[@]}" --run
python -m sparse_lm.scaling collect --workdir_root "$ROOT/dense" --out "$OUT/dense_runs.jsonl"
python -m sparse_lm.scaling fit "$OUT/dense_runs.jsonl" --out "$OUT/dense_only" > "$OUT/dense_fit.json"

# The variants take the dense model size that the largest budget's isoFLOP parabola calls optimal
# (approach 3's allocation puts it at a 1-layer model, too small for NSA's branches at equal parameters).
N_OPT=$(python -c "import json; print(json.load(open('$OUT/dense_fit.json'))['approach2']['budgets'][-1]['N_opt'])")
for variant in "${VARIANTS[@]}"; do
  python -m sparse_lm.scaling sweep --variant "$variant" --budgets "$LARGEST" --sizes_per_budget 1 \
    --params "$N_OPT" --workdir_root "$ROOT/variants" "${COMMON[@]}" --run
done
python -m sparse_lm.scaling collect --workdir_root "$ROOT/variants" --out "$OUT/variant_runs.jsonl"
# The variants' dense twin (same shape and budget) again at training seeds 1 and 2: one run's noise.
: > "$OUT/dense_twin_seeds.jsonl"
for seed in 1 2; do
  python -m sparse_lm.scaling sweep --budgets "$LARGEST" --sizes_per_budget 1 --params "$N_OPT" \
    --workdir_root "$ROOT/seed$seed" "${COMMON[@]}" --set train.seed=$seed --run
  python -m sparse_lm.scaling collect --workdir_root "$ROOT/seed$seed" --out "$ROOT/seed$seed.jsonl"
  cat "$ROOT/seed$seed.jsonl" >> "$OUT/dense_twin_seeds.jsonl"
done
cat "$OUT/dense_runs.jsonl" "$OUT/variant_runs.jsonl" > "$OUT/runs.jsonl"
python -m sparse_lm.scaling fit "$OUT/runs.jsonl" --out "$OUT" > "$OUT/fit.json"

# The causality leak of every variant run and of the dense run of the same shape and budget (its
# "twin", which must read 0), then the tables.
: > "$OUT/leaks.jsonl"
declare -A twins=()
for workdir in "$ROOT"/variants/*/; do
  name=$(basename "$workdir")
  twins["$ROOT/dense/dense_C${name#*_C}"]=1
  python -m sparse_lm.evaluate --workdir="$workdir" --task=causality | tail -1 >> "$OUT/leaks.jsonl"
done
for workdir in "${!twins[@]}"; do
  python -m sparse_lm.evaluate --workdir="$workdir" --task=causality | tail -1 >> "$OUT/leaks.jsonl"
done
python results/cpu_study/summarize.py --dir="$OUT" > "$OUT/tables.md"
