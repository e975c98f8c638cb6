#!/usr/bin/env bash
# One device call for the DSV algorithm v2 (issue 13): the video-DiT pretraining example (small DiT,
# 16k tokens per video, procedural videos), dense and DSV (--dsv-mode auto, closed-form predictor,
# K for recall --dsv-critical-mass 0.9), same seed and data; then benchmarks/algo_v2_report.py.
# Needs .whl/megatron_core-0.19.2*.whl.
#   run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_algo_v2.sh", kind="nvidia-h200-x2", carry=[".whl"])
# With two GPUs the two runs go side by side (dense on GPU 0, auto on GPU 1), each stopped by
# Megatron's --exit-duration-in-mins EXIT_MIN (7.3: 1500 dense iterations took ~6.2 min at 244 ms in
# the 700-iteration run) so the call ends inside its 600 s; with one GPU they run one after another
# under RUN_TIMEOUT each. Knobs: ITERS (1500), QG (query group, 4x4x4), EXIT_MIN, MODES, EXTRA.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ITERS=${ITERS:-1500}
NGPU=$(nvidia-smi -L | wc -l)
source "$(dirname "$0")/algo_v2_flags.sh"  # COMMON: the run's flags, shared with run_gpu_algo_v2_sparse.sh
launch() {  # MODE GPU PORT [extra args]
  local mode=$1 gpu=$2 port=$3
  shift 3
  CUDA_VISIBLE_DEVICES=$gpu timeout ${RUN_TIMEOUT:-560} torchrun --nproc-per-node 1 --master-port $port \
    examples/pretrain_video_dit.py $COMMON --dsv-mode $mode --dsv-stats-log $OUT/dsv_stats_$mode.jsonl \
    "$@" ${EXTRA:-} > $OUT/pretrain_$mode.log 2>&1
  echo "mode $mode rc=$?"
}
summary() {
  grep -E "DSV (stage|layer)" $OUT/pretrain_$1.log | tail -16
  grep -E "Error|error" $OUT/pretrain_$1.log | grep -v -i warn | head -5
}
if [ "$NGPU" -ge 2 ] && [ -z "${MODES:-}" ]; then
  launch dense 0 29517 --exit-duration-in-mins ${EXIT_MIN:-7.3} &
  launch auto 1 29518 --exit-duration-in-mins ${EXIT_MIN:-7.3} &
  wait
  summary auto
else
  for mode in ${MODES:-dense auto}; do
    RUN_TIMEOUT=${RUN_TIMEOUT:-270} launch $mode 0 29517
    summary $mode
  done
fi
python3 benchmarks/algo_v2_report.py --dir $OUT --out $OUT/algo_v2 --note "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x $NGPU, commit ${DSV_COMMIT:-unknown}, query group ${QG:-4x4x4}"
