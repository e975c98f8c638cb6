#!/usr/bin/env bash
# Final device call: every GPU-marked test (bf16) on the committed code, then the kernel profile
# trace and the tuned kernel benchmark (writes JSON under $OUT).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl 2>/dev/null || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DSV_GIT_COMMIT=${DSV_COMMIT:-unknown} DSV_COMMIT=${DSV_COMMIT:-unknown}
python3 -m pytest -q -m gpu tests -p no:cacheprovider --junitxml=$OUT/gpu_tests.xml 2>&1 | tail -3 | tee $OUT/gpu_tests.txt
python3 benchmarks/attention.py --profile-trace --seqlens 65536 --head-dims 128 --sparsities 0.9 --kv-blocks 64 \
    --warmup 10 --rep 30 --out $OUT/profile_h100_20261124_pass4.json > $OUT/profile.log 2>&1; tail -25 $OUT/profile.log
python3 benchmarks/attention.py --seqlens 65536 --head-dims 128,64 --sparsities 0.9,0.95,0.98 --kv-blocks 64 --tune \
    --warmup 10 --rep 30 --out $OUT/attention_h100_20261124_pass4.json > $OUT/bench.log 2>&1; tail -14 $OUT/bench.log
