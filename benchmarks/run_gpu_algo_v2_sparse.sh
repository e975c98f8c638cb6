#!/usr/bin/env bash
# One call on nvidia-h200-x2 for issue 13's remaining evidence (and what fits beside it), carrying .whl:
#   run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_algo_v2_sparse.sh", kind="nvidia-h200-x2", carry=[".whl"])
# GPU 1: the pretraining example of run_gpu_algo_v2.sh (small DiT, 16k tokens, 4x4x4 groups, seed
#        1234) in --dsv-mode auto with --dsv-min-sparsity 0.5, so the measured speed probe
#        (--dsv-speed-table measure, the default) decides whether a layer goes sparse; Megatron
#        stops it after EXIT_MIN (7) minutes. Its dense twin ran at ee52a79
#        (algo_v2_h200_20261130_qg64*): same seed, data and flags but the mode. The step time
#        before and after layers go sparse, inside this run, is the comparison that matters (at
#        f8d3904 going sparse made the step 9% slower; two host syncs per sparse forward were
#        removed since).
# GPU 0, in order, each under a timeout and all by LANE0_S (530 s):
#   1. the GPU tests (-m gpu: no-sync, refit, kernels) and the CPU-marked kernel tests that run on
#      CUDA when it is there (masked kernels, masked Triton selection, the Jacobi eigensolver)
#   2. benchmarks/overhead.py at 16k, 32k and 64k (stage-1 / stage-2 overhead, refit on the GPU),
#      the profiling steps at profile strides 32 and 64, stage-1 overhead every 10 and 20 iterations
#   3. benchmarks/causal_attention.py (issue 19: masked kernels and the Triton masked selection)
# (At f8d3904 lane 0 ran the GPU-refit branch from a carried .gpurefit checkout, profile_cost.py and
# an attention.py granularity sweep: the results named in the README.)
# $OUT: algo_v2.{json,png}, dsv_stats_auto.jsonl, overhead.json, causal_attention.json, logs.tar.gz.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/algo_sparse.XXXX)}
LOGS=$(mktemp -d /tmp/algo_sparse_logs.XXXX)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
MAIN=$PWD LANE0_S=${LANE0_S:-530}
ITERS=1500 QG=4x4x4
source "$(dirname "$0")/algo_v2_flags.sh"  # COMMON: the flags of its dense twin (run_gpu_algo_v2.sh), so the pair differs only in the mode
step() {  # NAME CAP DIR CMD...: CMD in DIR under min(CAP, time left in lane 0)
  local name=$1 cap=$2 dir=$3 left=$((LANE0_S - SECONDS))
  shift 3
  [ "$left" -lt "$cap" ] && cap=$left
  if [ "$cap" -lt 20 ]; then echo "== $name skipped (${cap}s left)"; return; fi
  local t0=$SECONDS
  (cd "$dir" && timeout --kill-after=10 "$cap" "$@") > "$LOGS/$name.log" 2>&1
  echo "== $name rc=$? in $((SECONDS - t0)) s (limit $cap)"; grep -v -i warn "$LOGS/$name.log" | tail -${TAIL:-6}
}
(
  CUDA_VISIBLE_DEVICES=1 timeout 570 torchrun --nproc-per-node 1 --master-port 29518 examples/pretrain_video_dit.py $COMMON \
    --dsv-mode auto --dsv-min-sparsity 0.5 --exit-duration-in-mins ${EXIT_MIN:-7} \
    --dsv-stats-log $OUT/dsv_stats_auto.jsonl > $LOGS/pretrain_auto.log 2>&1
  echo "== pretrain auto rc=$?"
) > $LOGS/lane1.txt 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=0
  TAIL=12 step gpu_tests 200 "$MAIN" python3 -m pytest -q -p no:cacheprovider tests/gpu tests/ops/test_causal_triton.py \
    tests/ops/test_selection_triton_masked.py tests/ops/test_eigh_triton.py
  TAIL=14 step overhead 180 "$MAIN" python3 benchmarks/overhead.py --seqlens 16384,32768,65536 --fit closed_form \
    --strides 32,64 --intervals1 10,20 --out $OUT/overhead.json
  TAIL=12 step causal_bench 150 "$MAIN" python3 benchmarks/causal_attention.py --out $OUT/causal_attention.json
) > $LOGS/lane0.txt 2>&1 &
wait
cat $LOGS/lane0.txt $LOGS/lane1.txt
cp $LOGS/pretrain_auto.log $OUT/pretrain_auto.log 2>/dev/null
grep -E "DSV (stage|layer)" $LOGS/pretrain_auto.log | tail -24
# the report pairs this auto run with the dense twin of ee52a79, whose log travels in the checkout
tar xzf benchmarks/results/algo_v2_h200_20261130_qg64_logs.tar.gz -C $OUT pretrain_dense.log
python3 benchmarks/algo_v2_report.py --dir $OUT --out $OUT/algo_v2 --note "$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1) x 2, auto at commit ${DSV_COMMIT:-unknown} (--dsv-min-sparsity 0.5), dense from ee52a79 (another call)"
rm -f $OUT/pretrain_dense.log $OUT/pretrain_auto.log
tar czf $OUT/logs.tar.gz -C $LOGS .
ls $OUT
