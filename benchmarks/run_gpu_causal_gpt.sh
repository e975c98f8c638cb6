#!/usr/bin/env bash
# One call on nvidia-h200 for issue 19's last item: Megatron-LM's own pretrain_gpt.py on the patched
# clone with the causal DSV spec, dense (--dsv-mode dense) then DSV (--dsv-mode auto), same seed and
# data, and whether the DSV loss tracks the dense one. Stage the clone first, on the CPU machine:
#   bash benchmarks/stage_clone.sh
#   run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_causal_gpt.sh", kind="nvidia-h200",
#       carry=[".stage_clone"], timeout_s=600)
# No megatron-core wheel: megatron comes from the clone, megatron_dsv from this working tree.
# Model: GPT, 8 layers, hidden 512, 8 heads of 64, RoPE, 16384 tokens per sample (256 query groups of
# 64 tokens x 256 key blocks of 64), micro/global batch 1, 600 iterations (ITERS), lr 1e-3 cosine to 1e-4
# (LR, MIN_LR; the mock run of 936eea0 used 300 and 3e-4: on the stdlib text a CPU stand-in's layers
# needed density 0.195 for recall 0.9 by step 150 at lr 1e-3, 0.49 at 3e-4, see README), no dropout
# (so the two runs differ only in attention). DSV: switch between iterations 50 and 150, --dsv-min-sparsity 0.5, and
# --dsv-speed-table assume (sparse at density <= 0.5 without timing it), so that layers can go sparse
# and the loss comparison covers sparse attention; the step times are reported beside it
# (SPEED_TABLE=measure to let the speed probe decide instead). Each run has its own timeout
# (DENSE_TIMEOUT 200 s, DSV_TIMEOUT 290 s) so the call ends within 9 minutes; a run cut short still
# leaves its log and the rows so far.
# Data (DATA=stdlib|mock, default stdlib):
#   stdlib: benchmarks/text_corpus.py builds, on the device into /tmp, a byte-level indexed dataset of
#     the device interpreter's standard-library .py sources (11.5 M tokens from CPython 3.12.1, 0.14 s
#     to build plus 4 s to import megatron.core on the CPU machine; 300 samples of 16385 tokens read
#     4.9 M), passed as --data-path with --split 98,2,0 and NullTokenizer --vocab-size 257 (bytes
#     0..255, EOD = vocab_size - 1 = 256); its summary (tokens, sha256) goes to $OUT/corpus.json.
#   mock: Megatron's MockGPTDataset (NullTokenizer, vocab 1000): arange runs, so predictable that every
#     layer stayed near uniform and none went sparse (causal_gpt_h200_20261130_dsv_stats.jsonl).
# DSV_EXTRA: more flags for the auto run (e.g. "--dsv-critical-mass 0.95"). MEGATRON_EXTRA: more flags
# for every run, e.g. "--deterministic-mode" (Megatron: torch.use_deterministic_algorithms, NCCL_ALGO
# Ring, cuBLAS workspace): two runs at 3bdc13b identical up to the switch differed by 2.6% at
# iteration 40 from GPU nondeterminism alone; whether every kernel of the run has a deterministic
# implementation under that mode (SDPA's backward, our selection and profiler ops) is untested. DENSE_FROM=<logs.tar.gz of an
# earlier call>: skip the dense run and pair with that call's gpt_dense.log (refused when its corpus
# sha256 differs), e.g. benchmarks/results/causal_gpt_h200_20261130_stdlib_logs.tar.gz.
# $OUT gets: env.txt, corpus.json (stdlib), gpt_dense.log, gpt_auto.log, dsv_stats_auto.jsonl,
# jobs.tsv, causal_gpt.json.
# SEED (default 1234): Megatron's --seed (see run_gpu_causal_gpt_seeds_x2.sh for what it changes).
# JOBS="mode:seed[:tag] ...": instead of the dense+auto pair above, run these jobs in order, each into
# gpt_<mode>_s<seed>[_<tag>].log (every mode but dense: dsv_stats_<mode>_s<seed>[_<tag>].jsonl), one
# line per job in jobs.tsv (name, mode, seed, tag, exit code, seconds, timeout, note; exit code
# "skipped" when it did not start, the note says why), then benchmarks/causal_gpt_seeds_report.py on
# $OUT (causal_gpt_seeds.{json,md}; SEEDS_REPORT=0 leaves that to the caller). Modes (tag e.g. aa
# for an A/A repeat):
#   from scratch, ITERS iterations: dense (--dsv-mode dense), auto (DSV, the switch above);
#   forked from a common checkpoint (FORK_AT=B, default 450; ARM_ITERS=A, default 150), every one
#   --dsv-mode auto with --train-iters B+A, so the arms continue the base's learning-rate schedule:
#     base    stage 1 only (the switch is set to B+A, never reached): dense attention while the
#             predictor learns, to iteration B, saved there (--save CKPT/s<seed> --save-interval B
#             --exit-interval B --ckpt-format torch; CKPT defaults to a fresh /tmp folder, never $OUT);
#     held    --load that checkpoint, the switch still at B+A: dense attention to B+A;
#     sparse  --load that checkpoint, --dsv-switch-min-iters B --dsv-switch-max-iters B: the switch
#             fires after the first arm iteration (iteration B, counted from 0 as the controller
#             does) and each layer goes sparse where its density and recall allow.
#   The switch iterations are schedule knobs a resumed run may retune (config.py's
#   _RETUNABLE_ON_RESUME); every other --dsv-* flag is the base's, so the layers restore the base's
#   DSV state (predictor, statistics, stage) without --dsv-on-resume reset. Arms pass
#   --exit-on-missing-checkpoint and no --save; Megatron restores the iteration, the consumed train
#   and validation samples (so the data order and the validation windows continue the base's), the
#   optimizer, the LR scheduler and the RNG (no --finetune, --no-load-optim or --no-load-rng), and
#   logs "successfully loaded checkpoint ... at iteration B", which the report checks.
#   Why B = 450: in the 600-iteration runs of causal_gpt_seeds_h200_20261130 (same model, lr and
#   schedule), no layer of any seed was sparse at iteration 300 (mean density for recall 0.9:
#   0.64-0.68) and the first layers went sparse at 400-450, 1-4 of 8 by 450, 2-6 by 500: arms
#   forked at 300 would hardly run sparse.
# DEADLINE=<epoch seconds>: each job's timeout is cut to the time left, and a job starts only if its
# expected time fits. Expected (EXPECT_*_S): dense 80, auto 105 (the H200 stdlib runs of 600
# iterations took 72 s dense, 79-99 s auto); base 75, an arm 48: from causal_gpt_seeds_h200_20261130's
# logs, each job spends 25-27 s outside training (torchrun and imports ~8 s, library and program
# set-up ~18 s, the final validation and exit), a stage-1 DSV iteration 72-85 ms (median), a stage-2
# one 63-66 ms, the first sparse iteration ~4.4 s more (Triton compile), a validation of 4 samples
# 65-81 ms (so ~0.3 s at EVAL_ITERS=16, the seeds script's forked default; 4 otherwise); so a base of 450 stage-1 iterations and 9 validations
# ~67 s and an arm of 150 iterations ~43-45 s, plus the checkpoint save / load (~350 MB of bf16
# weights, fp32 main weights and Adam state to /tmp; not timed yet). Groups that start together or
# not at all: "dense:S auto:S" next to each other; "base:S" with the sparse:S and held:S of JOBS
# (a base without its pair answers nothing); "sparse:S held:S" next to each other. A base that
# failed (or left no checkpoint) skips its seed's arms, noted in jobs.tsv.
# MASTER_PORT (default 29531): one per concurrent lane.
# CPU_SMOKE=1: the same command line at tiny size on this CPU machine; Megatron stops at its CUDA
# check (initialize_megatron: "Megatron requires CUDA") after parsing and validating every flag, so
# the smoke checks the staged clone, the imports, the corpus build and the flags, and that the report
# runs. A base stops there too and leaves no checkpoint; its arms still run to that check (their
# flags validated), and the report lists them as not resumed.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/causal_gpt.XXXX)}
CLONE=$PWD/.stage_clone/mlm
export PYTHONPATH=$CLONE:$PWD PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0
DSV_COMMIT=${DSV_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
DATA=${DATA:-stdlib}
case "$DATA" in
  stdlib|mock) ;;
  *) echo "error: DATA=$DATA is not one of stdlib, mock" >&2; exit 2 ;;
