#!/usr/bin/env bash
# One nvidia-h200-x2 call, two independent lanes (stage the clone first: bash benchmarks/stage_clone.sh):
#   run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_causal_speed_x2.sh", kind="nvidia-h200-x2",
#       carry=[".whl", ".stage_clone"], timeout_s=600)
# GPU 0: issue 19's pretrain_gpt.py pair on the patched Megatron-LM clone (run_gpu_causal_gpt.sh,
#        its default data).
# GPU 1, in order, each under a timeout and all by LANE1_S (530 s):
#   1. the GPU tests (-m gpu) and the CPU-marked kernel tests that run on CUDA when it is there
#      (masked kernels, masked Triton selection, the Jacobi eigensolver);
#   2. benchmarks/profile_cost.py under the token-causal and the chunk-causal mask (issue 19: the
#      masked predictor statistics, batched over prefix segments since a1ebf72, on a GPU);
#   3. benchmarks/learned_speed.py (issue 14 item 4) with the per-head K of each arms JSON in
#      LEARNED_ARMS (default: quality round 4, procedural then natural).
# $OUT: causal/{causal_gpt.json, dsv_stats_auto.jsonl, logs.tar.gz}, profile_cost_{causal,chunk}.json,
# learned_speed_<n>.json (one per arms file), logs.tar.gz -- at most 8 files come back.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${OUT:-$(mktemp -d /tmp/causal_speed.XXXX)}
LOGS=$(mktemp -d /tmp/causal_speed_logs.XXXX)
MAIN=$PWD LANE1_S=${LANE1_S:-530}
LEARNED_ARMS=${LEARNED_ARMS:-benchmarks/results/quality_h200_20261130_r4_procedural_arms.json benchmarks/results/quality_h200_20261130_r4_natural_arms.json}
mkdir -p "$ROOT/causal"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
step() {  # NAME CAP CMD...: CMD under min(CAP, time left in lane 1)
  local name=$1 cap=$2 left=$((LANE1_S - SECONDS))
  shift 2
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 20 ]; then echo "== $name skipped (${cap}s left)"; return; fi
  local t0=$SECONDS
  timeout --kill-after=10 "$cap" "$@" > "$LOGS/$name.log" 2>&1
  echo "== $name rc=$? in $((SECONDS - t0)) s (limit $cap)"; grep -v -i warn "$LOGS/$name.log" | tail -${TAIL:-8}
}
(
  export CUDA_VISIBLE_DEVICES=0 OUT=$ROOT/causal
  bash benchmarks/run_gpu_causal_gpt.sh
) > "$LOGS/causal_lane.txt" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1 PYTHONPATH=/tmp/site:$MAIN PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
  TAIL=14 step gpu_tests 170 python3 -m pytest -q -p no:cacheprovider tests/gpu tests/ops/test_causal_triton.py \
    tests/ops/test_selection_triton_masked.py tests/ops/test_eigh_triton.py
  step profile_causal 50 python3 benchmarks/profile_cost.py --shapes 8x16384x64,16x16384x128 --mask causal \
    --out "$ROOT/profile_cost_causal.json"
  step profile_chunk 50 python3 benchmarks/profile_cost.py --shapes 8x16384x64,16x16384x128 --mask chunk_causal:2048 \
    --out "$ROOT/profile_cost_chunk.json"
  n=0
  for arms in $LEARNED_ARMS; do
    n=$((n + 1))
    TAIL=12 step "learned_speed_$n" 120 python3 benchmarks/learned_speed.py --arms "$arms" \
      --out "$ROOT/learned_speed_$n.json"
  done
) > "$LOGS/lane1.txt" 2>&1 &
wait
cat "$LOGS/lane1.txt" "$LOGS/causal_lane.txt"
(cd "$ROOT/causal" && tar czf logs.tar.gz --remove-files *.log *.txt 2>/dev/null)
tar czf "$ROOT/logs.tar.gz" -C "$LOGS" .
ls -R "$ROOT"
