#!/usr/bin/env bash
# Issue 16 on two H200s of one host, one device call carrying the megatron-core wheel:
#   run(command="bash benchmarks/run_gpu_cp_x2.sh", kind="nvidia-h200-x2", carry=[".whl"], timeout_s=600)
# In order, each step under its own `timeout`, NCCL with NVLink multicast off:
#  a. link calibration on the real NCCL group (megatron_dsv.tools.calibrate_cp) -> cp_calibration.json
#  b. benchmarks/cp.py on that calibration at 64k and 128k tokens: correctness (at 64k), planner vs
#     pure head vs pure seq vs dense for the 2-layer block and the DiT step, target_met per case
#  c. the video-DiT pretraining example (examples/scripts/pretrain_cp.sh), 128k tokens per video:
#     c1 CP=2 DSV auto through the stage switch, c2 CP=1 (GPU 0) same model, seed and data (loss
#     agreement), c3 CP=2 --dsv-mode dense (step-time ratio), c4 CP=2 --dsv-mode sparse on the
#     sequence split 1x2 (the selective exchange's bytes vs an all-gather of K/V, sparse step time)
#  b'. benchmarks/cp.py at 256k only if >= 150 s are left; d. benchmarks/cp_report.py on the outputs.
# $OUT holds at most 8 files (the device tool returns no more): cp_calibration.json, cp_2gpu.json,
# cp_2gpu_256k.json, logs.tar.gz (every log and DSV stats jsonl, re-packed after each step, so a
# run cut short still returns what finished), cp_report.{json,md,png}.
#
# Time (BUDGET_S = 535 s of the call's 600, counted from the start of this script; the last 15 s
# are kept for step d; a step killed at its limit may take 10 s more to die, and later steps' limits
# are computed from the time actually left):
#  setup ~10 s (wheel install: 5 s in run_gpu_cp_multi.sh's runs); a <= 45 s (torchrun + NCCL init
#  ~15 s, the timed messages < 1 s); b <= 190 s: 2 lengths x 2 profiles x 4 variants x (block +
#  attention) benches of ~0.6 s each (100 ms warm-up + 500 ms of repetitions), the single-GPU
#  references at 64k (26 s on an H100, cp.py's docstring), DiT steps, first-call Triton autotuning
#  and start-up: an estimate, not a measurement (no timing of cp.py on 2 GPUs is recorded); c1, c2
#  <= 95 s each, c3, c4 <= 60 s each. Basis: the small DiT at 16k tokens, global batch 4, took
#  244 ms an iteration dense and 360 ms in DSV stage 1 on one H200 (algo_v2_h200_20261130.json);
#  the tiny DiT (2 layers, 4 heads of 32) at 131072 tokens, 1 video an iteration, has 4x the
#  attention FLOP of one 16k video of the small DiT (64x the pairs, 1/16 the heads x dims x
#  layers): ~0.15-0.3 s an iteration at CP=1 (~3e13 attention FLOP per layer fwd+bwd at an assumed
#  150-200 TFLOP/s for head dim 32, x1.5 in stage 1), about half at CP=2; 120 iterations ~40 s +
#  ~25 s start-up (Megatron init 6 s, first-iteration compiles 3 s in that run). The small DiT
#  would take ~2 s an iteration at 128k: too long for ~100 iterations in 90 s. Megatron logs every iteration, so a run cut by its timeout still gives the
#  iterations it finished. The stage switch is forced at SWITCH (--dsv-switch-max-iters); in the
#  16k small-DiT runs the density for the target recall was still 0.87 at iteration 120, so the
#  auto runs' layers are expected to stay dense after the switch: c4 measures the sparse path.
# RUNS=bench (default all): steps a, b, b' and d only, the pretraining runs left out (they were
#  measured at 15c20d7; a re-run for the planner/autotune cases then gives b 300 s and b' 200 s).
# Knobs: BUDGET_S, RUNS, ITERS (120), SWITCH (60), TIMING_ITERS (50, c3/c4), DIT (tiny), SEQLENS
# (65536,131072), DRY_RUN=1 (print every step and its time limit, run nothing), CPU_SMOKE=1 (steps
# a, b and d on 2 gloo CPU processes at tiny sizes, c printed only: checks this script's plumbing).
set -uo pipefail
cd "$(dirname "$0")/.."
DRY_RUN=${DRY_RUN:-0}
CPU_SMOKE=${CPU_SMOKE:-0}
OUT=${OUT:-$(mktemp -d /tmp/cp_x2_out.XXXX)}
STAGE=$(mktemp -d /tmp/cp_x2_logs.XXXX)
BUDGET=${BUDGET_S:-535}
REPORT_S=15  # kept for step d: every other step ends by BUDGET - REPORT_S
VIRTUAL=0  # DRY_RUN: each printed step is taken to use its whole limit (the worst-case schedule)
ITERS=${ITERS:-120}
SWITCH=${SWITCH:-60}
TIMING_ITERS=${TIMING_ITERS:-50}
DIT=${DIT:-tiny}
SEQLENS=${SEQLENS:-65536,131072}
RUNS=${RUNS:-all}
C_RESERVE=310 B_CAP=190  # c's 95 + 95 + 60 + 60 s
if [ "$RUNS" = bench ]; then C_RESERVE=0 B_CAP=300; fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export DSV_COMMIT=${DSV_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}