esac
SEED=${SEED:-1234}
JOBS=${JOBS:-}
read -ra JOB_LIST <<< "$JOBS"
for job in "$SEED" "${JOB_LIST[@]}"; do
  [[ "$job" =~ ^([0-9]+|(dense|auto|base|sparse|held):[0-9]+(:[a-z0-9]+)?)$ ]] && [[ ! "$job" =~ (^|:)0+(:|$) ]] || {
    echo "error: '$job' is not a positive SEED or a JOBS entry mode:seed[:tag] (mode dense, auto, base, sparse or held, seed >= 1, tag [a-z0-9]+)" >&2; exit 2; }
done
declare -A BASE_AT=()  # seed -> position of its base job in JOBS
for i in "${!JOB_LIST[@]}"; do
  IFS=: read -r mode seed tag <<< "${JOB_LIST[i]}"
  case "$mode" in
    base) [ -z "$tag" ] && [ -z "${BASE_AT[$seed]:-}" ] || {
            echo "error: '${JOB_LIST[i]}': one base per seed and no tag (the arms load CKPT/s$seed)" >&2; exit 2; }
          BASE_AT[$seed]=$i ;;
    sparse|held) [ -n "${BASE_AT[$seed]:-}" ] || {
            echo "error: '${JOB_LIST[i]}' loads the checkpoint of base:$seed, which JOBS must list before it" >&2; exit 2; } ;;
  esac
