#!/usr/bin/env bash
# One nvidia-h200-x2 call, two independent lanes (stage the clone first: bash benchmarks/stage_clone.sh):
#   run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_quality_causal_x2.sh", kind="nvidia-h200-x2",
#       carry=[".whl", ".stage_clone"], timeout_s=600)
# GPU 0: the quality protocol's round 3 on the procedural source alone (PHASE=fitted DATA=procedural
#        of run_gpu_quality.sh: dense checkpoint with the predictor fitted, then 4 arms x 3 seeds);
# GPU 1: issue 19's pretrain_gpt.py pair on the patched Megatron-LM clone (run_gpu_causal_gpt.sh).
# Each lane writes its own folder, so neither archives the other's logs; at the end the causal
# lane's logs are packed into one archive so that $OUT stays within the 8 files a call returns:
# $OUT/quality/{quality.md, quality.png, quality_procedural_arms.json, logs.tar.gz} and
# $OUT/causal/{causal_gpt.json, dsv_stats_auto.jsonl, logs.tar.gz}.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${OUT:-$(mktemp -d /tmp/quality_causal.XXXX)}
mkdir -p "$ROOT/quality" "$ROOT/causal"
(
  export CUDA_VISIBLE_DEVICES=0 OUT=$ROOT/quality PHASE=fitted DATA=procedural
  ITERS=1500 MINUTES=3.8 ARM_MINUTES=4.8 bash benchmarks/run_gpu_quality.sh
) > "$ROOT/quality_lane.txt" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1 OUT=$ROOT/causal
  bash benchmarks/run_gpu_causal_gpt.sh
) > "$ROOT/causal_lane.txt" 2>&1 &
wait
cat "$ROOT/quality_lane.txt" "$ROOT/causal_lane.txt"
mv "$ROOT/quality_lane.txt" "$ROOT/causal_lane.txt" "$ROOT/causal/"
(cd "$ROOT/causal" && tar czf logs.tar.gz --remove-files *.log *.txt jobs.tsv 2>/dev/null)
ls -R "$ROOT"
