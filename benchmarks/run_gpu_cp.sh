#!/usr/bin/env bash
# One device call: GPU tests (bf16, incl. the predictor's own clipping group), the Triton kernel
# tests on CUDA (incl. the ring's split-key-set merge), then the dense ring step benchmark.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DSV_COMMIT=${DSV_COMMIT:-unknown}
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -4 | tee $OUT/gpu_tests.txt
python3 -m pytest -q tests/ops/test_sparse_attention_triton.py tests/ops/test_selection_triton.py -p no:cacheprovider 2>&1 | tail -3 | tee -a $OUT/gpu_tests.txt
python3 benchmarks/cp_chunk.py --out $OUT/cp_chunk_h100.json > $OUT/cp_chunk.log 2>&1; echo "cp_chunk rc=$?"; tail -60 $OUT/cp_chunk.log
