#!/usr/bin/env bash
# Issue 15 item 3: the kernel table with every peer in one run on one nvidia-h200 -- cuDNN dense,
# ours (Triton, selection included), NVIDIA cuDNN block-sparse on our index, FlexAttention 128x128
# and 64x64 -- D = 128/64, sparsity 0.8/0.9/0.95/0.98, S = 64k/32k/16k (benchmarks/attention.py),
# then the README table and the targets (benchmarks/attention_report.py). Writes under $OUT.
#
# The cuDNN frontend needs six wheels (111.6 MB); nvidia-cutlass-dsl-libs-cu13 alone is 92.0 MB,
# over a call's 64 MiB carry, so they travel in two calls, issued back to back (the machine stays
# warm about 30 s between calls, and /tmp with it):
#   here, once, in the root of the checkout the calls are made from:
#     PHASE=prep WHEELS=<folder with the six wheels> bash benchmarks/run_gpu_kernels.sh
#       (without WHEELS it pip-downloads the pinned versions into .whl_kernels_dl/) -> .whl_k1/
#       (frontend wheel + first part of the cu13 wheel) and .whl_k2/ (second part, its md5, the
#       four small wheels), both added to .git/info/exclude; prints each call's size.
#   call 1: run(command="PHASE=stage1 bash benchmarks/run_gpu_kernels.sh", carry=[".whl_k1"], timeout_s=120)
#   call 2: run(command="PHASE=run DSV_COMMIT=<sha> bash benchmarks/run_gpu_kernels.sh", carry=[".whl_k2"], timeout_s=540)
#   or, for the cuDNN backend's tests with the frontend installed (about 60 s):
#   call 2: run(command="PHASE=tests CALL_LIMIT=150 bash benchmarks/run_gpu_kernels.sh", carry=[".whl_k2"], timeout_s=160)
# Call 2 reassembles the wheel in /tmp, checks its md5, installs all six with pip --target (their
# .pth is not read then, so dsl_packages goes on PYTHONPATH by hand) and runs the benchmark. If
# call 1's files are gone (the machine went back between the calls), call 2 exits 2 before any
# work: issue both again. megatron-core is not needed (attention.py imports megatron_dsv.ops only).
#
# Sizing (estimates, not measurements; basis: README kernel table, H100 commit 72c9fc1, and
# TARGETS.md, H200 2026-11-30): do_bench(warmup 25 ms, rep 100 ms) runs about 6t + max(t, 25) +
# max(t, 100) ms for a call of t ms. S=64k, D=128: dense fwd 57 / bwd 160 / fwd+bwd 217 ms -> 3.7 s;
# a sparse kernel at 90% (fwd 9, bwd 25, fwd+bwd 34 ms, selection 0.7) -> 1.0 s a row, 80% 1.6 s,
# 95-98% 0.7-0.8 s: 4.1 s per kernel over four sparsities, three timed kernels (ours, cuDNN, Flex
# 128) -> 16 s; D=64 (dense 143 ms; no cuDNN block-sparse: D=128 only) 12 s; S=32k and 16k at
# the do_bench floor (about 0.6 s a row) 16 s each -> about 60 s of timing. One-off costs: cuDNN's
# JIT 8.9 s per compiled shape (up to 3 with D=128) 27 s; our Triton compiles 30-60 s; fp32
# reference checks (two indices per shape, first sparsity) about 1-2 s each, 20 s; FlexAttention
# compiles per (S, D, block) under dynamic=False, guessed 20-40 s each for 6 shapes at 128x128
# (120-240 s), and 64x64 fails its backward compile on SM90 (torch 2.11's default backward tiles
# exceed the block; TARGETS.md saw it fail) once per head dim (not retried at other S), about 50 s;
# install and start-up 30 s. Total 350-470 s against the 540 s call: attention.py gets a time
# budget of (540 - elapsed - 100) s, past which no kernel starts and each one not run is a
# 'skipped' row (64k first, so the target rows come first), and a hard timeout 20 s before the
# end so the report is still written (the JSON is rewritten atomically after every row).
set -uo pipefail
PHASE=${PHASE:?set PHASE=prep (here), stage1, run or tests (device)}
STAGE=/tmp/dsv_kernels_stage
SITE=/tmp/dsv_kernels_site
CU13=nvidia_cutlass_dsl_libs_cu13
PINS="nvidia-cudnn-frontend==1.32.0 nvidia-cutlass-dsl==4.8.1 nvidia-cutlass-dsl-libs-base==4.8.1
nvidia-cutlass-dsl-libs-core==4.8.1 nvidia-cutlass-dsl-libs-cu13==4.8.1 apache-tvm-ffi==0.1.15.post2"
CARRY_LIMIT=$((64 * 1024 * 1024))

