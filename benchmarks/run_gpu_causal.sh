#!/usr/bin/env bash
# One call on nvidia-h200 for issue 19's GPU evidence of the masked kernels (needs no carried wheel:
# ops/ and the benchmark import only torch and triton):
#   run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_causal.sh", kind="nvidia-h200")
# (1) the masked-kernel tests on the GPU: tests/ops/test_causal_triton.py (causal and chunk-causal
#     vs masked dense attention, the bf16 GPU cases included), <= 150 s;
# (2) benchmarks/causal_attention.py at S=64k, H=16, D=128, bf16, chunks of 8192 tokens, groups and
#     key blocks of 64: every index checked against the fp32 reference first, then cuDNN causal
#     dense (is_causal), the layer's dense SDPA with the chunk-causal mask, FlexAttention's
#     chunk-causal block mask, our kernel over every allowed block and at 90% / 10% of them,
#     <= 360 s (the JSON is rewritten after every row, so a cut leaves the rows so far).
# Whole call: about 8.5 minutes at most. $OUT gets gpu.txt, causal_tests.{txt,xml}, bench.log and
# causal_attention.json.
# CPU_SMOKE=1: the same steps at tiny sizes under the Triton interpreter (plumbing only; the GPU
# tests are collected and skipped, the times mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/causal.XXXX)}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 DSV_COMMIT=${DSV_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
if [ "${CPU_SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  TESTS=(-m gpu)
  BENCH=(--device cpu --dtype fp32 --seqlen 512 --heads 2 --head-dim 32 --chunk-tokens 128 --group-size 32
         --kv-block 32 --check-seqlen 256 --check-groups 2)
  echo "cpu (CPU_SMOKE)" > "$OUT/gpu.txt"
else
  TESTS=()
  BENCH=()
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv > "$OUT/gpu.txt" 2>&1
fi
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'commit', '$DSV_COMMIT')" \
  >> "$OUT/gpu.txt" 2>&1
cat "$OUT/gpu.txt"
t0=$SECONDS
timeout --kill-after=10 150 python3 -m pytest -q tests/ops/test_causal_triton.py "${TESTS[@]}" -p no:cacheprovider \
  --junitxml="$OUT/causal_tests.xml" > "$OUT/causal_tests.txt" 2>&1
echo "== masked-kernel tests rc=$? in $((SECONDS - t0)) s"; tail -6 "$OUT/causal_tests.txt"
t0=$SECONDS
timeout --kill-after=10 360 python3 benchmarks/causal_attention.py --out "$OUT/causal_attention.json" "${BENCH[@]}" \
  > "$OUT/bench.log" 2>&1
echo "== causal_attention rc=$? in $((SECONDS - t0)) s"; grep -v -i warn "$OUT/bench.log" | tail -8
ls "$OUT"
