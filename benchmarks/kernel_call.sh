# Steps shared by the one-H200 kernel calls (run_gpu_kernel_defaults.sh, run_gpu_ncu.sh,
# run_gpu_small_blocks.sh, run_gpu_tma_sweep.sh); sourced, with OUT and START set by the caller.

gpu_versions() {  # the GPU, its clocks, torch and triton into $OUT/gpu.txt (and the log)
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUT/gpu.txt"
}

kernel_tests() {  # seconds [test files]: pytest on CUDA into $OUT/tests.log (default: the two kernel
  # test files); 0 seconds skips it
  local limit=$1
  shift
  [ "$limit" = 0 ] && return 0
  [ $# -gt 0 ] || set -- tests/ops/test_sparse_attention_triton.py tests/ops/test_causal_triton.py
  timeout --kill-after=10 "$limit" python3 -m pytest -q -p no:cacheprovider "$@" > "$OUT/tests.log" 2>&1
  echo "tests rc=$? after $((SECONDS - START)) s"
  tail -15 "$OUT/tests.log"
}
