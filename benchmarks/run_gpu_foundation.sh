#!/usr/bin/env bash
# One device call for the foundation issue: install the carried megatron-core wheel, run the
# GPU-marked tests in bf16, time the dense path against cuDNN SDPA. Writes under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export DSV_COMMIT=${DSV_COMMIT:-unknown}
nvidia-smi --query-gpu=name,driver_version --format=csv | tee $OUT/gpu.txt
python3 -m pytest -q -m gpu tests/gpu -p no:cacheprovider --junitxml=$OUT/gpu_tests.xml 2>&1 | tail -25 | tee $OUT/gpu_tests.txt
python3 benchmarks/dense_path.py --out $OUT/dense_path.json 2>&1 | grep -v Warning | tail -12
