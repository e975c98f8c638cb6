#!/usr/bin/env bash
# One device call: the profiling cost of the DSV algorithm v2, piece by piece (benchmarks/profile_cost.py),
# then the layer-stack overhead benchmark (benchmarks/overhead.py) with the closed-form and the
# gradient predictor fit. Needs .whl/megatron_core-0.19.2*.whl.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
timeout 150 python3 benchmarks/profile_cost.py --out $OUT/profile_cost.json 2>&1 | tail -4
for fit in closed_form gradient; do
  timeout 170 python3 benchmarks/overhead.py --seqlens 16384,65536 --fit $fit --out $OUT/overhead_$fit.json > $OUT/overhead_$fit.log 2>&1
  echo "overhead $fit rc=$?"; tail -8 $OUT/overhead_$fit.log
done