if [ "$CPU_SMOKE" = 1 ]; then
  CAL_ARGS="--message-bytes 65536 1048576"
  CP_ARGS="--device cpu --tiny --seqlens 64,128 --check-max-tokens 64"
  CP_256K_ARGS="--device cpu --tiny --seqlens 256 --check-max-tokens 0"
else
  # 64 KiB .. 256 MiB per peer: the latency probe up to the largest message a 128k layer sends
  CAL_ARGS="--message-bytes 65536 262144 1048576 4194304 16777216 67108864 268435456"
  CP_ARGS="--seqlens $SEQLENS"
  CP_256K_ARGS="--seqlens 262144 --check-max-tokens 0"
  if [ "$DRY_RUN" != 1 ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
    nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader | tee "$STAGE/gpus.txt"
    nvidia-smi topo -m >> "$STAGE/gpus.txt" 2>&1
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'GPUs', torch.cuda.device_count(), 'nccl', torch.cuda.nccl.version())" | tee -a "$STAGE/gpus.txt"
  fi
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}

pack() {  # every log so far into one file (the device returns at most 8 files)
  [ "$DRY_RUN" = 1 ] || tar czf "$OUT/logs.tar.gz" -C "$STAGE" . 2>/dev/null
}

# step NAME CAP RESERVE MIN LOG CMD...: run CMD under `timeout` for min(CAP, time left - RESERVE)
# seconds (RESERVE: what later steps need), skipped when that is under MIN; output to LOG
step() {
  local name=$1 cap=$2 reserve=$3 min=$4 log=$5
  shift 5
  local now=$((SECONDS + VIRTUAL))
  local lim=$((BUDGET - REPORT_S - now - reserve))
  [ "$lim" -gt "$cap" ] && lim=$cap
  if [ "$lim" -lt "$min" ]; then
    echo "== $name skipped: ${lim}s available (needs $min) at ${now}s"
    return 0
  fi
  echo "== $name: limit ${lim}s, at ${now}s: $*"
  if [ "$DRY_RUN" = 1 ]; then
    VIRTUAL=$((VIRTUAL + lim))
    return 0
  fi
  local t0=$SECONDS
  timeout --kill-after=10 "$lim" "$@" > "$log" 2>&1
  local rc=$?
  echo "== $name rc=$rc in $((SECONDS - t0))s"
  grep -v -i -E "warn|^\s*$" "$log" | tail -${TAIL:-12}
  pack
  return 0
}

# the pretraining runs: pretrain_cp.sh's flags, overridden for a short run of the tiny DiT, 1 video
# (131072 tokens) per iteration; the same seed, data and draws at every CP size
PRETRAIN=(--dit-config "$DIT" --global-batch-size 1 --micro-batch-size 1 --lr-warmup-iters 10
  --eval-interval "$SWITCH" --eval-iters 8 --val-t-quantiles 8 --log-interval 1
  --dsv-switch-min-iters $((SWITCH / 2)) --dsv-switch-max-iters "$SWITCH"
  --dsv-profile-interval-stage1 5 --dsv-profile-interval-stage2 10)
pretrain() {  # pretrain NAME NGPUS CAP RESERVE ITERS ARGS...
  local name=$1 n=$2 cap=$3 reserve=$4 iters=$5
  shift 5
  local gpus=0
  [ "$n" = 2 ] && gpus=0,1
  step "pretrain $name" "$cap" "$reserve" 30 "$STAGE/pretrain_$name.log" \
    env CUDA_VISIBLE_DEVICES=$gpus NGPUS="$n" bash examples/scripts/pretrain_cp.sh "${PRETRAIN[@]}" \
    --train-iters "$iters" "$@"
}

