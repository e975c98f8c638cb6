#!/usr/bin/env bash
# One call on nvidia-h200-x2 for what this project's evidence still lacks (issues 13, 14, 19), carrying .whl:
#   run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_evidence.sh", kind="nvidia-h200-x2", carry=[".whl"])
# Two lanes side by side, one per GPU, each step under its own timeout (the call dies at 600 s):
#  GPU 0: the quality checkpoint (procedural, --stop-after 975, ~3.8 min as in the quality runs), then
#         benchmarks/granularity.py on it: query groups of 32, then of 64 (key blocks 16/32/64,
#         oracle / mean-pooled / LSE ranking, attention time at equal recall), <= 120 s each
#  GPU 1: the GPU tests (pytest -m gpu, <= 120 s), then benchmarks/learned_speed.py (issue 14 item 4:
#         2.7B-shaped layers at 64k tokens with the K per head the quality arms learned, transplanted,
#         against dense cuDNN, peak memory), <= 240 s, then benchmarks/overhead.py at 16k (issue 13's
#         stage-1 / stage-2 overhead at this commit), <= 150 s
# $OUT returns at most 8 files: the JSONs, and every log in logs.tar.gz.
# CPU_SMOKE=1: the same steps at tiny sizes on the CPU (checks the plumbing; numbers mean nothing).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d /tmp/evidence.XXXX)}
LOGS=$(mktemp -d /tmp/evidence_logs.XXXX)
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 DSV_COMMIT=${DSV_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
ARMS_JSON=${ARMS_JSON:-benchmarks/results/quality_h200_20261130_r2_natural_arms.json}
if [ "${CPU_SMOKE:-0}" = 1 ]; then
  export TRITON_INTERPRET=1
  PRE=(--size tiny --iters 20) STOP="" GRAN=(--device cpu --sample-groups 2) SPEED=(--device cpu --seqlen 256 --layers 2 --hidden 64 --heads 2 --ffn 128 --cpu-steps 1)
  TESTS="echo 'CPU smoke: no GPU tests'"
  GPU0="" GPU1=""
else
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  PRE=(--size quality --iters 1500 --batch 4 --lr 3e-4 --warmup 100 --eval-every 100 --max-minutes 4.2)
  STOP="--stop-after 975" GRAN=() SPEED=()
  TESTS="python3 -m pytest -q -m gpu tests -p no:cacheprovider"
  GPU0=0 GPU1=1
fi
export PYTHONPATH=${PYTHONPATH:-$PWD}
run() {  # NAME LIMIT CMD...: the step's log in $LOGS, its tail printed
  local name=$1 lim=$2; shift 2
  local t0=$SECONDS
  timeout --kill-after=10 "$lim" "$@" > "$LOGS/$name.log" 2>&1
  echo "== $name rc=$? in $((SECONDS - t0)) s"; grep -v -i warn "$LOGS/$name.log" | tail -${TAIL:-8}
}
(
  export CUDA_VISIBLE_DEVICES=$GPU0
  run pretrain 300 python3 benchmarks/quality.py pretrain-dense --data procedural "${PRE[@]}" $STOP --out "$LOGS/ckpt_procedural"
  for g in 32 64; do
    TAIL=20 run granularity_g$g 120 python3 benchmarks/granularity.py --ckpt "$LOGS/ckpt_procedural/ckpt" --groups $g \
        --deadline-s 100 "${GRAN[@]}" --out "$OUT/granularity_g$g.json"
  done
) > "$LOGS/lane0.txt" 2>&1 &
(
  export CUDA_VISIBLE_DEVICES=$GPU1
  run gpu_tests 120 bash -c "$TESTS"
  TAIL=20 run learned_speed 240 python3 benchmarks/learned_speed.py --arms "$ARMS_JSON" "${SPEED[@]}" --out "$OUT/learned_speed.json"
  [ -n "$GPU1" ] && TAIL=12 run overhead_16k 150 python3 benchmarks/overhead.py --seqlens 16384 --fit closed_form \
      --out "$OUT/overhead_16k.json"
) > "$LOGS/lane1.txt" 2>&1 &
wait
cat "$LOGS/lane0.txt" "$LOGS/lane1.txt"
cp "$LOGS/ckpt_procedural/pretrain.json" "$LOGS/pretrain_procedural.json" 2>/dev/null
rm -rf "$LOGS/ckpt_procedural"
tar czf "$OUT/logs.tar.gz" -C "$LOGS" .
ls "$OUT"
