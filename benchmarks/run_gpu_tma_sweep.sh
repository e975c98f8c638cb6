#!/usr/bin/env bash
# One call on nvidia-h200 for issue 15's kernel variants (KernelOptions.tma and tiles):
#   run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_tma_sweep.sh", kind="nvidia-h200", timeout_s=600)
# 1. the kernel tests on CUDA (bf16 GPU tests and the CPU-marked ones, each over the pointer / tma
#    variants named: tma=False, tma=True; at 487e6f3 a warp-specialised variant also ran, in the
#    sweep only: it failed to compile on every kernel but the 8-warp forward, and was dropped);
# 2. benchmarks/attention.py --sweep at H=16, S=64k, 90% sparse, 64-query groups x 64-key blocks,
#    D=128 then D=64: every SWEEP variant (round-robin over fwd / dq / dk/dv, so each kernel's
#    default and its tma twin come first), after an fp32-reference check of the default and of tma.
#    It stops starting variants when its time budget is spent (CALL_LIMIT - elapsed - 40 s).
# Knobs: TESTS_S (150; 0 skips step 1), HEAD_DIMS (128,64), SWEEP_KERNELS (fwd,dq,dkdv,fused),
# SWEEP_PICK (attention.py --sweep-pick: entries by index, e.g. 'fwd=1,12;dq=1,11'), CHECK_VARIANTS=1
# (check every variant against the fp32 reference before timing it).
# Pipeline depth (issue 15, after the 733493e profile):
#   TESTS_S=0 HEAD_DIMS=128,64 CHECK_VARIANTS=1 SWEEP_KERNELS=fwd,dq,dkdv \
#     SWEEP_PICK='fwd=1,12,13,14;dq=1,6,11,12;dkdv=1,14,15' bash benchmarks/run_gpu_tma_sweep.sh
# $OUT: gpu.txt, tests.log, attention_sweep_h200_<date>_<commit>.json, sweep.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/tma_sweep.XXXX)}
START=$SECONDS CALL_LIMIT=${CALL_LIMIT:-560}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DSV_COMMIT=${DSV_COMMIT:-unknown} DSV_GIT_COMMIT=${DSV_COMMIT:-unknown}
# shellcheck source=benchmarks/kernel_call.sh
source benchmarks/kernel_call.sh
gpu_versions
kernel_tests "${TESTS_S:-150}"
budget=$(( CALL_LIMIT - (SECONDS - START) - 40 ))
json="$OUT/attention_sweep_h200_$(date -u +%Y%m%d)_${DSV_COMMIT:0:7}.json"
echo "sweep: time budget ${budget} s"
extra=(--sweep-kernels "${SWEEP_KERNELS:-fwd,dq,dkdv,fused}" --sweep-pick "${SWEEP_PICK:-}")
[ "${CHECK_VARIANTS:-0}" = 1 ] && extra+=(--check-variants)
timeout --kill-after=10 $(( budget + 25 )) python3 benchmarks/attention.py --sweep --seqlens 65536 --head-dims "${HEAD_DIMS:-128,64}" \
  --sparsities 0.9 --kv-blocks 64 --group-sizes 64 "${extra[@]}" --time-budget-s "$budget" --out "$json" > "$OUT/sweep.log" 2>&1
echo "sweep rc=$? after $((SECONDS - START)) s"
grep -v -i warn "$OUT/sweep.log" | tail -70
