#!/usr/bin/env bash
# One device call of the quality protocol (benchmarks/quality.py), one phase per call:
#   PHASE=pretrain DATA=procedural|natural       -> $OUT/quality_$DATA/{ckpt/,pretrain.json}
#   PHASE=arms DATA=... CKPT=runs/quality_$DATA/ckpt -> $OUT/quality_${DATA}_arms.json
# The checkpoint (43 MB in bf16, three files <= 16 MiB) comes back through $OUT; copy it to
# runs/quality_$DATA/ (git-ignored) and name that folder in the next call's `carry`.
# Sizes: see the README's "Quality protocol" section (ITERS, BATCH, SEEDS override them).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 DSV_COMMIT=${DSV_COMMIT:-unknown}
DATA=${DATA:-procedural}
case "${PHASE:-}" in
  pretrain)
    timeout ${RUN_TIMEOUT:-570} python3 benchmarks/quality.py pretrain-dense --size quality --data "$DATA" \
        --iters ${ITERS:-3000} --batch ${BATCH:-4} --lr 3e-4 --warmup 100 --eval-every 250 --max-minutes ${MINUTES:-8} \
        --out "$OUT/quality_$DATA" 2>&1 | tee "$OUT/quality_${DATA}_pretrain.log" | grep -v -i warn | tail -20
    ;;
  arms)
    : "${CKPT:?set CKPT to the carried checkpoint folder, e.g. runs/quality_$DATA/ckpt}"
    timeout ${RUN_TIMEOUT:-570} python3 benchmarks/quality.py arms --ckpt "$CKPT" --iters ${ITERS:-400} \
        --batch ${BATCH:-2} --lr 1e-4 --warmup 20 --eval-every 100 --seeds ${SEEDS:-0,1,2} \
        --arms ${ARMS:-dense,dsv,control,aa} ${EXTRA:-} --out "$OUT/quality_${DATA}_arms.json" 2>&1 \
        | tee "$OUT/quality_${DATA}_arms.log" | grep -v -i warn | grep -E "^arm|it [0-9]+:|Error|error" | tail -60
    python3 benchmarks/quality_report.py "$OUT/quality_${DATA}_arms.json" --md "$OUT/quality_${DATA}.md" \
        --png "$OUT/quality_${DATA}.png"
    ;;
  *)
    echo "set PHASE=pretrain or PHASE=arms" >&2; exit 2 ;;
esac
