#!/usr/bin/env bash
# One nvidia-h200-x2 call, two independent lanes (stage the clone first: bash benchmarks/stage_clone.sh):
#   run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_causal_speed_x2.sh", kind="nvidia-h200-x2",
#       carry=[".whl", ".stage_clone"], timeout_s=600)
# GPU 0: issue 19's pretrain_gpt.py pair on the patched Megatron-LM clone (run_gpu_causal_gpt.sh,
#        its default data).
# GPU 1: benchmarks/run_gpu_speed_checks.sh (learned_speed at round-4 densities, the GPU tests, the
#        masked profile_cost), by LANE1_S (530 s).
# $OUT: causal/{causal_gpt.json, logs.tar.gz (logs, dsv_stats_auto.jsonl, corpus.json)},
# profile_cost_{causal,chunk}.json, learned_speed_<n>.json (one per arms file), speed_checks_logs.tar.gz:
# 7 files with two arms files (a call returns at most 8).
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=${OUT:-$(mktemp -d /tmp/causal_speed.XXXX)}
LOGS=$(mktemp -d /tmp/causal_speed_logs.XXXX)
mkdir -p "$ROOT/causal"
(
  export CUDA_VISIBLE_DEVICES=0 OUT=$ROOT/causal
  bash benchmarks/run_gpu_causal_gpt.sh
) > "$LOGS/causal_lane.txt" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=1 OUT=$ROOT LANE_S=${LANE1_S:-530}
  bash benchmarks/run_gpu_speed_checks.sh
) > "$LOGS/lane1.txt" 2>&1 &
wait
cat "$LOGS/lane1.txt" "$LOGS/causal_lane.txt"
(cd "$ROOT/causal" && tar czf logs.tar.gz --remove-files *.log *.txt *.jsonl jobs.tsv corpus.json 2>/dev/null)
ls -R "$ROOT"