done
for v in FORK_AT ARM_ITERS; do
  [ -z "${!v:-}" ] || [[ "${!v}" =~ ^[1-9][0-9]*$ ]] || { echo "error: $v=${!v} is not a positive number of iterations" >&2; exit 2; }
done
if [ -n "$JOBS" ] && [ -n "${DENSE_FROM:-}" ]; then
  echo "error: DENSE_FROM pairs with the default dense+auto pair; with JOBS list the dense runs as jobs instead" >&2; exit 2
fi

if ! python3 patches/apply.py check --megatron "$CLONE" > "$OUT/env.txt" 2>&1; then
  cat "$OUT/env.txt"
  echo "error: $CLONE is not a patched Megatron-LM clone; run bash benchmarks/stage_clone.sh here and carry .stage_clone" >&2
  exit 2
fi

if [ "${CPU_SMOKE:-0}" = 1 ]; then
  SIZE=(--num-layers 2 --hidden-size 128 --num-attention-heads 2 --ffn-hidden-size 512 --seq-length 512
        --max-position-embeddings 512)
  ITERS=4 FORK_AT=${FORK_AT:-2} ARM_ITERS=${ARM_ITERS:-2}
  SWITCH=(--dsv-switch-min-iters 2 --dsv-switch-max-iters 3)
  DENSE_TIMEOUT=120 DSV_TIMEOUT=120
  echo "cpu (CPU_SMOKE)" >> "$OUT/env.txt"
else
  SIZE=(--num-layers 8 --hidden-size 512 --num-attention-heads 8 --ffn-hidden-size 2048 --seq-length 16384
        --max-position-embeddings 16384)
  ITERS=${ITERS:-600} FORK_AT=${FORK_AT:-450} ARM_ITERS=${ARM_ITERS:-150}
  SWITCH=(--dsv-switch-min-iters 50 --dsv-switch-max-iters 150)
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv >> "$OUT/env.txt" 2>&1
  # pretrain_gpt.py's dataset needs the C++ helpers; compiled here, for the device's Python.
  ls "$CLONE"/megatron/core/datasets/helpers_cpp*.so > /dev/null 2>&1 || make -C "$CLONE/megatron/core/datasets" >> "$OUT/env.txt" 2>&1
fi
python3 -W ignore -c 'import torch, triton, megatron.training, megatron_dsv; print("torch", torch.__version__, "triton", triton.__version__, "megatron", megatron.training.__file__, "megatron_dsv", megatron_dsv.__file__)' >> "$OUT/env.txt" 2>&1
echo "megatron_dsv commit $DSV_COMMIT" >> "$OUT/env.txt"

case "$DATA" in
  stdlib)
    CORPUS_DIR=$(mktemp -d /tmp/stdlib_corpus.XXXX)
    start=$SECONDS
    if ! python3 -W ignore benchmarks/text_corpus.py --out "$CORPUS_DIR/stdlib" --json "$OUT/corpus.json" \
        > "$CORPUS_DIR/build.log" 2>&1; then
      cat "$CORPUS_DIR/build.log" >&2
      echo "error: benchmarks/text_corpus.py could not build the corpus (log above)" >&2
      exit 2
    fi
    DATA_NOTE="data: stdlib corpus ($((SECONDS - start)) s with imports) $(tail -1 "$CORPUS_DIR/build.log")"
    DATA_ARGS=(--data-path "$CORPUS_DIR/stdlib" --split 98,2,0 --tokenizer-type NullTokenizer --vocab-size 257)
    ;;
  mock)
    DATA_NOTE="data: MockGPTDataset"
    DATA_ARGS=(--mock-data --tokenizer-type NullTokenizer --vocab-size 1000)
    ;;
