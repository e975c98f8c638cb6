#!/usr/bin/env bash
# One device call: the video-DiT pretraining example, dense baseline then DSV, same seed and data,
# small model at 16k tokens per video. Logs, DSV statistics and plots go under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
ITERS=${ITERS:-1000}
COMMON="--dit-config small --latent-shape 4x16x64x64 --dsv-query-group 2x4x4 --dsv-kv-block 64
  --micro-batch-size 1 --global-batch-size 4 --train-iters $ITERS --lr 3e-4 --min-lr 3e-5
  --lr-decay-style cosine --lr-warmup-iters 50 --weight-decay 0.0 --clip-grad 1.0 --bf16
  --eval-interval 100 --eval-iters 8 --log-interval 50 --seed 1234 --num-workers 2
  --dsv-switch-min-iters 200 --dsv-switch-max-iters 600 --dsv-profile-interval-stage1 10
  --dsv-profile-interval-stage2 50"
for mode in ${MODES:-dense auto}; do
  timeout ${RUN_TIMEOUT:-250} torchrun --nproc-per-node 1 --master-port 29517 examples/pretrain_video_dit.py $COMMON \
      --dsv-mode $mode --dsv-stats-log $OUT/dsv_stats_$mode.jsonl ${EXTRA:-} > $OUT/pretrain_$mode.log 2>&1
  echo "mode $mode rc=$?"
  grep -E "validation loss at iteration|DSV (stage|layer|it [0-9]+ stage)|elapsed time per iteration" $OUT/pretrain_$mode.log | tail -8
  grep -E "Error|error" $OUT/pretrain_$mode.log | grep -v -i warn | head -5
done
