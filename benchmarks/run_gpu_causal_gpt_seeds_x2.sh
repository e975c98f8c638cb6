#!/usr/bin/env bash
# One nvidia-h200-x2 call for issue 19: does DSV's loss track dense in Megatron-LM's pretrain_gpt.py
# with the causal DSV spec? One dense/DSV pair could not say (H200, stdlib: two DSV runs identical up
# to the switch were 2.6% apart at iteration 40; run C, never sparse, ended +2.1%), so here: several
# seeds with A/A repeats for the nondeterminism floor: forked arms (PROTOCOL=fork, the default) or,
# as before, a dense and a DSV (auto) run from scratch per seed (PROTOCOL=scratch).
# Stage the clone first, on the CPU machine (bash benchmarks/stage_clone.sh), then:
#   run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_causal_gpt_seeds_x2.sh", kind="nvidia-h200-x2",
#       carry=[".stage_clone"], timeout_s=600)
# PROTOCOL=fork (default): per seed, forked arms from a common checkpoint (run_gpu_causal_gpt.sh's
# base/sparse/held jobs: base to iteration 450 in stage 1, then 150-iteration arms from it: sparse
# (the switch fires at 450), held (never switches) and held:aa (held again); so sparse - held is
# DSV's effect plus the nondeterminism held:aa - held measures, over 150 steps instead of 600). The
# last from-scratch call (PROTOCOL=scratch, below) had per-seed sd 3.3% and A/A +2.5 / +0.8%; issue
# 14's video protocol, forked the same way, got an A/A floor of +-0.3-0.6% with 130-iteration arms.
#   LANE0 (default): base:1 sparse:1 held:1 held:1:aa base:3 sparse:3 held:3 base:5 sparse:5 held:5 held:3:aa held:5:aa
#   LANE1 (default): the same for seeds 2, 4, 6
# --eval-iters 16 (EVAL_ITERS): about one pass over the validation split (2% of the documents, about
# 200 k tokens, so about 12 windows of 16385) at each validation instead of a third of it, for
# ~0.3 s per validation (4 samples took 65-81 ms): ~3 s per base (9 validations), ~1.2 s per arm.
# Expected per lane (run_gpu_causal_gpt.sh's header has the derivation from the last call's logs:
# base 75 s, arm 48 s; lane set-up ~20 s: dataset helpers 8 s, corpus 12 s): seed with A/A 219 s,
# seed without 171 s; 20 + 219 + 171 = 410 s, the third seed's group (171 s) does not fit in the
# 135 s left of 545, so held:3:aa runs (458 s) and seed 5 and held:5:aa are skipped. If the jobs are
# faster (150 s per seed without A/A), seed 5 runs before the second A/A. What goes first when a lane
# overruns: the last A/A repeats, then the last seed (its base starts only if base, sparse and held
# fit; sparse and held start together or not at all), each noted in jobs.tsv. Checkpoints go to one
# /tmp folder per lane on the device (~350 MB per seed), never $OUT.
# PROTOCOL=scratch: the earlier lists, every run from scratch for 600 iterations (--eval-iters 4):
#   LANE0: dense:1 auto:1 dense:3 auto:3 dense:1:aa
#   LANE1: dense:2 auto:2 dense:4 auto:4 dense:2:aa
# Each lane (GPU 0, GPU 1) is run_gpu_causal_gpt.sh with a JOBS list (8 layers, hidden 512, 16384
# tokens, batch 1, lr 1e-3 cosine to 1e-4 over 600 iterations in both protocols, stdlib corpus built
# once per lane, DSV_EXTRA if set; auto with the library defaults except --dsv-min-sparsity 0.5 and
# --dsv-speed-table assume). Order is priority: a lane runs its list in order and skips what does not
# fit before the shared deadline (CALL_S 570 s after the start, less TAIL_S 25 s for the report, the
# archive and a 10 s kill grace); each run's timeout is its own cut to the time left. Scratch, as
# measured (causal_gpt_seeds_h200_20261130: 59-70 s per dense run, 70-80 s per DSV run, 378 s per
# call); there a lane that overruns loses its A/A repeat first, then its second pair, whole.
# What --seed changes (Megatron-LM f8837c04, read in .stage_clone/mlm): initialize.py seeds Python's
# random, NumPy, torch and Megatron's model-parallel CUDA RNG tracker (seed + 2718), hence the weight
# initialisation; DSV's predictor is drawn from torch.initial_seed() (layers/predictor.py).
# pretrain_gpt.py passes it to the GPTDataset as random_seed, whose NumPy RandomState shuffles the
# document order and the sample order of every split (gpt_dataset.py). The split itself is by
# contiguous document ranges (98,2,0: the last 2% of the documents are validation for every seed), but
# which 16385-token windows of them each validation reads depends on the seed. So seeds differ in
# initialisation, training data order and validation samples; within a seed, dense, auto and the A/A
# repeat share all three (dropout is 0) and differ only by attention and GPU nondeterminism.
# $OUT: causal_gpt_seeds.json and causal_gpt_seeds.md (benchmarks/causal_gpt_seeds_report.py over both
# lanes) and logs.tar.gz (lane0/, lane1/: logs, dsv_stats_*.jsonl, jobs.tsv, env.txt, corpus.json,
# lane.txt; make.txt): 3 files of the 8 a call returns.
# CPU_SMOKE=1: shorter lists (fork: LANE0 base:1 sparse:1 held:1 held:1:aa, LANE1 base:2 sparse:2 held:2;
# scratch: LANE0 dense:1 auto:1 dense:1:aa, LANE1 dense:2 auto:2) at run_gpu_causal_gpt.sh's CPU_SMOKE
# size, each job to Megatron's CUDA check (a base there leaves no checkpoint; its arms still run to
# the check), then the report on those logs.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
ROOT=${OUT:-$(mktemp -d /tmp/causal_seeds.XXXX)}
CLONE=$PWD/.stage_clone/mlm
DEADLINE=$((START + ${CALL_S:-570} - ${TAIL_S:-25}))
PROTOCOL=${PROTOCOL:-fork}
case "$PROTOCOL:${CPU_SMOKE:-0}" in
  fork:1) LANE0=${LANE0:-base:1 sparse:1 held:1 held:1:aa} LANE1=${LANE1:-base:2 sparse:2 held:2} ;;
  fork:*)
    fork_lane() { echo "base:$1 sparse:$1 held:$1 held:$1:aa base:$2 sparse:$2 held:$2 base:$3 sparse:$3 held:$3 held:$2:aa held:$3:aa"; }
    LANE0=${LANE0:-$(fork_lane 1 3 5)} LANE1=${LANE1:-$(fork_lane 2 4 6)}
    export EVAL_ITERS=${EVAL_ITERS:-16} ;;
  scratch:1) LANE0=${LANE0:-dense:1 auto:1 dense:1:aa} LANE1=${LANE1:-dense:2 auto:2} ;;
  scratch:*) LANE0=${LANE0:-dense:1 auto:1 dense:3 auto:3 dense:1:aa} LANE1=${LANE1:-dense:2 auto:2 dense:4 auto:4 dense:2:aa} ;;
  *) echo "error: PROTOCOL=$PROTOCOL is not one of fork, scratch" >&2; exit 2 ;;
