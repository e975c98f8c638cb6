#!/usr/bin/env bash
# One call on nvidia-h200 for issue 15 item 5 (key blocks of 16 and 32 at block-64 speed):
#   run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_small_blocks.sh", kind="nvidia-h200", timeout_s=600)
# 1. the kernel tests on CUDA (tests/ops/test_sparse_attention_triton.py, test_causal_triton.py:
#    bf16 GPU tests at kv_block 16/32/64, both dk/dv orientations, masked kv_block 32);
# 2. benchmarks/attention.py at H=16, S=64k, D=128, 90% sparse, key blocks 64/32/16 x query groups
#    64/32, then token keys (kv_block 1, issue 15 item 4): selection + forward + backward against
#    cuDNN dense, each checked against the fp32
#    reference first (the table of issue 15 item 5, with this commit's kernels);
# 3. benchmarks/attention.py --sweep --sweep-kernels dkdv at key blocks 32 and 16 (G=64): the dk/dv
#    kernel's variants, KernelOptions.dkdv_transposed off and on next to each other, until the
#    time budget (CALL_LIMIT - elapsed - 30 s) is spent.
# Knobs: TESTS_S (200; 0 skips step 1), BENCH_KVB / BENCH_G (step 2's key blocks and query groups),
# SWEEP_KVB / SWEEP_KERNELS (step 3's key blocks and kernels).
# Sizing, measured at c21a846: tests 149 s (107 tests; at ed498f7 the 111 tests ran past 150 s
# before pytest's summary, hence the 200 s default); step 2, 8 rows with the token-key rows, 54 s;
# step 3 the rest of the call.
# $OUT: gpu.txt, tests.log, attention_h200_<date>_<commit>_small_blocks.json, bench.log,
# attention_sweep_h200_<date>_<commit>_small_blocks.json, sweep.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/small_blocks.XXXX)}
START=$SECONDS CALL_LIMIT=${CALL_LIMIT:-570}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DSV_COMMIT=${DSV_COMMIT:-unknown} DSV_GIT_COMMIT=${DSV_COMMIT:-unknown}
tag="h200_$(date -u +%Y%m%d)_${DSV_COMMIT:0:7}_small_blocks"
# shellcheck source=benchmarks/kernel_call.sh
source benchmarks/kernel_call.sh
gpu_versions
kernel_tests "${TESTS_S:-200}"
budget=$(( CALL_LIMIT - (SECONDS - START) - 200 ))
timeout --kill-after=10 $(( budget + 60 )) python3 benchmarks/attention.py --seqlens 65536 --head-dims 128 \
  --sparsities 0.9 --kv-blocks ${BENCH_KVB:-64,32,16,1} --group-sizes ${BENCH_G:-64,32} --no-cudnn-block-sparse --flex-blocks '' \
  --time-budget-s "$budget" --out "$OUT/attention_$tag.json" > "$OUT/bench.log" 2>&1
echo "bench rc=$? after $((SECONDS - START)) s"
grep -v -i warn "$OUT/bench.log" | tail -30
budget=$(( CALL_LIMIT - (SECONDS - START) - 30 ))
echo "sweep: time budget ${budget} s"
timeout --kill-after=10 $(( budget + 20 )) python3 benchmarks/attention.py --sweep --sweep-kernels ${SWEEP_KERNELS:-dkdv} \
  --seqlens 65536 --head-dims 128 --sparsities 0.9 --kv-blocks ${SWEEP_KVB:-32,16} --group-sizes 64 --no-check \
  --time-budget-s "$budget" --out "$OUT/attention_sweep_$tag.json" > "$OUT/sweep.log" 2>&1
echo "sweep rc=$? after $((SECONDS - START)) s"
grep -v -i warn "$OUT/sweep.log" | tail -40
