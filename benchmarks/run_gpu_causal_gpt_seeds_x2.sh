#!/usr/bin/env bash
# One nvidia-h200-x2 call for issue 19: does DSV's loss track dense in Megatron-LM's pretrain_gpt.py
# with the causal DSV spec? One dense/DSV pair could not say (H200, stdlib: two DSV runs identical up
# to the switch were 2.6% apart at iteration 40; run C, never sparse, ended +2.1%), so here: several
# seeds, each a dense and a DSV (auto) run, and A/A repeats of dense for the nondeterminism floor.
# Stage the clone first, on the CPU machine (bash benchmarks/stage_clone.sh), then:
#   run(command="DSV_COMMIT=<sha> bash benchmarks/run_gpu_causal_gpt_seeds_x2.sh", kind="nvidia-h200-x2",
#       carry=[".stage_clone"], timeout_s=600)
# Each lane (GPU 0, GPU 1) is run_gpu_causal_gpt.sh with a JOBS list (its flags: 8 layers, hidden 512,
# 16384 tokens, batch 1, 600 iterations, lr 1e-3, stdlib corpus built once per lane, DSV_EXTRA if set;
# auto with the library defaults except --dsv-min-sparsity 0.5 and --dsv-speed-table assume):
#   LANE0 (default): dense:1 auto:1 dense:3 auto:3 dense:1:aa
#   LANE1 (default): dense:2 auto:2 dense:4 auto:4 dense:2:aa
# Order is priority: a lane runs its list in order and skips what does not fit before the shared
# deadline (CALL_S 570 s after the start, less TAIL_S 25 s for the report, the archive and a 10 s kill
# grace); a dense run and the DSV run of its seed next to it start together or not at all; each run's
# timeout is its own (200 s dense, 290 s auto) cut to the time left. Expected per lane (the H200 stdlib
# runs: 72 s per dense run, 79-99 s per DSV run, start-up and final validation included; about 25 s of
# lane set-up with the corpus; the dataset helpers compiled once before the lanes, not timed yet):
# 25 + 2 x (72 + 99) + 72 = 439 s of the 545 s to the deadline. If a lane overruns, the A/A repeat at its
# end goes first, then the second seed's pair (skipped whole when it would not fit).
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
# CPU_SMOKE=1: shorter lists (LANE0 dense:1 auto:1 dense:1:aa, LANE1 dense:2 auto:2) at
# run_gpu_causal_gpt.sh's CPU_SMOKE size, each job to Megatron's CUDA check, then the report on those logs.
set -uo pipefail
cd "$(dirname "$0")/.."
START=$(date +%s)
ROOT=${OUT:-$(mktemp -d /tmp/causal_seeds.XXXX)}
CLONE=$PWD/.stage_clone/mlm
DEADLINE=$((START + ${CALL_S:-570} - ${TAIL_S:-25}))
if [ "${CPU_SMOKE:-0}" = 1 ]; then
  LANE0=${LANE0:-dense:1 auto:1 dense:1:aa} LANE1=${LANE1:-dense:2 auto:2}
else
  LANE0=${LANE0:-dense:1 auto:1 dense:3 auto:3 dense:1:aa} LANE1=${LANE1:-dense:2 auto:2 dense:4 auto:4 dense:2:aa}
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
$(grep -m1 "^flags: " "$ROOT/lane0/env.txt" 2>/dev/null | sed 's/ per job of JOBS=([^)]*)/ per job/'); jobs: lane 0 ($LANE0), lane 1 ($LANE1)"
rc=$?
echo "call: $(($(date +%s) - START)) s, lanes exit ${rcs[*]}, report exit $rc"
(cd "$ROOT" && tar czf logs.tar.gz --remove-files lane0 lane1 $(ls make.txt 2>/dev/null))
ls -la "$ROOT"
[ "$rc" = 0 ] && [ "${rcs[0]}" = 0 ] && [ "${rcs[1]}" = 0 ]
