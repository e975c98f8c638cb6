#!/usr/bin/env bash
# Device calls of the quality protocol (benchmarks/quality.py). Carry .whl (megatron-core wheel).
#   PHASE=pretrain DATA=procedural|natural       -> $OUT/quality_$DATA/{ckpt/,pretrain.json}
#   PHASE=arms DATA=... CKPT=runs/quality_$DATA/ckpt -> $OUT/quality_${DATA}_arms.json
#   PHASE=all DATA="procedural natural"           -> both phases in one call, one data source per GPU
#     (nvidia-h200-x2: the two sources run side by side; on one GPU they run one after the other);
#     SEEDS_<data> and STOP_<data> (pretrain --stop-after) per source; PRE_CMD runs on the first GPU first
# A checkpoint from PHASE=pretrain (43 MB in bf16, three files <= 16 MiB) comes back through $OUT; copy
# it to runs/quality_$DATA/ (git-ignored) and name that folder in the next call's `carry`.
# Sizes: see the README's "Quality protocol" section (ITERS, BATCH, SEEDS, MINUTES override them).
set -uo pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 DSV_COMMIT=${DSV_COMMIT:-unknown}
# The arms' DSV settings: the library defaults except --dsv-min-sparsity 0.5 (see the README).
ARM_DSV=${ARM_DSV:---dsv min_sparsity=0.5}

pretrain() {  # DATA ITERS MINUTES [STOP_AFTER]
  python3 benchmarks/quality.py pretrain-dense ${4:+--stop-after $4} --size ${SIZE:-quality} --data "$1" --iters "$2" --batch ${BATCH:-4} \
      --lr 3e-4 --warmup 100 --eval-every 100 --max-minutes "$3" --workers ${WORKERS:-8} \
      --out "$OUT/quality_$1" > "$OUT/quality_$1_pretrain.log" 2>&1
  echo "pretrain $1 rc=$?"; grep -v -i warn "$OUT/quality_$1_pretrain.log" | tail -4
}
arms() {  # DATA CKPT ITERS MINUTES
  timeout --kill-after=5 $(( ${END:-$(( $(date +%s) + 570 ))} - $(date +%s) )) python3 benchmarks/quality.py arms --ckpt "$2" --iters "$3" --batch ${ARM_BATCH:-2} --lr 1e-4 --warmup 20 \
      --eval-every 100 --seeds $(v=SEEDS_$1; echo ${!v:-${SEEDS:-0,1,2}}) --arms ${ARMS:-dense,dsv,control,aa} --max-minutes "$4" \
      --workers ${WORKERS:-8} $ARM_DSV ${EXTRA:-} --out "$OUT/quality_$1_arms.json" > "$OUT/quality_$1_arms.log" 2>&1
  echo "arms $1 rc=$?"; grep -v -i warn "$OUT/quality_$1_arms.log" | grep -E "^arm|it [0-9]+:|skipped|Error|error" | tail -40
}

case "${PHASE:-}" in
  pretrain) timeout ${RUN_TIMEOUT:-570} bash -c "$(declare -f pretrain); pretrain ${DATA:-procedural} ${ITERS:-3000} ${MINUTES:-8}" ;;
  arms)
    : "${CKPT:?set CKPT to the carried checkpoint folder, e.g. runs/quality_$DATA/ckpt}"
    timeout ${RUN_TIMEOUT:-570} bash -c "$(declare -f arms); arms ${DATA:-procedural} $CKPT ${ITERS:-400} ${MINUTES:-9}"
    python3 benchmarks/quality_report.py "$OUT/quality_${DATA}_arms.json" --md "$OUT/quality_${DATA}.md" \
        --png "$OUT/quality_${DATA}.png" ;;
  all)
    # Measured basis for the split is in the README's "Quality protocol" section; the defaults fit a
    # 600 s call: pretrain MINUTES (3.8) + arms ARM_MINUTES (4.8), each capped, report at the end.
    NGPU=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
    export END=$(( $(date +%s) + ${CALL_S:-570} ))  # the arms stop here at the latest
    i=0; pids=()
    for d in ${DATA:-procedural natural}; do
      gpu=$(( i % NGPU )); i=$((i + 1))
      ( [ -n "${NO_GPU:-}" ] || export CUDA_VISIBLE_DEVICES=$gpu
        [ "$i" != 1 ] || [ -z "${PRE_CMD:-}" ] || { bash -c "$PRE_CMD" > "$OUT/pre_cmd.txt" 2>&1; echo "pre-command rc=$?"; }
        stop=STOP_$d
        pretrain "$d" ${ITERS:-3000} ${MINUTES:-3.8} ${!stop:-}
        arms "$d" "$OUT/quality_$d/ckpt" ${ARM_ITERS:-200} ${ARM_MINUTES:-4.8} ) > "$OUT/quality_${d}_call.txt" 2>&1 &
      pids+=($!)
      if [ "$NGPU" -le 1 ]; then wait; fi
    done
    wait "${pids[@]}"
    for d in ${DATA:-procedural natural}; do cat "$OUT/quality_${d}_call.txt"; done
    python3 benchmarks/quality_report.py "$OUT"/quality_*_arms.json --md "$OUT/quality.md" --png "$OUT/quality.png"
    cat "$OUT/quality.md" 2>/dev/null | head -40
    # the device returns at most 8 files: logs and pretraining records in one archive, checkpoints dropped
    # (43 MB each; PHASE=pretrain returns one)
    rm -rf "$OUT"/quality_*/ckpt
    (cd "$OUT" && tar czf logs.tar.gz --remove-files *.log *.txt quality_*/ 2>/dev/null); ls "$OUT" ;;
  *)
    echo "set PHASE=pretrain, arms or all" >&2; exit 2 ;;
esac
