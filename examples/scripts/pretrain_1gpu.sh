#!/usr/bin/env bash
# Small video-DiT pretraining with DSV on one GPU, embedded procedural data (minutes on an H100).
# Extra arguments are passed through (e.g. --save/--load, --tensorboard-dir, --dsv-* flags).
# On a Megatron-LM clone patched with patches/apply.py, put the clone first on the path
# (PYTHONPATH=/path/to/Megatron-LM bash ...): the patches then drive DSV; the example wraps nothing.
set -euo pipefail
cd "$(dirname "$0")/../.."
torchrun --nproc-per-node 1 examples/pretrain_video_dit.py \
    --dit-config small --latent-shape 4x16x64x64 --dsv-query-group 4x4x4 --dsv-kv-block 64 \
    --micro-batch-size 2 --global-batch-size 2 --train-iters 1000 --lr 2e-4 --min-lr 2e-5 \
    --lr-decay-style cosine --lr-warmup-iters 50 --weight-decay 0.0 --clip-grad 1.0 --bf16 \
    --eval-interval 100 --eval-iters 32 --log-interval 10 --seed 1234 \
    --dsv-mode auto --dsv-switch-min-iters 200 --dsv-switch-max-iters 600 "$@"
