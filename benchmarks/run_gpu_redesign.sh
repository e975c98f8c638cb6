#!/usr/bin/env bash
# One device call for the runtime redesign (issue 12): the GPU tests, then the layer-stack benchmark
# (benchmarks/overhead.py, 16k/32k/64k) on this tree and on the pre-redesign tree a8ee312 staged
# in .stage_base (git archive a8ee312 megatron_dsv tests benchmarks), alternating new/base twice
# so the run-to-run spread is measured beside the difference. Needs .whl/megatron_core-0.19.2*.whl.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONUNBUFFERED=1
NEW=${DSV_COMMIT:-unknown}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee $OUT/gpu_tests.txt
PYTHONPATH=/tmp/site:$PWD timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 \
    | tail -15 | tee -a $OUT/gpu_tests.txt
for i in 1 2; do
    for rev in new base; do
        dir=$PWD; commit=$NEW
        [ $rev = base ] && dir=$PWD/.stage_base && commit=a8ee312
        (cd $dir && DSV_COMMIT=$commit PYTHONPATH=/tmp/site:$dir timeout ${BENCH_TIMEOUT:-170} python3 benchmarks/overhead.py \
            --seqlens 16384,32768,65536 --out $OUT/overhead_${rev}_$i.json) > /tmp/ov_${rev}_$i.log 2>&1
        echo "overhead $rev $i rc=$?" | tee -a $OUT/overhead.log
        tail -12 /tmp/ov_${rev}_$i.log >> $OUT/overhead.log
    done
done
python3 - <<'PY'
import json, os
o = os.environ["OUT"]
for s in (16384, 32768, 65536):
    line = [f"S={s}"]
    for rev in ("new", "base"):
        for i in (1, 2):
            p = os.path.join(o, f"overhead_{rev}_{i}.json")
            if os.path.exists(p):
                r = next(r for r in json.load(open(p))["rows"] if r["S"] == s)
                line.append(f"{rev}{i}: sparse x{r['sparse_step_speedup']:.3f} train x{r['train_step_speedup']:.3f} "
                            f"dense {r['dense_ms']:.1f} sparse {r['sparse_ms']:.1f} s1 {r['stage1_ms']:.1f}")
    print(" | ".join(line))
PY
