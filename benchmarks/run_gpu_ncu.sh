#!/usr/bin/env bash
# One call on nvidia-h200 for issue 15 item 2 ("if a target is out of reach, the profile that shows what
# limits it"): Nsight Compute on our kernels at the row the D=128 targets miss (H=16, S=64k, D=128, 90%
# sparse, 64-query groups x 64-key blocks), next to cuDNN dense on the same inputs, then the selection
# variants at key blocks of 16 (issue 15 item 5; at 733493e the resident one at 16 x 4096 scores ran out of
# shared memory, 263168 of 232448 bytes, and KernelOptions now refuses that setting).
#   run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_ncu.sh", kind="nvidia-h200", timeout_s=600)
# 1. benchmarks/attention.py --profile-once --profile-dense under ncu (--clock-control none, as the
#    device method says; --set full: every section, each kernel replayed ~40 times); the report is
#    exported as CSV (details page: speed of light, memory, occupancy, launch, warp states, source
#    counters) and the raw .ncu-rep is kept when it fits.
# 2. the same run without ncu writes each compiled kernel's registers, spills and shared memory.
# 3. benchmarks/attention.py --sweep --sweep-kernels '' at kv_block 16, G=64: the three selection
#    variants at 80/90/95% (plus the correctness check and the index transpose).
# Knobs: SHAPE (the attention.py shape flags), NCU_SET (full), NCU_KERNELS (the kernel-name regex).
# $OUT: gpu.txt, ncu.log, ncu_details.csv, ncu.ncu-rep.gz, kernel_resources_h200_<date>_<commit>.json,
# attention_sweep_h200_<date>_<commit>_select_kb16.json, sweep.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/ncu.XXXX)}
START=$SECONDS
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DSV_COMMIT=${DSV_COMMIT:-unknown} DSV_GIT_COMMIT=${DSV_COMMIT:-unknown}
tag="h200_$(date -u +%Y%m%d)_${DSV_COMMIT:0:7}"
SHAPE=${SHAPE:---seqlens 65536 --head-dims 128 --sparsities 0.9 --kv-blocks 64 --group-sizes 64}
NCU=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
# shellcheck source=benchmarks/kernel_call.sh
source benchmarks/kernel_call.sh
gpu_versions
echo "ncu: ${NCU:-none} $($NCU --version 2>/dev/null | tail -1)" | tee -a "$OUT/gpu.txt"
# shellcheck disable=SC2086
timeout --kill-after=10 300 "$NCU" --clock-control none --set "${NCU_SET:-full}" --target-processes all \
  --kernel-name "regex:${NCU_KERNELS:-_fwd_kernel|_bwd_|_select_kernel|_pool_kernel|_minmax_kernel|_count_kernel|_write_kernel|sdpa|cudnn}" --launch-count 24 \
  -f -o "$OUT/ncu" python3 benchmarks/attention.py --profile-once --profile-dense $SHAPE > "$OUT/ncu.log" 2>&1
echo "ncu rc=$? after $((SECONDS - START)) s"; grep -v "^==PROF==" "$OUT/ncu.log" | tail -5; grep -c "^==PROF== Profiling" "$OUT/ncu.log"
"$NCU" --import "$OUT/ncu.ncu-rep" --page details --csv > "$OUT/ncu_details.csv" 2>> "$OUT/ncu.log"
echo "details: $(wc -l < "$OUT/ncu_details.csv") lines"
gzip -f "$OUT/ncu.ncu-rep"; ls -la "$OUT/ncu.ncu-rep.gz"
# shellcheck disable=SC2086
timeout --kill-after=10 120 python3 benchmarks/attention.py --profile-once $SHAPE \
  --out "$OUT/kernel_resources_$tag.json" > "$OUT/resources.log" 2>&1
echo "resources rc=$? after $((SECONDS - START)) s"; grep -v -i warn "$OUT/resources.log" | tail -20
budget=$(( ${CALL_LIMIT:-570} - (SECONDS - START) - 30 ))
timeout --kill-after=10 $(( budget + 20 )) python3 benchmarks/attention.py --sweep --sweep-kernels '' \
  --seqlens 65536 --head-dims 128 --sparsities 0.9,0.8,0.95 --kv-blocks 16 --group-sizes 64 \
  --time-budget-s "$budget" --out "$OUT/attention_sweep_${tag}_select_kb16.json" > "$OUT/sweep.log" 2>&1
echo "sweep rc=$? after $((SECONDS - START)) s"
grep -v -i warn "$OUT/sweep.log" | tail -20
