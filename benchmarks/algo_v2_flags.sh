# The pretraining example's flags for issue 13's runs (small DiT, 16k tokens, seed 1234), sourced by
# run_gpu_algo_v2.sh and run_gpu_algo_v2_sparse.sh so that paired dense / DSV runs share every flag but
# --dsv-mode. Needs ITERS; QG defaults to 4x4x4.
COMMON="--dit-config small --latent-shape 4x16x64x64 --dsv-query-group ${QG:-4x4x4} --dsv-kv-block 64
  --micro-batch-size 1 --global-batch-size 4 --train-iters $ITERS --lr 3e-4 --min-lr 3e-5
  --lr-decay-style cosine --lr-warmup-iters 50 --weight-decay 0.0 --clip-grad 1.0 --bf16
  --eval-interval 100 --eval-iters 8 --log-interval 10 --seed 1234 --num-workers 2
  --dsv-switch-min-iters 200 --dsv-switch-max-iters 600 --dsv-profile-interval-stage1 10
  --dsv-profile-interval-stage2 50 --dsv-min-dwell 100"
