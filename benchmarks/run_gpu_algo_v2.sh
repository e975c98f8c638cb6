#!/usr/bin/env bash
# One device call for the DSV algorithm v2 (issue 13): the video-DiT pretraining example (small DiT,
# 16k tokens per video, procedural videos), dense then DSV (--dsv-mode auto, closed-form predictor,
# K for recall --dsv-critical-mass 0.9), same seed and data; then benchmarks/algo_v2_report.py.
# Needs .whl/megatron_core-0.19.2*.whl.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ITERS=${ITERS:-700}
COMMON="--dit-config small --latent-shape 4x16x64x64 --dsv-query-group 2x4x4 --dsv-kv-block 64
  --micro-batch-size 1 --global-batch-size 4 --train-iters $ITERS --lr 3e-4 --min-lr 3e-5
  --lr-decay-style cosine --lr-warmup-iters 50 --weight-decay 0.0 --clip-grad 1.0 --bf16
  --eval-interval 100 --eval-iters 8 --log-interval 10 --seed 1234 --num-workers 2
  --dsv-switch-min-iters 200 --dsv-switch-max-iters 600 --dsv-profile-interval-stage1 10
  --dsv-profile-interval-stage2 50 --dsv-min-dwell 100"
for mode in ${MODES:-dense auto}; do
  timeout ${RUN_TIMEOUT:-270} torchrun --nproc-per-node 1 --master-port 29517 examples/pretrain_video_dit.py $COMMON \
      --dsv-mode $mode --dsv-stats-log $OUT/dsv_stats_$mode.jsonl ${EXTRA:-} > $OUT/pretrain_$mode.log 2>&1
  echo "mode $mode rc=$?"
  grep -E "DSV (stage|layer)" $OUT/pretrain_$mode.log | tail -12
  grep -E "Error|error" $OUT/pretrain_$mode.log | grep -v -i warn | head -5
done
python3 benchmarks/algo_v2_report.py --dir $OUT --out $OUT/algo_v2 --note "$(nvidia-smi --query-gpu=name --format=csv,noheader), commit ${DSV_COMMIT:-unknown}"
