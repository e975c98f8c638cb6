#!/usr/bin/env bash
# Video-DiT pretraining with DSV and context parallelism over the GPUs of one node: one 128k-token
# video (latent 4x32x128x128, patch 1x2x2 -> 32x64x64 tokens), embedded procedural data.
# Every CP rank loads the same video and draws the same t and noise; rank r computes tokens
# r*S/N .. (r+1)*S/N (whole 4x4x4 query-group cubes and 64-token key blocks, so N may be any power
# of two up to 2048) and the loss on them. --dsv-cp-split auto starts every layer head-parallel and
# lets the planner re-plan the head x sequence split per layer from measured sparsity; the plan of
# each layer is printed at start and on every change.
#   NGPUS=8 examples/scripts/pretrain_cp.sh            (default: every visible GPU)
# Extra arguments are passed through (e.g. --save/--load, --dsv-cp-split 4x2, --latent-shape).
# On a Megatron-LM clone patched with patches/apply.py, put the clone first on the path
# (PYTHONPATH=/path/to/Megatron-LM bash ...): the patches then drive DSV; the example wraps nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
NGPUS=${NGPUS:-$(nvidia-smi -L | wc -l)}
export CUDA_DEVICE_MAX_CONNECTIONS=1  # Megatron requires it for CP on GPUs before Blackwell
torchrun --standalone --nproc-per-node "$NGPUS" examples/pretrain_video_dit.py \
    --context-parallel-size "$NGPUS" --dsv-cp-split auto \
    --dit-config small --latent-shape 4x32x128x128 --dsv-query-group 4x4x4 --dsv-kv-block 64 \
    --micro-batch-size 1 --global-batch-size 4 --train-iters 1000 --lr 2e-4 --min-lr 2e-5 \
    --lr-decay-style cosine --lr-warmup-iters 50 --weight-decay 0.0 --clip-grad 1.0 --bf16 \
    --eval-interval 100 --eval-iters 16 --log-interval 10 --seed 1234 \
    --dsv-mode auto --dsv-switch-min-iters 200 --dsv-switch-max-iters 600 "$@"
