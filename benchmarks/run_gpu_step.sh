#!/usr/bin/env bash
# One device call: GPU tests (bf16), Triton kernel tests on CUDA, the training-step benchmark
# (forward+backward+AdamW, peak memory) at 16k-64k tokens, and the dense ring step benchmark.
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 DSV_COMMIT=${DSV_COMMIT:-unknown}
python3 -m pytest -q -m gpu tests -p no:cacheprovider 2>&1 | tail -3 | tee $OUT/gpu_tests.txt
python3 -m pytest -q tests/ops/test_sparse_attention_triton.py tests/ops/test_selection_triton.py -p no:cacheprovider 2>&1 | tail -3 | tee -a $OUT/gpu_tests.txt
python3 benchmarks/overhead.py --seqlens 16384,32768,65536 --out $OUT/overhead_h100.json > $OUT/overhead.log 2>&1; echo "overhead rc=$?"; tail -14 $OUT/overhead.log
python3 benchmarks/cp_chunk.py --shapes 16x16384x128,16x32768x128 --out $OUT/cp_chunk_h100.json > $OUT/cp_chunk.log 2>&1; echo "cp_chunk rc=$?"
python3 - <<'PY'
import json, os
d = json.load(open(os.path.join(os.environ["OUT"], "cp_chunk_h100.json")))
for r in d["rows"]:
    print(r["S_chunk"], {k: (v.get("fwd_bwd_ms"), v.get("correct"), v.get("error")) for k, v in r.items() if isinstance(v, dict) and k != "cudnn_sdpa"}, r["cudnn_sdpa"]["fwd_bwd_ms"])
PY
