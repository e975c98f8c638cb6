#!/usr/bin/env bash
# One device call for the cuDNN block-sparse backend: install the carried cuDNN frontend and CuTe
# DSL packages, run its GPU and CPU tests, then benchmarks/cudnn_block_sparse.py (first-call JIT
# cost, correctness at S=64k, timings vs our Triton kernel and cuDNN dense). Writes under $OUT.
#
# Run from a tree whose megatron_dsv/, tests/ and benchmarks/ hold this branch (SRC, default .), with
# the packages in WHL (default .whl_cudnn) either as wheels or as site.tar.xz, an archive of
# `pip install --no-deps --target` of them (the nvidia-cutlass-dsl-libs-cu13 wheel alone is 92 MB,
# over a call's 64 MiB carry; its files compress to less with xz). pip --target skips the
# package's .pth, so its dsl_packages folder goes on PYTHONPATH by hand.
set -uo pipefail
SRC=${SRC:-.}
WHL=$(realpath "${WHL:-.whl_cudnn}")
SITE=/tmp/site
mkdir -p $SITE
if compgen -G "$WHL/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE "$WHL"/*.whl || exit 1
fi
if [ -f "$WHL/site.tar.xz" ]; then
    tar -C $SITE -xJf "$WHL/site.tar.xz" || exit 1
fi
cd "$SRC" || exit 1
export PYTHONPATH=$PWD:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages PYTHONUNBUFFERED=1 DSV_COMMIT=${DSV_COMMIT:-unknown}
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee $OUT/gpu.txt
python3 -c "import cudnn, cutlass, torch; print('cudnn frontend', cudnn.__version__, 'backend', cudnn.backend_version(), 'torch', torch.__version__)" 2>&1 | tail -3 | tee -a $OUT/gpu.txt
timeout ${TEST_TIMEOUT:-200} python3 -m pytest -q tests/gpu/test_cudnn_backend.py tests/ops/test_cudnn_backend_cpu.py \
    -p no:cacheprovider --junitxml=$OUT/cudnn_tests.xml 2>&1 | tail -25 | tee $OUT/cudnn_tests.txt
timeout ${BENCH_TIMEOUT:-240} python3 benchmarks/cudnn_block_sparse.py --out $OUT/cudnn_block_sparse.json ${BENCH_ARGS:-} \
    > $OUT/bench.log 2>&1
echo "bench rc=$?"
grep -v -i warn $OUT/bench.log | tail -22