esac
if [ "${CPU_SMOKE:-0}" != 1 ]; then
  # once, before the lanes: two concurrent makes in one folder would race on the .so
  start=$SECONDS
  ls "$CLONE"/megatron/core/datasets/helpers_cpp*.so > /dev/null 2>&1 || make -C "$CLONE/megatron/core/datasets" > "$ROOT/make.txt" 2>&1
  echo "dataset helpers: $((SECONDS - start)) s" | tee -a "$ROOT/make.txt"
fi
pids=()
for lane in 0 1; do
  jobs_var=LANE$lane
  mkdir -p "$ROOT/lane$lane"
  (
    export CUDA_VISIBLE_DEVICES=$lane OUT=$ROOT/lane$lane JOBS="${!jobs_var}" DEADLINE SEEDS_REPORT=0
    export MASTER_PORT=$((29531 + 10 * lane))
    bash benchmarks/run_gpu_causal_gpt.sh
  ) > "$ROOT/lane$lane/lane.txt" 2>&1 &
  pids+=($!)
done
rcs=()
for p in "${pids[@]}"; do wait "$p"; rcs+=($?); done
for lane in 0 1; do echo "=== lane $lane (exit code ${rcs[lane]})"; cat "$ROOT/lane$lane/lane.txt"; done
DSV_COMMIT=${DSV_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
python3 benchmarks/causal_gpt_seeds_report.py "$ROOT/lane0" "$ROOT/lane1" --json "$ROOT/causal_gpt_seeds.json" \
  --md "$ROOT/causal_gpt_seeds.md" --note "pretrain_gpt.py on Megatron-LM f8837c04 + patches, megatron_dsv $DSV_COMMIT, \
two lanes, one GPU each (GPU 0 and 1 of one host: $(grep -m1 -E "^NVIDIA |CPU_SMOKE" "$ROOT/lane0/env.txt" 2>/dev/null)); \
$(grep -m1 "^data: " "$ROOT/lane0/env.txt" 2>/dev/null | sed 's/ {.*//'); \
$(grep -m1 "^flags: " "$ROOT/lane0/env.txt" 2>/dev/null | sed 's/ per job of JOBS=([^)]*)/ per job/'); protocol $PROTOCOL; jobs: lane 0 ($LANE0), lane 1 ($LANE1)"
rc=$?
echo "call: $(($(date +%s) - START)) s, lanes exit ${rcs[*]}, report exit $rc"
(cd "$ROOT" && tar czf logs.tar.gz --remove-files lane0 lane1 $(ls make.txt 2>/dev/null))
ls -la "$ROOT"
[ "$rc" = 0 ] && [ "${rcs[0]}" = 0 ] && [ "${rcs[1]}" = 0 ]