case "$PHASE" in
prep)
    cd "$(git rev-parse --show-toplevel)" || exit 1
    WHEELS=${WHEELS:-.whl_kernels_dl}
    exclude=$(git rev-parse --git-path info/exclude)
    for d in .whl_k1 .whl_k2 .whl_kernels_dl; do
        grep -qx "/$d/" "$exclude" 2>/dev/null || echo "/$d/" >> "$exclude"
    done
    if ! compgen -G "$WHEELS/${CU13}-*.whl" > /dev/null; then
        # shellcheck disable=SC2086
        python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64 \
            --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d "$WHEELS" $PINS || exit 1
    fi
    big=$(compgen -G "$WHEELS/${CU13}-*.whl" | head -1)
    front=$(compgen -G "$WHEELS/nvidia_cudnn_frontend-*.whl" | head -1)
    small=$(ls "$WHEELS"/*.whl | grep -v -e "/${CU13}-" -e "/nvidia_cudnn_frontend-")
    n_small=$(echo "$small" | grep -c .)
    if [ -z "$big" ] || [ -z "$front" ] || [ "$n_small" -ne 4 ]; then
        echo "need the six wheels of: $PINS (one version each) in $WHEELS; found: $(ls "$WHEELS")" >&2
        exit 1
    fi
    rm -rf .whl_k1 .whl_k2 && mkdir -p .whl_k1 .whl_k2
    size() { stat -c %s "$@" | awk '{s += $1} END {print s}'; }
    big_b=$(size "$big"); front_b=$(size "$front"); small_b=$(size $small)
    # part 1 rides with the frontend wheel, part 2 with the four small ones: equal calls
    part1=$(( (big_b + small_b - front_b) / 2 ))
    name=$(basename "$big")
    head -c "$part1" "$big" > ".whl_k1/$name.part1"
    tail -c +"$((part1 + 1))" "$big" > ".whl_k2/$name.part2"
    (cd "$(dirname "$big")" && md5sum "$name") > .whl_k2/cu13.md5
    cp "$front" .whl_k1/ && cp $small .whl_k2/
    cat .whl_k1/"$name".part1 .whl_k2/"$name".part2 | md5sum | grep -q "$(cut -d' ' -f1 .whl_k2/cu13.md5)" || {
        echo "split parts do not reassemble to $name" >&2; exit 1; }
    tree_b=$(git ls-files -co --exclude-standard -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
    rc=0
    for d in .whl_k1 .whl_k2; do
        total=$(( tree_b + $(size "$d"/*) ))
        echo "call with $d: working tree $((tree_b / 1024 / 1024)) MiB + $d $(( $(size "$d"/*) / 1024 / 1024 )) MiB = $((total / 1024 / 1024)) MiB (limit 64 MiB)"
        [ "$total" -lt "$CARRY_LIMIT" ] || { echo "  over the carry limit" >&2; rc=1; }
    done
    exit $rc
    ;;
stage1)
    compgen -G ".whl_k1/*.part1" > /dev/null || { echo "no .whl_k1/*.part1: run PHASE=prep here and carry .whl_k1" >&2; exit 1; }
    rm -rf "$STAGE" && mkdir -p "$STAGE" && cp .whl_k1/* "$STAGE"/ || exit 1
    ls -l "$STAGE"
    echo "staged; issue PHASE=run with carry [.whl_k2] now"
    ;;
run|tests)
    START=$SECONDS
    CALL_LIMIT=${CALL_LIMIT:-540}
    if ! compgen -G "$STAGE/*.part1" > /dev/null; then
        echo "no $STAGE/*.part1 on this machine (it was given back after PHASE=stage1): issue both calls again, back to back" >&2
        exit 2
    fi
    name=$(cut -d' ' -f3 .whl_k2/cu13.md5)
    cat "$STAGE/$name.part1" ".whl_k2/$name.part2" > "$STAGE/$name" || exit 3
    echo "$(cut -d' ' -f1 .whl_k2/cu13.md5)  $STAGE/$name" | md5sum -c || { echo "md5 mismatch after reassembly" >&2; exit 3; }
    rm -rf "$SITE"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" \
        "$STAGE"/*.whl .whl_k2/*.whl || exit 4
    export PYTHONPATH=$PWD:$SITE:$SITE/nvidia_cutlass_dsl/dsl_packages PYTHONUNBUFFERED=1
    export DSV_COMMIT=${DSV_COMMIT:-unknown} DSV_GIT_COMMIT=${DSV_COMMIT:-unknown}
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
    python3 -c "import cudnn, torch; from megatron_dsv.ops.sparse_attention.cudnn import cudnn_import_error as e; \
print('cudnn frontend', cudnn.__version__, 'backend', cudnn.backend_version(), 'torch', torch.__version__, 'import error', e())" \
        2>&1 | tail -3 | tee -a "$OUT/gpu.txt"
    if [ "$PHASE" = tests ]; then
        # the cuDNN backend's tests with the frontend installed: GPU (bf16) and the CPU-marked ones,
        # which run on CUDA when it is there
        timeout --kill-after=10 $(( CALL_LIMIT - (SECONDS - START) - 15 )) python3 -m pytest -q -p no:cacheprovider \
            tests/gpu/test_cudnn_backend.py tests/ops/test_cudnn_backend_cpu.py > "$OUT/cudnn_tests.log" 2>&1
        rc=$?
        echo "cudnn tests rc=$rc after $((SECONDS - START)) s"; tail -15 "$OUT/cudnn_tests.log"
        exit $rc
    fi
    json="$OUT/attention_h200_$(date -u +%Y%m%d)_${DSV_COMMIT:0:7}.json"
    budget=$(( CALL_LIMIT - (SECONDS - START) - ${MARGIN_S:-100} ))
    hard=$(( CALL_LIMIT - (SECONDS - START) - 20 ))
    echo "benchmark: time budget ${budget} s, hard limit ${hard} s"
    timeout "$hard" python3 benchmarks/attention.py --seqlens 65536,32768,16384 --head-dims 128,64 \
        --sparsities 0.8,0.9,0.95,0.98 --kv-blocks 64 --group-sizes 64 --flex-blocks 128,64 \
        --time-budget-s "$budget" --out "$json" ${BENCH_ARGS:-} > "$OUT/bench.log" 2>&1
    echo "bench rc=$? after $((SECONDS - START)) s"
    grep -v -i warn "$OUT/bench.log" | grep -v "^\s*|" | tail -40
    if [ -f "$json" ]; then
        python3 benchmarks/attention_report.py "$json" --out "$OUT/attention_report.md"
    else
        echo "no $json: the benchmark wrote no row (see bench.log)" >&2
        exit 5
    fi
    ;;
*)
    echo "PHASE must be prep, stage1, run or tests, got $PHASE" >&2
    exit 1
    ;;
esac
