#!/usr/bin/env bash
# GPU checks that need one GPU and no Megatron-LM clone (carry .whl), in order, each under a timeout and
# all by LANE_S seconds (default 530):
#   1. benchmarks/learned_speed.py (issue 14 item 4) with the per-head K of each arms JSON in
#      LEARNED_ARMS (default: quality round 4, procedural then natural);
#   2. the GPU tests (-m gpu) and the CPU-marked kernel tests that run on CUDA when it is there
#      (sparse attention incl. the tma default, masked kernels, masked Triton selection, Jacobi);
#   3. benchmarks/profile_cost.py under the token-causal mask (issue 19: the masked predictor
#      statistics batched over prefix segments since a1ebf72), then the chunk-causal one.
# Alone: run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_speed_checks.sh", kind="nvidia-h200",
#   carry=[".whl"]) (ran so at f46bdfb; an x2 call pairing it with the causal GPT run was refused).
# Writes $OUT/learned_speed_<n>.json, profile_cost_{causal,chunk}.json, speed_checks_logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/speed_checks.XXXX)}
LOGS=$(mktemp -d /tmp/speed_checks_logs.XXXX)
LANE_S=${LANE_S:-530} T0=$SECONDS
LEARNED_ARMS=${LEARNED_ARMS:-benchmarks/results/quality_h200_20261130_r4_procedural_arms.json benchmarks/results/quality_h200_20261130_r4_natural_arms.json}
[ -d /tmp/site/megatron ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
step() {  # NAME CAP CMD...: CMD under min(CAP, time left)
  local name=$1 cap=$2 left=$((LANE_S - (SECONDS - T0)))
  shift 2
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 20 ]; then echo "== $name skipped (${cap}s left)"; return; fi
  local t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@" > "$LOGS/$name.log" 2>&1
  echo "== $name rc=$? in $((SECONDS - t0)) s (limit $cap)"; grep -v -i warn "$LOGS/$name.log" | tail -${TAIL:-8}
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
n=0
for arms in $LEARNED_ARMS; do
  n=$((n + 1))
  TAIL=12 step "learned_speed_$n" ${LEARNED_S:-110} python3 benchmarks/learned_speed.py --arms "$arms" \
    --out "$OUT/learned_speed_$n.json"
done
TAIL=14 step gpu_tests ${TESTS_S:-150} python3 -m pytest -q -p no:cacheprovider tests/gpu tests/ops/test_sparse_attention_triton.py \
  tests/ops/test_causal_triton.py tests/ops/test_selection_triton_masked.py tests/ops/test_eigh_triton.py
step profile_causal 50 python3 benchmarks/profile_cost.py --shapes 8x16384x64,16x16384x128 --mask causal \
  --out "$OUT/profile_cost_causal.json"
step profile_chunk 50 python3 benchmarks/profile_cost.py --shapes 8x16384x64,16x16384x128 --mask chunk_causal:2048 \
  --out "$OUT/profile_cost_chunk.json"
tar czf "$OUT/speed_checks_logs.tar.gz" -C "$LOGS" .