CAL=$OUT/cp_calibration.json
# a. (reserve: b's useful minimum 120 s + c's)
step "a calibration" 45 $((120 + C_RESERVE)) 15 "$STAGE/calibrate.log" \
  python3 -m torch.distributed.run --standalone --nproc-per-node 2 -m megatron_dsv.tools.calibrate_cp \
  --out "$CAL" $CAL_ARGS
CAL_FLAG=""
if [ -f "$CAL" ] || [ "$DRY_RUN" = 1 ]; then CAL_FLAG="--calibration $CAL"; else echo "no calibration: cp.py plans on assumed links"; fi
# b. (reserve: c's)
TAIL=30 step "b cp.py" "$B_CAP" "$C_RESERVE" 90 "$STAGE/cp_2gpu.log" \
  python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/cp.py $CP_ARGS $CAL_FLAG \
  --out "$OUT/cp_2gpu.json"
if [ "$RUNS" != bench ]; then
if [ "$CPU_SMOKE" = 1 ]; then DRY_RUN_SAVED=$DRY_RUN; DRY_RUN=1; echo "(CPU smoke: the pretraining runs need CUDA; printed only)"; fi
# c. the loss-agreement pair first, then the two timing runs
pretrain cp2_auto 2 95 215 "$ITERS" --dsv-mode auto --dsv-cp-split auto --dsv-stats-log "$STAGE/dsv_stats_cp2_auto.jsonl"
# the GPU test suite on GPU 1 while c2 uses GPU 0 only (kernels, CP, layers: pytest -m gpu)
GPU_TESTS_PID=""
if [ "$DRY_RUN" != 1 ] && [ "$CPU_SMOKE" != 1 ]; then
  CUDA_VISIBLE_DEVICES=1 timeout --kill-after=10 ${GPU_TESTS_S:-110} python3 -m pytest -q -m gpu tests \
    -p no:cacheprovider > "$STAGE/gpu_tests.txt" 2>&1 &
  GPU_TESTS_PID=$!
fi
pretrain cp1_auto 1 95 120 "$ITERS" --dsv-mode auto --dsv-stats-log "$STAGE/dsv_stats_cp1_auto.jsonl"
if [ -n "$GPU_TESTS_PID" ]; then wait "$GPU_TESTS_PID"; echo "== gpu tests rc=$?"; tail -4 "$STAGE/gpu_tests.txt"; pack; fi
pretrain cp2_dense 2 60 60 "$TIMING_ITERS" --dsv-mode dense --dsv-cp-split auto
pretrain cp2_sparse_seq 2 60 0 "$TIMING_ITERS" --dsv-mode sparse --dsv-cp-split 1x2 \
  --dsv-stats-log "$STAGE/dsv_stats_cp2_sparse_seq.jsonl"
if [ "$CPU_SMOKE" = 1 ]; then DRY_RUN=$DRY_RUN_SAVED; fi
fi
# b'. 256k if time allows (its own JSON: the 64k/128k one is complete already)
step "b' cp.py 256k" 200 25 150 "$STAGE/cp_2gpu_256k.log" \
  python3 -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/cp.py $CP_256K_ARGS $CAL_FLAG \
  --no-dit --out "$OUT/cp_2gpu_256k.json"
# d. the report (also runnable afterwards on the returned files: benchmarks/cp_report.py --help)
REPORT=(--out "$OUT/cp_report")
for f in "$OUT/cp_2gpu.json" "$OUT/cp_2gpu_256k.json"; do [ -f "$f" ] && REPORT+=(--cp "$f"); done
[ -f "$CAL" ] && REPORT+=(--calibration "$CAL")
for r in cp2_auto cp1_auto cp2_dense cp2_sparse_seq; do
  [ -f "$STAGE/pretrain_$r.log" ] || continue
  spec="$r=$STAGE/pretrain_$r.log"
  [ -f "$STAGE/dsv_stats_$r.jsonl" ] && spec="$spec:$STAGE/dsv_stats_$r.jsonl"
  REPORT+=(--run "$spec")
done
TAIL=40 step "d report" "$REPORT_S" "-$REPORT_S" 5 "$STAGE/report.log" python3 benchmarks/cp_report.py "${REPORT[@]}" \
  --note "2 x H200 (nvidia-h200-x2), commit $DSV_COMMIT, benchmarks/run_gpu_cp_x2.sh"
pack
echo "done at ${SECONDS}s; under $OUT:"
ls -la "$OUT"
