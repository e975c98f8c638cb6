#!/usr/bin/env bash
# Device calls of the quality protocol (benchmarks/quality.py). Carry .whl (megatron-core wheel).
#   PHASE=pretrain DATA=procedural|natural       -> $OUT/quality_$DATA/{ckpt/,pretrain.json}
#     (FIT=1: pretrain-dense --fit-predictor, the checkpoint also carries the fitted DSV state)
#   PHASE=arms DATA=... CKPT=runs/quality_$DATA/ckpt -> $OUT/quality_${DATA}_arms.json
#   PHASE=all DATA="procedural natural"           -> both phases in one call, one data source per GPU
#     (nvidia-h200-x2: the two sources run side by side; on one GPU they run one after the other);
#     SEEDS_<data> and STOP_<data> (pretrain --stop-after) per source; PRE_CMD runs on the first GPU first
#   PHASE=fitted (round 3): PHASE=all with the checkpoint run fitting the predictor (FIT=1, every
#     layer held dense, the dense trajectory unchanged), so each dsv arm starts in stage 2 with the
#     checkpoint's predictors and statistics. ARM_ITERS defaults to what 4 arms x the source's seeds
#     fit in ARM_MINUTES, sized from round 2 (quality_h200_20261130_r2_*_arms.json, 200-iteration
#     arms, 2x4x4 groups): a dense or A/A arm took 23.2-24.3 s, ~4 s of it outside the training steps
#     (build, load, evaluations); median steps 99-101 ms dense, up to 122 ms for the dsv arm in stage 2
#     and the control; 6.5-9 s per seed went to data generation. The speed probe at the dsv arm's first
#     decision (--dsv-speed-table measure) has not run in this protocol: 10 s budgeted per dsv arm.
#     Per seed: 9 + 4 x 4 + 10 = 35 s + ITERS x (2 x 0.100 + 2 x 0.122 s) = 35 s + 0.444 s x ITERS;
#     ARM_MINUTES 4.8 and 3 seeds give 96 s per seed -> 130 iterations (2 seeds: 240), rounded down
#     to a multiple of 10. arms --max-minutes still starts no seed that would not fit.
# A checkpoint from PHASE=pretrain (43 MB in bf16, three files <= 16 MiB) comes back through $OUT; copy
# it to runs/quality_$DATA/ (git-ignored) and name that folder in the next call's `carry`.
# Sizes: see the README's "Quality protocol" section (ITERS, BATCH, SEEDS, MINUTES override them).
# CPU_SMOKE=1: the same steps at --size tiny on the CPU under the Triton interpreter (plumbing only;
# tests/test_quality_benchmark.py runs PHASE=fitted this way).
set -uo pipefail
if [ "${CPU_SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1 SIZE=tiny WORKERS=0 WARMUP=${WARMUP:-5} ARM_WARMUP=${ARM_WARMUP:-2}
  export ITERS=${ITERS:-20} ARM_ITERS=${ARM_ITERS:-8} MINUTES=${MINUTES:-0} ARM_MINUTES=${ARM_MINUTES:-0}
  export SEEDS=${SEEDS:-0} DATA=${DATA:-procedural} NO_GPU=1
  # on the CPU the reference sparse path need not beat dense: the assume rule lets the tiny layers go sparse
  ARM_DSV=${ARM_DSV:---dsv speed_table=assume}
  OUT=${OUT:-$(mktemp -d /tmp/quality_smoke.XXXX)}
  export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 OUT
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 DSV_COMMIT=${DSV_COMMIT:-unknown}
fi
# The arms' DSV settings: the library defaults, --dsv-min-sparsity 0.5 named (the default since ec1df4a;
# rounds 1-2 set it against the then default 0.8).
# FIT_DSV: --dsv values of the fitting checkpoint run; its result-changing ones must match ARM_DSV's.
# Exported: PHASE=pretrain and PHASE=arms run the steps in `bash -c` (an unexported default was lost there).
export ARM_DSV=${ARM_DSV:---dsv min_sparsity=0.5} FIT_DSV=${FIT_DSV:-}

pretrain() {  # DATA ITERS MINUTES [STOP_AFTER]
  python3 benchmarks/quality.py pretrain-dense ${4:+--stop-after $4} --size ${SIZE:-quality} --data "$1" --iters "$2" --batch ${BATCH:-4} \
      --lr 3e-4 --warmup ${WARMUP:-100} --eval-every 100 --max-minutes "$3" --workers ${WORKERS:-8} \
      ${FIT:+--fit-predictor $FIT_DSV} \
      --out "$OUT/quality_$1" > "$OUT/quality_$1_pretrain.log" 2>&1
  echo "pretrain $1 rc=$?"; grep -v -i warn "$OUT/quality_$1_pretrain.log" | tail -4
}
arm_iters() {  # SEEDS MINUTES: the iterations 4 arms x the seeds fit in MINUTES (sizing in the header)
  awk -v seeds="$1" -v m="$2" 'BEGIN { n = split(seeds, s, ","); i = int((m * 60 / n - 35) / 0.444 / 10) * 10;
    if (i < 10) { print "ARM_MINUTES " m " leave no 10 iterations per arm for " n " seeds" > "/dev/stderr"; exit 1 }
    print i }'
}
arms() {  # DATA CKPT ITERS MINUTES
  timeout --kill-after=5 $(( ${END:-$(( $(date +%s) + 570 ))} - $(date +%s) )) python3 benchmarks/quality.py arms --ckpt "$2" --iters "$3" --batch ${ARM_BATCH:-2} --lr 1e-4 --warmup ${ARM_WARMUP:-20} \
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
  all|fitted)
    # Measured basis for the split is in the README's "Quality protocol" section; the defaults fit a
    # 600 s call: pretrain MINUTES (3.8) + arms ARM_MINUTES (4.8), each capped, report at the end.
    [ "$PHASE" = fitted ] && export FIT=1
    NGPU=$(python3 -c "import torch; print(max(1, torch.cuda.device_count()))")
    export END=$(( $(date +%s) + ${CALL_S:-570} ))  # the arms stop here at the latest
    i=0; pids=()
    for d in ${DATA:-procedural natural}; do
      gpu=$(( i % NGPU )); i=$((i + 1))
      seeds=SEEDS_$d; seeds=${!seeds:-${SEEDS:-0,1,2}}
      if [ -n "${ARM_ITERS:-}" ]; then iters=$ARM_ITERS
      elif [ "$PHASE" = fitted ]; then iters=$(arm_iters "$seeds" ${ARM_MINUTES:-4.8}) || exit 2
      else iters=200; fi
      echo "$d: arms of $iters iterations, seeds $seeds"
      ( [ -n "${NO_GPU:-}" ] || export CUDA_VISIBLE_DEVICES=$gpu
        [ "$i" != 1 ] || [ -z "${PRE_CMD:-}" ] || { bash -c "$PRE_CMD" > "$OUT/pre_cmd.txt" 2>&1; echo "pre-command rc=$?"; }
        stop=STOP_$d
        pretrain "$d" ${ITERS:-3000} ${MINUTES:-3.8} ${!stop:-}
        arms "$d" "$OUT/quality_$d/ckpt" "$iters" ${ARM_MINUTES:-4.8} ) > "$OUT/quality_${d}_call.txt" 2>&1 &
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
    echo "set PHASE=pretrain, arms, all or fitted" >&2; exit 2 ;;
esac