esac
echo "$DATA_NOTE" | tee -a "$OUT/env.txt"

# Megatron without Transformer Engine and apex: the local layers, no fusions that need apex.
# shellcheck disable=SC2206
COMMON=("${SIZE[@]}" --position-embedding-type rope --micro-batch-size 1 --global-batch-size 1
  --lr ${LR:-1e-3} --min-lr ${MIN_LR:-1e-4} --lr-decay-style cosine --lr-warmup-iters 20 --weight-decay 0.01 --clip-grad 1.0
  --bf16 --hidden-dropout 0 --attention-dropout 0
  --eval-interval 50 --eval-iters ${EVAL_ITERS:-4} --log-interval 10 --log-throughput
  "${DATA_ARGS[@]}" --no-create-attention-mask-in-dataloader
  --spec megatron_dsv.specs dsv_gpt_causal_layer_spec
  --transformer-impl local --no-persist-layer-norm --no-gradient-accumulation-fusion
  --no-masked-softmax-fusion --no-bias-dropout-fusion --no-rope-fusion ${MEGATRON_EXTRA:-})
# shellcheck disable=SC2206
DSV=(--dsv-min-sparsity 0.5 --dsv-speed-table ${SPEED_TABLE:-assume}
  --dsv-profile-interval-stage1 10 --dsv-profile-interval-stage2 25 ${DSV_EXTRA:-})
FORK_ITERS=$((FORK_AT + ARM_ITERS))
CKPT=${CKPT:-}
seed_note=$SEED
[ -z "$JOBS" ] || seed_note="per job of JOBS=($JOBS)"
echo "flags: ${COMMON[*]} --seed $seed_note | auto: ${DSV[*]} ${SWITCH[*]} --train-iters $ITERS | forked: --train-iters $FORK_ITERS, base to $FORK_AT, arms of $ARM_ITERS" >> "$OUT/env.txt"

mode_flags() {  # mode seed: the flags of one job beside COMMON
  local mode=$1 seed=$2 never=(--dsv-switch-min-iters "$FORK_ITERS" --dsv-switch-max-iters "$FORK_ITERS")
  local load=(--load "$CKPT/s$seed" --ckpt-format torch --exit-on-missing-checkpoint)
  case "$mode" in
    dense) echo --dsv-mode dense --train-iters "$ITERS" ;;
    auto) echo --dsv-mode auto "${DSV[@]}" "${SWITCH[@]}" --train-iters "$ITERS" ;;
    base) echo --dsv-mode auto "${DSV[@]}" "${never[@]}" --train-iters "$FORK_ITERS" --save "$CKPT/s$seed" \
            --save-interval "$FORK_AT" --exit-interval "$FORK_AT" --ckpt-format torch ;;
    held) echo --dsv-mode auto "${DSV[@]}" "${never[@]}" --train-iters "$FORK_ITERS" "${load[@]}" ;;
    sparse) echo --dsv-mode auto "${DSV[@]}" --dsv-switch-min-iters "$FORK_AT" --dsv-switch-max-iters "$FORK_AT" \
              --train-iters "$FORK_ITERS" "${load[@]}" ;;
  esac
}

