#!/usr/bin/env bash
# One device call on a machine of several GPUs (nvidia-h200-x2, -x4 or -x8), carrying .whl:
#   run(command="bash benchmarks/run_gpu_cp_multi.sh", kind="nvidia-h200-x8", carry=[".whl"])
# Installs the carried megatron-core wheel, runs the GPU tests briefly, then the context-parallel
# benchmark (benchmarks/cp.py) under torchrun for N = 2, 4, 8 up to the GPU count, NCCL with NVLink
# multicast off; per N a JSON and a log under $OUT (7 files: the limit is 8).
# The call may run 600 s: each torchrun gets a weighted share (N=2: 4, N=4: 2, N=8: 2) of what is
# left of BUDGET_S. benchmarks/cp.py rewrites its JSON after every length, so a run cut short
# still returns the lengths it finished ("complete": false).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DSV_COMMIT=${DSV_COMMIT:-unknown} NCCL_NVLS_ENABLE=0
NGPU=$(python3 -c "import torch; print(torch.cuda.device_count())")
SEQLENS=${SEQLENS:-65536,131072,262144}
BUDGET=${BUDGET_S:-570}
echo "GPUs: $NGPU ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1)); seqlens $SEQLENS"
timeout ${GPU_TESTS_S:-90} python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -3 | tee $OUT/gpu_tests.txt

declare -A WEIGHT=([2]=4 [4]=2 [8]=2)
NS=()
for N in 2 4 8; do [ "$N" -le "$NGPU" ] && NS+=("$N"); done
for i in "${!NS[@]}"; do
  N=${NS[$i]}
  rest=0
  for M in "${NS[@]:$i}"; do rest=$((rest + WEIGHT[$M])); done
  share=$(( (BUDGET - SECONDS) * WEIGHT[$N] / rest ))
  if [ "$share" -lt 60 ]; then echo "cp N=$N skipped: ${share}s left"; continue; fi
  timeout --kill-after=15 "$share" python3 -m torch.distributed.run --standalone --nproc-per-node "$N" \
    benchmarks/cp.py --seqlens "$SEQLENS" --out "$OUT/cp_${N}gpu.json" > "$OUT/cp_${N}gpu.log" 2>&1
  echo "cp N=$N rc=$? (limit ${share}s, at ${SECONDS}s)"
  grep -v -i -E "warn|^\s*$" "$OUT/cp_${N}gpu.log" | tail -28
done
