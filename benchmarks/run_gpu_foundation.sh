#!/usr/bin/env bash
# One device call for the foundation and training-algorithm issues: install the carried
# megatron-core wheel, run every GPU-marked test in bf16, the quickstart on the GPU, the dense
# path vs cuDNN SDPA, and the predictor/profiler overhead on a layer stack. Writes under $OUT.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
export DSV_COMMIT=${DSV_COMMIT:-unknown}
nvidia-smi --query-gpu=name,driver_version --format=csv | tee $OUT/gpu.txt
python3 -m pytest -q -m gpu tests -p no:cacheprovider --junitxml=$OUT/gpu_tests.xml 2>&1 | tail -8 | tee $OUT/gpu_tests.txt
python3 examples/quickstart.py --device cuda 2>&1 | grep -v -i warn | tail -12 | tee $OUT/quickstart_gpu.txt
python3 benchmarks/dense_path.py --out $OUT/dense_path.json 2>&1 | grep -v -i warn | tail -6
python3 benchmarks/overhead.py ${OVERHEAD_ARGS:-} --out $OUT/overhead.json 2>&1 | grep -v -i warn | tail -6