RAN_LOGS=()
run() {  # name mode seed timeout [tag]: one pretrain_gpt.py run into gpt_<name>.log, a line in jobs.tsv
  local name=$1 mode=$2 seed=$3 limit=$4
  local start=$SECONDS extra=() note=""
  read -ra extra <<< "$(mode_flags "$mode" "$seed")"
  [ "$mode" = dense ] || extra+=(--dsv-stats-log "$OUT/dsv_stats_$name.jsonl")
  # -k: a torchrun that ignores the TERM is killed 10 s later, so a lane keeps its deadline
  timeout -k 10 "$limit" torchrun --nproc-per-node 1 --master-port "${MASTER_PORT:-29531}" "$CLONE/pretrain_gpt.py" "${COMMON[@]}" \
    --seed "$seed" "${extra[@]}" > "$OUT/gpt_$name.log" 2>&1
  local rc=$?
  echo "run_gpu_causal_gpt: exit code $rc" >> "$OUT/gpt_$name.log"
  RAN_LOGS+=("$OUT/gpt_$name.log")
  if [ "$mode" = base ] && [ "${CPU_SMOKE:-0}" != 1 ]; then
    # Megatron's tracker file names the saved iteration; a base without it gives its arms nothing
    note="checkpoint at iteration $(cat "$CKPT/s$seed/latest_checkpointed_iteration.txt" 2>/dev/null || echo "- (none)") in $CKPT/s$seed"
  fi
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$mode" "$seed" "${5:-}" "$rc" "$((SECONDS - start))" "$limit" "$note" >> "$OUT/jobs.tsv"
  echo "$name: mode $mode seed $seed rc=$rc ($((SECONDS - start)) s, limit $limit s)${note:+; $note}"
  grep -E "iteration +[0-9]+/|validation loss at|DSV (stage|layer|hooks|warning|refuses)|Error|requires CUDA|loaded checkpoint|could not load|exiting" \
    "$OUT/gpt_$name.log" | grep -v -i warn | tail -6
}
left_s() {  # seconds to DEADLINE (no deadline: effectively unlimited)
  if [ -n "${DEADLINE:-}" ]; then echo $((DEADLINE - $(date +%s))); else echo 1000000; fi
}
timeout_for() {  # mode: its own timeout, cut to the time left
  local own left
  case "$1" in
    dense) own=${DENSE_TIMEOUT:-200} ;;
    auto) own=${DSV_TIMEOUT:-290} ;;
    base) own=${BASE_TIMEOUT:-150} ;;
    *) own=${ARM_TIMEOUT:-110} ;;
  esac
  left=$(left_s)
  echo $((left < own ? left : own))
}
expect_s() {
  case "$1" in
    dense) echo "${EXPECT_DENSE_S:-80}" ;;
    auto) echo "${EXPECT_AUTO_S:-105}" ;;
    base) echo "${EXPECT_BASE_S:-75}" ;;
    *) echo "${EXPECT_ARM_S:-48}" ;;
  esac
}
skip() {  # job why: a jobs.tsv line for a job that did not start
  local m s t
  IFS=: read -r m s t <<< "$1"
  printf '%s\t%s\t%s\t%s\tskipped\t0\t0\t%s\n' "${m}_s$s${t:+_$t}" "$m" "$s" "$t" "$2" >> "$OUT/jobs.tsv"
  echo "skipped $1: $2"
}

printf 'name\tmode\tseed\ttag\texit_code\tseconds\ttimeout_s\tnote\n' > "$OUT/jobs.tsv"
if [ -n "$JOBS" ]; then
  if [ -n "${BASE_AT[*]}" ] && [ -z "$CKPT" ]; then
    CKPT=$(mktemp -d /tmp/causal_gpt_ckpt.XXXX)
  fi
  declare -A BASE_OK=() BASE_NOTE=()  # seed -> 1 once its base saved the checkpoint (CPU_SMOKE: once it ran) / why not
  i=0
  while [ "$i" -lt "${#JOB_LIST[@]}" ]; do
    IFS=: read -r mode seed tag <<< "${JOB_LIST[i]}"
    group=("${JOB_LIST[i]}")
    need=0
    # what must start together or not at all
    case "$mode" in
      dense) [ -z "$tag" ] && [ "${JOB_LIST[i+1]:-}" = "auto:$seed" ] && group+=("auto:$seed") ;;
      sparse) [ -z "$tag" ] && [ "${JOB_LIST[i+1]:-}" = "held:$seed" ] && group+=("held:$seed") ;;
      held) [ -z "$tag" ] && [ "${JOB_LIST[i+1]:-}" = "sparse:$seed" ] && group+=("sparse:$seed") ;;
      base)  # the base fits only with its seed's first sparse and held arm (the pair it exists for)
        for a in sparse held; do
          for j in "${JOB_LIST[@]}"; do [ "$j" = "$a:$seed" ] && need=$((need + $(expect_s "$a"))) && break; done
        done ;;
    esac
    for g in "${group[@]}"; do need=$((need + $(expect_s "${g%%:*}"))); done
    left=$(left_s)
    if [[ "$mode" =~ ^(sparse|held)$ ]] && [ -z "${BASE_OK[$seed]:-}" ]; then
      for g in "${group[@]}"; do skip "$g" "no base: ${BASE_NOTE[$seed]:-base:$seed did not run}"; done
    elif [ "$left" -lt "$need" ]; then
      for g in "${group[@]}"; do skip "$g" "deadline: ${left} s left, ${need} s expected"; done
      [ "$mode" != base ] || BASE_NOTE[$seed]="base:$seed was skipped (deadline)"
    else
      for g in "${group[@]}"; do
        IFS=: read -r m s t <<< "$g"
        run "${m}_s$s${t:+_$t}" "$m" "$s" "$(timeout_for "$m")" "$t"
        if [ "$m" = base ]; then
          if [ "${CPU_SMOKE:-0}" = 1 ] || [ "$(cat "$CKPT/s$s/latest_checkpointed_iteration.txt" 2>/dev/null)" = "$FORK_AT" ]; then
            BASE_OK[$s]=1
          else
            BASE_NOTE[$s]="base:$s left no checkpoint at iteration $FORK_AT (exit code $(tail -1 "$OUT/jobs.tsv" | cut -f5))"
          fi
        fi
      done
    fi
    i=$((i + ${#group[@]}))
  done
  rc=0
  if [ "${SEEDS_REPORT:-1}" = 1 ]; then
    python3 benchmarks/causal_gpt_seeds_report.py "$OUT" --json "$OUT/causal_gpt_seeds.json" --md "$OUT/causal_gpt_seeds.md" \
      --note "pretrain_gpt.py on Megatron-LM f8837c04 + patches, megatron_dsv $DSV_COMMIT; $(grep -m1 -E "^NVIDIA |CPU_SMOKE" "$OUT/env.txt"); $DATA_NOTE; $(grep -m1 "^flags: " "$OUT/env.txt")"
    rc=$?
  fi
  if [ "${CPU_SMOKE:-0}" = 1 ]; then
    n=0
    [ "${#RAN_LOGS[@]}" = 0 ] || n=$(grep -l "Megatron requires CUDA" "${RAN_LOGS[@]}" | wc -l)
    echo "CPU_SMOKE: $n of ${#RAN_LOGS[@]} jobs reached Megatron's CUDA check (flags accepted); report rc=$rc; OUT=$OUT"
    [ "$n" = "${#RAN_LOGS[@]}" ] && [ "$n" -gt 0 ] && [ "$rc" = 0 ] || exit 1
  fi
  exit $rc
fi

if [ -n "${DENSE_FROM:-}" ]; then
  # the dense twin of an earlier call (same flags, seed and corpus: its sha256 must match this one's)
  tar xzf "$DENSE_FROM" -C "$OUT" gpt_dense.log || exit 2
  if [ "$DATA" = stdlib ]; then
    want=$(tar xzf "$DENSE_FROM" -O corpus.json | python3 -c "import json, sys; print(json.load(sys.stdin)['sha256'])")
    have=$(python3 -c "import json; print(json.load(open('$OUT/corpus.json'))['sha256'])")
    [ "$want" = "$have" ] || { echo "error: corpus sha256 $have differs from the dense run's $want ($DENSE_FROM)" >&2; exit 2; }
  fi
  DATA_NOTE="$DATA_NOTE; dense run from $DENSE_FROM (another call)"
  echo "dense: from $DENSE_FROM"
else
  run dense dense "$SEED" "${DENSE_TIMEOUT:-200}"
fi
run auto auto "$SEED" "${DSV_TIMEOUT:-290}"
python3 benchmarks/causal_gpt_report.py --dense "$OUT/gpt_dense.log" --dsv "$OUT/gpt_auto.log" \
  --out "$OUT/causal_gpt.json" --note "pretrain_gpt.py on Megatron-LM f8837c04 + patches, megatron_dsv $DSV_COMMIT; $(grep -m1 -E "^NVIDIA |CPU_SMOKE" "$OUT/env.txt"); $DATA_NOTE; $(grep -m1 "^flags: " "$OUT/env.txt")"
rc=$?
if [ "${CPU_SMOKE:-0}" = 1 ]; then
  # Both runs must stop at Megatron's CUDA check, i.e. after every flag was accepted.
  logs=("$OUT/gpt_auto.log"); [ -n "${DENSE_FROM:-}" ] || logs+=("$OUT/gpt_dense.log")
  n=$(grep -l "Megatron requires CUDA" "${logs[@]}" | wc -l)
  echo "CPU_SMOKE: $n of ${#logs[@]} runs reached Megatron's CUDA check (flags accepted); report rc=$rc; OUT=$OUT"
  [ "$n" = "${#logs[@]}" ] && [ "$rc" = 0 ] || exit 1
fi
exit $rc
