"""Sparse attention kernels vs cuDNN dense and the block-sparse peers, on one GPU, in one run.

Per (S, D), on the same q/k/v (bf16, B=1, H=16 unless told):
- cuDNN SDPA dense (``SDPBackend.CUDNN_ATTENTION``), fwd, bwd and fwd+bwd: the denominator;
- ours: selection (``select_topk``, Triton) and our sparse attention (Triton) at each key-unit size
  (``--kv-blocks``; 1 = token) and query group (``--group-sizes``);
- NVIDIA cuDNN frontend's block-sparse attention (``--cudnn-block-sparse``, on by default) on the
  SAME SparseIndex as ours (64-token groups, 64-key blocks). Not importable, or a case it does not
  serve (``cudnn_supported``: SM90, bf16, D=128, MHA), is a row that says why;
- FlexAttention at each block size of ``--flex-blocks`` (default 128,64): 64x64 on the same
  SparseIndex as ours, larger blocks on random blocks at the same density. A compile failure is a
  row with the error's first line (recorded once per head dim and block: torch picks its tiles
  by head dim and dtype, not by length).
At the first sparsity of each (S, D), before anything is timed, every sparse kernel's first
forward and backward (JIT compilation included, kept out of the timings) are timed on the host
clock, and its outputs checked against the fp32 reference (out and LSE on 2 heads, dq/dk/dv on
head 0); peers on our index also against ours (``vs_ours``). Then ``triton.testing.do_bench``
medians. Speedup = cuDNN dense fwd+bwd / (selection + sparse fwd+bwd), every column with our
64x64 selection time (the index any block-sparse kernel needs); TF/s count 4*pairs*D FLOPs
forward (x3.5 fwd+bwd) of the pairs each kernel computes.

    python benchmarks/attention.py --seqlens 65536 --head-dims 128 --sparsities 0.9,0.95 --kv-blocks 64

Writes ``benchmarks/results/attention_<gpu>_<time>.json`` (or ``--out``) and prints the table of
``benchmarks/attention_report.py``. ``--device cpu`` (with ``TRITON_INTERPRET=1``) runs the same
path at tiny sizes as a smoke test; its times mean nothing.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.json_out import ResultLog  # noqa: E402
from benchmarks.sparse_peers import (  # noqa: E402
    DTYPES, FlexPeer, ReferenceCheck, Timer, cudnn_fn, cudnn_status, dense_kind, dense_sdpa, env_info, first_calls,
    first_line, float_list, fwd_bwd_fns, int_list, random_block_index, time_attention,
)
from megatron_dsv.ops.options import KernelOptions  # noqa: E402
from megatron_dsv.ops.selection import group_proxies, pool_keys, select_topk  # noqa: E402
from megatron_dsv.ops.selection import triton as sel_triton  # noqa: E402
from megatron_dsv.ops.sparse_attention import sparse_attention  # noqa: E402
from megatron_dsv.ops.sparse_attention import triton as sa_triton  # noqa: E402
from megatron_dsv.ops.sparse_index import SparseIndex, k_from_sparsity  # noqa: E402

# The block of cuDNN's block-sparse kernels and of the index every peer shares with ours.
PEER_BLOCK = 64
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seqlens", type=int_list, default=[16384, 32768, 65536])
    p.add_argument("--head-dims", type=int_list, default=[64, 128])
    p.add_argument("--sparsities", type=float_list, default=[0.8, 0.9, 0.95, 0.98])
    p.add_argument("--kv-blocks", type=int_list, default=[1, 64], help="key-unit sizes to time (1 = token)")
    p.add_argument("--group-sizes", type=int_list, default=[64], help="query group sizes G")
    p.add_argument("--rank", type=int, default=16, help="low-rank predictor dimension r")
    p.add_argument("--cudnn-block-sparse", action=argparse.BooleanOptionalAction, default=True,
                   help="time cuDNN's block-sparse attention on our index (a row says why where it cannot run)")
    p.add_argument("--flex-blocks", type=int_list, default=[128, 64],
                   help="FlexAttention block sizes to time ('' = none)")
    p.add_argument("--flex-head-dims", type=int_list, default=None, help="head dims to time flex at (default all)")
    p.add_argument("--atomic-compare", action="store_true", help="also time atomic dk/dv at block granularity")
    p.add_argument("--tune", action="store_true",
                   help="per (D, kv_block), at the first S and sparsity, pick the fastest tile/backward variant")
    p.add_argument("--sweep", action="store_true",
                   help="time tile variants of each kernel at the first sparsity and exit")
    p.add_argument("--sweep-kernels", type=lambda text: [x for x in text.split(",") if x], default=["fwd", "dq", "dkdv", "fused"],
                   help="with --sweep: the kernels whose variants are timed (of fwd, dq, dkdv, fused)")
    p.add_argument("--profile-trace", action="store_true",
                   help="torch.profiler at the first shape: kernel time vs timed time of selection, fwd, bwd; exit")
    p.add_argument("--profile-once", action="store_true",
                   help="run selection + fwd + bwd once at the first shape (for ncu) and exit")
    p.add_argument("--profile-dense", action="store_true",
                   help="with --profile-once: also one cuDNN dense fwd + bwd on the same inputs")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--sweep-pick", type=parse_sweep_pick, default={},
                   help="with --sweep: only these SWEEP entries, by index, e.g. 'fwd=0,15;dq=0,13' "
                        "(a kernel not named keeps all of its entries)")
    p.add_argument("--check-variants", action="store_true",
                   help="with --sweep: check every variant against the fp32 reference before timing it "
                        "(a variant that fails is recorded, not timed)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--time-budget-s", type=float, default=0.0,
                   help="stop starting kernels after this many seconds (0 = no limit); each one not run is a "
                        "'skipped' row, so a device call never dies mid-run")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: smoke run of the same path under TRITON_INTERPRET=1 at tiny sizes")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/attention_<gpu>_<time>.json)")
    args = p.parse_args(argv)
    if args.device == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        p.error("--device cpu runs our Triton kernels in the interpreter: set TRITON_INTERPRET=1")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("no CUDA device; use --device cpu with TRITON_INTERPRET=1 for the smoke path")
    unknown = sorted(set(args.sweep_kernels) - set(SWEEP))
    if unknown:
        p.error(f"--sweep-kernels {unknown}: use some of {', '.join(SWEEP)}")
    bad = [b for b in args.flex_blocks if b < 16 or b & (b - 1)]
    if bad:
        p.error(f"--flex-blocks {bad}: FlexAttention blocks must be powers of two >= 16 (e.g. 128,64)")
    return args


def bench(fn):
    return Timer("cuda", ARGS.warmup, ARGS.rep)(fn)


def check_correctness(q, k, v, do, index: SparseIndex, heads=2, options=None):
    """Errors of our kernel (variant ``options``) vs the fp32 reference (see ``ReferenceCheck``)."""
    ref = ReferenceCheck(q, k, v, do, index, heads=heads)
    res = ref.check(lambda q_, k_, v_: sparse_attention(q_, k_, v_, index, backend="triton", options=options), q, k, v)
    del ref
    torch.cuda.empty_cache()
    return res


def check_variant(q, k, v, do, index: SparseIndex, options: KernelOptions) -> dict:
    """:func:`check_correctness` of a sweep variant; a variant that does not compile or run is a
    failed check (``ok`` False, the error's first line), so it cannot end the sweep."""
    try:
        return check_correctness(q, k, v, do, index, options=options)
    except Exception as err:
        return {"ok": False, "error": first_line(err)}


SWEEP = {
    # Tile overrides (KernelOptions.tune; {} = the defaults) plus variant flags: "contig": False
    # forces the per-token gather (KernelOptions.contig_loads) to measure what the contiguous
    # key-block tiles gain; "tma": True loads the streamed tiles through tensor descriptors
    # (KernelOptions.tma, issue 15), next to the same tiles without it; an entry without "tma" runs
    # the pointer loads (tma=False), whatever the library's default.
    "fwd": [dict(), dict(tma=True),
            dict(BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_N=64, num_warps=4, num_stages=3, contig=False),
            dict(BLOCK_N=64, num_warps=4, num_stages=3, tma=True),
            dict(BLOCK_N=64, num_warps=4, num_stages=2), dict(BLOCK_N=64, num_warps=4, num_stages=4),
            dict(BLOCK_N=64, num_warps=4, num_stages=4, tma=True),
            dict(BLOCK_N=64, num_warps=8, num_stages=3), dict(BLOCK_N=64, num_warps=8, num_stages=3, tma=True),
            dict(BLOCK_N=32, num_warps=4, num_stages=3),
            dict(BLOCK_N=128, num_warps=8, num_stages=3),
            # Triton 3.6 gives the descriptor loads 2 buffers at num_stages 2-4 and issues the next
            # tile's load after the tile's last dot, so its L2 latency is exposed every iteration
            # (the H200 ncu profile at 733493e: SM 47%, 2 warps per scheduler, 0.49 eligible);
            # 5 stages give 3 buffers (next-but-one tile in flight), 7 stages 4 (ttgir compiled
            # for sm_90 on the CPU): 64-key tiles 115 KB of shared memory, 2 programs per SM;
            # 32-key tiles 66 / 82 KB.
            dict(BLOCK_N=64, num_warps=4, num_stages=5, tma=True), dict(BLOCK_N=32, num_warps=4, num_stages=5, tma=True),
            dict(BLOCK_N=32, num_warps=4, num_stages=7, tma=True)],
    "dq": [dict(), dict(tma=True),
           dict(BLOCK_N=32, num_warps=4, num_stages=2), dict(BLOCK_N=32, num_warps=4, num_stages=2, contig=False),
           dict(BLOCK_N=64, num_warps=4, num_stages=2),
           dict(BLOCK_N=64, num_warps=4, num_stages=3), dict(BLOCK_N=64, num_warps=4, num_stages=3, tma=True),
           dict(BLOCK_N=64, num_warps=8, num_stages=2), dict(BLOCK_N=32, num_warps=4, num_stages=3),
           dict(BLOCK_N=64, num_warps=8, num_stages=3), dict(BLOCK_N=64, num_warps=8, num_stages=3, tma=True),
           # 3 descriptor buffers (see "fwd"): 32-key tiles 82 KB, 2 programs per SM; 64-key 131 KB, one
           dict(BLOCK_N=32, num_warps=4, num_stages=5, tma=True), dict(BLOCK_N=64, num_warps=4, num_stages=5, tma=True)],
    "dkdv": [dict(), dict(tma=True),
             # KernelOptions.dkdv_transposed (absent: the default, transposed for key tiles under 64
             # with 64-row query tiles)
             dict(tma=True, trans=False), dict(tma=True, trans=True),
             dict(num_warps=4, num_stages=2), dict(num_warps=8, num_stages=2), dict(num_warps=8, num_stages=2, tma=True),
             dict(num_warps=4, num_stages=3), dict(num_warps=4, num_stages=3, tma=True),
             dict(num_warps=8, num_stages=3), dict(num_warps=4, num_stages=1), dict(BLOCK_M=32, num_warps=4, num_stages=2),
             dict(BLOCK_M=32, num_warps=4, num_stages=3), dict(BLOCK_M=32, num_warps=4, num_stages=3, tma=True),
             # 3 descriptor buffers of Q/dO (see "fwd"): 32-row query tiles 82 KB; 64-row 131 KB, one program per SM
             dict(BLOCK_M=32, num_warps=4, num_stages=5, tma=True), dict(num_warps=4, num_stages=5, tma=True)],
    # key-major dk/dv with dq by fp32 atomics in the same kernel (no separate dq kernel)
    "fused": [dict(num_warps=4, num_stages=2)],
}
# Selection kernels the sweep times at each sparsity: the two one-program kernels (the resident one
# falls back to streaming above KernelOptions.select_resident_max_scores; 16 x 4096 scores, key
# blocks of 16 at 64k, ran out of shared memory on the H200 at 733493e).
SELECTION_VARIANTS = {
    "resident": KernelOptions(),
    "stream": KernelOptions(select_fused_kind="stream"),
}
# SWEEP keys that pick a KernelOptions field rather than a tile: key -> (field, value when absent)
SWEEP_FLAGS = {"contig": ("contig_loads", True), "tma": ("tma", False), "trans": ("dkdv_transposed", None)}


def parse_sweep_pick(text: str) -> dict:
    """``'fwd=0,15;dq=0,13'`` -> ``{'fwd': [0, 15], 'dq': [0, 13]}``, each index checked against SWEEP."""
    pick = {}
    for part in filter(None, text.split(";")):
        kind, _, ids = part.partition("=")
        if kind not in SWEEP:
            raise argparse.ArgumentTypeError(f"--sweep-pick: unknown kernel {kind!r}; use some of {', '.join(SWEEP)}")
        pick[kind] = [int(i) for i in ids.split(",") if i]
        bad = [i for i in pick[kind] if not 0 <= i < len(SWEEP[kind])]
        if bad:
            raise argparse.ArgumentTypeError(f"--sweep-pick {kind}: no entries {bad}; it has 0..{len(SWEEP[kind]) - 1}")
    return pick


def sweep_options(kind: str, variant: dict) -> KernelOptions:
    """The KernelOptions a SWEEP entry of kernel ``kind`` names (flags as fields, the rest as tiles)."""
    tiles = {key: value for key, value in variant.items() if key not in SWEEP_FLAGS}
    flags = {field: variant.get(key, absent) for key, (field, absent) in SWEEP_FLAGS.items()}
    return KernelOptions(fused_dq_atomic=kind == "fused", tune={"dkdv" if kind == "fused" else kind: tiles}, **flags)


def budget_spent(budget_s: float, t_start: float):
    """Why no further kernel starts: ``--time-budget-s`` (> 0) spent since ``t_start``
    (``time.perf_counter``), or None."""
    elapsed = time.perf_counter() - t_start
    if budget_s > 0 and elapsed > budget_s:
        return f"time budget of {budget_s:.0f} s spent ({elapsed:.0f} s elapsed)"
    return None


def sweep():
    """Time each kernel's tile variants (others at their defaults) on the first sparsity."""
    info = env_info("cuda")
    print(f"# sweep on {info['gpu']}", flush=True)
    out = ARGS.out or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                   f"attention_sweep_{time.strftime('%Y%m%d_%H%M%S')}.json")
    log = ResultLog("attention_sweep", info, ARGS, out)  # rewritten after every row: a cut call keeps them
    t_start = time.perf_counter()
    b, h, r = ARGS.batch, ARGS.heads, ARGS.rank
    for s in ARGS.seqlens:
        for d in ARGS.head_dims:
            q, k, v, do = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
            q_lr, k_lr = (torch.randn(b, h, s, r, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            sp = ARGS.sparsities[0]
            for kvb in ARGS.kv_blocks:
                for g in ARGS.group_sizes:
                    kh = int(k_from_sparsity(torch.tensor(sp), s // kvb))
                    for sp_sel in ARGS.sparsities:
                        kh_sel = int(k_from_sparsity(torch.tensor(sp_sel), s // kvb))
                        for kind, sel_opts in SELECTION_VARIANTS.items():
                            t_sel = bench(lambda: select_topk(
                                q_lr, k_lr, g, kh_sel, kv_block=kvb, backend="triton", options=sel_opts))
                            print(f"S={s} D={d} kvb={kvb} G={g} sp={sp_sel}: selection {kind} {t_sel:.2f} ms", flush=True)
                            log.add(dict(S=s, D=d, kv_block=kvb, G=g, sparsity=sp_sel, kernel="select_" + kind, ms=t_sel))
                    index = select_topk(q_lr, k_lr, g, kh, kv_block=kvb, backend="triton")
                    if not ARGS.no_check:
                        ref_ix = select_topk(q_lr, k_lr, g, kh, kv_block=kvb, backend="reference")
                        same = (index.kv_idx == ref_ix.kv_idx).float().mean().item()
                        chk = check_correctness(q, k, v, do, index)
                        chk["select_same_as_reference"] = same
                        print(f"  check: {chk}", flush=True)
                        log.add(dict(S=s, D=d, kv_block=kvb, G=g, sparsity=sp, kernel="check", **chk))
                        # the descriptor-load variant has no GPU test run behind it yet: check it too
                        chk = check_variant(q, k, v, do, index, KernelOptions(tma=True))
                        print(f"  check tma: {chk}", flush=True)
                        log.add(dict(S=s, D=d, kv_block=kvb, G=g, sparsity=sp, kernel="check_tma", **chk))
                        del ref_ix
                    if kvb % 16 == 0:
                        t_tr = bench(lambda: sa_triton.transpose_index(index, h))
                        print(f"  transpose_index {t_tr:.2f} ms", flush=True)
                        log.add(dict(S=s, D=d, kv_block=kvb, G=g, sparsity=sp, kernel="transpose_index", ms=t_tr))

                    for kind, cfg in sweep_order(kvb, ARGS.sweep_kernels, ARGS.sweep_pick):
                        why = budget_spent(ARGS.time_budget_s, t_start)
                        if why:
                            print(f"  {kind} {cfg}: skipped, {why}", flush=True)
                            log.add(dict(S=s, D=d, kv_block=kvb, G=g, sparsity=sp, kernel=kind, cfg=cfg, skipped=why))
                            continue
                        opts = sweep_options(kind, cfg)
                        split, chk = {}, None
                        if ARGS.check_variants:
                            chk = check_variant(q, k, v, do, index, opts)
                            print(f"  {kind} {cfg}: check {chk}", flush=True)
                            if not chk["ok"]:
                                log.add(dict(S=s, D=d, kv_block=kvb, G=g, sparsity=sp, kernel=kind, cfg=cfg, check=chk))
                                continue
                        try:
                            fwd, setup_bwd, bwd, _ = fwd_bwd_fns(_attn(index, opts), q, k, v, do)
                            if kind == "fwd":
                                t = bench(fwd)
                            else:
                                setup_bwd()
                                t = bench(bwd)
                                # KernelOptions.tma reaches the dq and the dk/dv kernel alike: each
                                # kernel's device time says which of them a variant helps
                                split = {name: round(ms, 3) for name, (ms, _) in _kernel_table(bwd)[0].items()
                                         if name.startswith(("_bwd_dq_kernel", "_bwd_dkdv_kernel"))}
                        except Exception as err:
                            t = float("nan")
                            print(f"    {kind} {cfg}: failed {type(err).__name__}: {str(err)[:200]}", flush=True)
                        print(f"  {kind} {cfg}: {'fwd' if kind == 'fwd' else 'bwd'} {t:.2f} ms {split or ''}", flush=True)
                        log.add(dict(S=s, D=d, kv_block=kvb, G=g, sparsity=sp, kernel=kind, cfg=cfg, ms=t,
                                     kernels_ms=split, **({"check": chk} if chk else {})))
                        lost = cuda_context_lost()
                        if lost:
                            # an illegal memory access poisons the process's CUDA context: every later
                            # variant would fail too (the transposed dk/dv at num_stages 1, c21a846)
                            print(f"  sweep ended: {lost}", flush=True)
                            log.add(dict(S=s, D=d, kv_block=kvb, G=g, sparsity=sp, kernel="aborted",
                                         reason=f"CUDA context lost after {kind} {cfg}: {lost}"))
                            print(f"wrote {out}")
                            return
                    del index
                    torch.cuda.empty_cache()
            del q, k, v, do
            torch.cuda.empty_cache()
    print(f"wrote {out}")


def cuda_context_lost():
    """Why the CUDA context no longer runs work (the first line of the error a synchronize raises),
    or None."""
    try:
        torch.cuda.synchronize()
        torch.zeros(1, device="cuda").add_(1).item()
    except Exception as err:  # torch.AcceleratorError and kin: any error here means no more GPU work
        return first_line(err)
    return None


def sweep_order(kvb: int, kernels=tuple(SWEEP), pick=None):
    """``(kind, variant)`` of SWEEP for ``kernels``, round-robin over them (first variant of each,
    then the second, ...), so a sweep cut by ``--time-budget-s`` still has each kernel's defaults and
    its ``tma`` twin (the first two entries of every list); key-major kernels need kv_block % 16 == 0.
    ``pick``: kernel -> the indices of its SWEEP entries to keep (``--sweep-pick``; others: all)."""
    pick = pick or {}
    lists = [(kind, [variants[i] for i in pick[kind]] if kind in pick else variants)
             for kind, variants in SWEEP.items()
             if kind in kernels and not (kind in ("dkdv", "fused") and kvb % 16)]
    for i in range(max((len(v) for _, v in lists), default=0)):
        for kind, variants in lists:
            if i < len(variants):
                yield kind, variants[i]


TUNE_FWD = [dict(BLOCK_N=64, num_warps=4, num_stages=4), dict(BLOCK_N=64, num_warps=4, num_stages=3),
            dict(BLOCK_N=128, num_warps=8, num_stages=3), dict(BLOCK_N=128, num_warps=4, num_stages=3)]
# Fused dq-by-atomics (63.5 ms vs 24.6 ms key-major at S=64k, D=128, 90%) and 8-warp dk/dv (39.9 ms)
# are left out: they lost by far in the sweep of 2026-11 (--sweep still times them).
# dq and dk/dv interleaved in one launch lost too (28.5 vs 24.5 ms, pass 4) and was removed.
TUNE_BWD_BLOCK = [dict(dq=dict(BLOCK_N=64, num_warps=4, num_stages=2), dkdv=dict(num_warps=4, num_stages=2)),
                  dict(dq=dict(BLOCK_N=64, num_warps=4, num_stages=2), dkdv=dict(num_warps=4, num_stages=3)),
                  dict(dq=dict(BLOCK_N=32, num_warps=4, num_stages=2), dkdv=dict(num_warps=4, num_stages=3))]
TUNE_BWD_TOKEN = [dict(BLOCK_N=32, num_warps=4, num_stages=2), dict(BLOCK_N=64, num_warps=4, num_stages=2),
                  dict(BLOCK_N=64, num_warps=8, num_stages=2)]


def _attn(index, options):
    """``attn(q, k, v) -> out`` of our Triton kernels over ``index``, kernel variant ``options``."""
    def attn(q_, k_, v_):
        return sparse_attention(q_, k_, v_, index, backend="triton", options=options)[0]
    return attn


def tune(index, q, k, v, do, kvb):
    """Fastest forward tiles and backward variant for this (D, kv_block); returns the choice."""
    def t_fwd(c):
        return bench(fwd_bwd_fns(_attn(index, KernelOptions(tune={"fwd": c})), q, k, v, do)[0])

    def t_bwd(tiles):
        # the variant is fixed when the forward runs (autograd keeps it for the backward)
        _, setup_bwd, bwd, _ = fwd_bwd_fns(_attn(index, KernelOptions(tune={"fwd": best_f, **tiles})), q, k, v, do)
        setup_bwd()
        return bench(bwd)

    best_f = min(TUNE_FWD, key=t_fwd)
    if kvb % 16 == 0:
        times = [t_bwd(v_) for v_ in TUNE_BWD_BLOCK]
        best = TUNE_BWD_BLOCK[times.index(min(times))]
        choice = {"fwd": best_f, "dq": best["dq"], "dkdv": best["dkdv"], "bwd_variants_ms": times}
    else:
        times = [t_bwd({"dq": c}) for c in TUNE_BWD_TOKEN]
        choice = {"fwd": best_f, "dq": TUNE_BWD_TOKEN[times.index(min(times))], "bwd_variants_ms": times}
    return choice


def tuned_options(choice) -> KernelOptions:
    """The kernel variant a :func:`tune` choice (or a recorded one) names."""
    return KernelOptions(
        fused_dq_atomic=bool(choice.get("fused_dq_atomic", False)),
        tune={kind: dict(choice[kind]) for kind in ("fwd", "dq", "dkdv") if kind in choice},
    )


def profile_once():
    """One selection + forward + backward at the first (S, D, sparsity, kv_block, G), for ncu, then
    (--profile-dense) one cuDNN dense forward + backward on the same q, k, v: the denominator's
    kernels under the same counters. With --out, each of our compiled kernels' registers, spills and
    shared memory as ptxas reported them (what the H100 profile named for dk/dv: 255 registers)."""
    b, h, r, s, d = ARGS.batch, ARGS.heads, ARGS.rank, ARGS.seqlens[0], ARGS.head_dims[0]
    kvb, g, sp = ARGS.kv_blocks[0], ARGS.group_sizes[0], ARGS.sparsities[0]
    q, k, v, do = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q_lr, k_lr = (torch.randn(b, h, s, r, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kh = int(k_from_sparsity(torch.tensor(sp), s // kvb))
    index = select_topk(q_lr, k_lr, g, kh, kv_block=kvb, backend="triton")
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = sparse_attention(qg, kg, vg, index, backend="triton")[0]
    torch.autograd.grad(out, (qg, kg, vg), do)
    if ARGS.profile_dense:
        out = dense_sdpa(qg, kg, vg)
        torch.autograd.grad(out, (qg, kg, vg), do)
    torch.cuda.synchronize()
    print(f"profiled S={s} D={d} kvb={kvb} G={g} sp={sp} pairs={index.computed_pairs()}"
          + (" + cuDNN dense" if ARGS.profile_dense else ""))
    if ARGS.out:
        rows = compiled_kernel_resources((sel_triton, sa_triton))
        for row in rows:
            print(f"  {row['kernel']}: {row['n_regs']} registers, {row['n_spills']} spilled, "
                  f"{row['shared']} B shared, {row['num_warps']} warps, {row['num_stages']} stages")
        log = ResultLog("kernel_resources", env_info("cuda"), ARGS, ARGS.out)
        for row in rows:
            log.add(dict(S=s, D=d, kv_block=kvb, G=g, sparsity=sp, **row))


def compiled_kernel_resources(modules) -> list:
    """Registers, spills and shared memory of every kernel of ``modules`` compiled in this process
    (Triton's per-device caches: one row per specialisation)."""
    rows = []
    for module in modules:
        for name in sorted(vars(module)):
            fn = getattr(module, name)
            for kernel_cache, *_ in getattr(fn, "device_caches", {}).values():
                for compiled in kernel_cache.values():
                    compiled._init_handles()  # loads the binary, which is what reads ptxas's counts
                    meta = compiled.metadata
                    rows.append(dict(kernel=name, n_regs=compiled.n_regs, n_spills=compiled.n_spills,
                                     shared=meta.shared, num_warps=meta.num_warps, num_stages=meta.num_stages))
    return rows


def _kernel_table(fn, iters=5):
    """Per-call device time of each kernel ``fn`` launches and the host sync calls it makes."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
    kernels, syncs = {}, {}
    for e in prof.key_averages():
        dev_us = getattr(e, "device_time_total", None)
        if dev_us is None:
            dev_us = e.cuda_time_total
        if e.key.startswith(("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaMemcpy", "cudaEventSynchronize")):
            syncs[e.key] = e.count / iters
        elif dev_us > 0 and e.device_type == torch.autograd.DeviceType.CUDA:
            kernels[e.key[:90]] = (dev_us / iters / 1e3, e.count / iters)
    return kernels, syncs


def profile_trace():
    """Selection, forward and backward at the first shape: the timed (do_bench) time next to the
    sum of their kernels' device times, so launch gaps, host syncs and small glue ops show up."""
    info = env_info("cuda")
    b, h, r, s, d = ARGS.batch, ARGS.heads, ARGS.rank, ARGS.seqlens[0], ARGS.head_dims[0]
    kvb, g, sp = ARGS.kv_blocks[0], ARGS.group_sizes[0], ARGS.sparsities[0]
    print(f"# profile on {info['gpu']} S={s} D={d} kvb={kvb} G={g} sp={sp}", flush=True)
    q, k, v, do = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(4))
    q_lr, k_lr = (torch.randn(b, h, s, r, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    kh = int(k_from_sparsity(torch.tensor(sp), s // kvb))
    index = select_topk(q_lr, k_lr, g, kh, kv_block=kvb, backend="triton")

    def attn(q_, k_, v_):
        return sparse_attention(q_, k_, v_, index, backend="triton")[0]

    fwd, setup_bwd, bwd, fwd_bwd = fwd_bwd_fns(attn, q, k, v, do)
    setup_bwd()

    phases = {
        "select": lambda: select_topk(q_lr, k_lr, g, kh, kv_block=kvb, backend="triton"),
        "fwd": fwd, "bwd": bwd, "fwd_bwd": fwd_bwd,
        "transpose_index": lambda: sa_triton.transpose_index(index, h),
        "transpose_index_sort": lambda: sa_triton._transpose_index_sort(index, h),
        "pool_triton": lambda: (sel_triton._pool(q_lr, g), sel_triton._pool(k_lr, kvb)),
        "pool_torch": lambda: (group_proxies(q_lr, g).contiguous(), pool_keys(k_lr, kvb).contiguous()),
    }
    rows = []
    for name, fn in phases.items():
        try:
            t = bench(fn)
            kernels, syncs = _kernel_table(fn)
        except Exception as err:  # report and go on: one broken phase should not hide the others
            print(f"{name}: failed {type(err).__name__}: {str(err)[:300]}", flush=True)
            continue
        k_sum = sum(ms * 1.0 for ms, _ in kernels.values())
        print(f"{name}: timed {t:.3f} ms, kernels {k_sum:.3f} ms, gap {t - k_sum:.3f} ms, syncs {syncs}", flush=True)
        for kn, (ms, cnt) in sorted(kernels.items(), key=lambda x: -x[1][0]):
            print(f"    {ms:8.3f} ms x{cnt:.0f}  {kn}", flush=True)
        rows.append(dict(kind="profile", phase=name, S=s, D=d, kv_block=kvb, G=g, sparsity=sp, timed_ms=t,
                         kernel_ms=k_sum, syncs=syncs, kernels={kn: ms for kn, (ms, _) in kernels.items()}))
    if ARGS.out:
        with open(ARGS.out, "w") as f:
            json.dump({"env": info, "args": vars(ARGS), "rows": rows}, f, indent=1)


class KernelBench:
    """One run of the kernel table: the timer, the rows so far (written after each), and the peers'
    state (the compiled FlexAttention, the (D, block) pairs it failed to compile, tuned variants)."""

    def __init__(self, args):
        self.args = args
        self.dtype = DTYPES[args.dtype]
        self.timer = Timer(args.device, args.warmup, args.rep)
        self.info = env_info(args.device)
        self.log = ResultLog("attention", self.info, args, args.out)
        self.rows, self.out = self.log.rows, self.log.path
        self.flex = FlexPeer() if args.flex_blocks else None
        self.flex_failed = {}
        self.tuned = {}
        self.t_start = time.perf_counter()

    def data(self):
        return self.log.data()

    def add(self, row, msg=None):
        self.log.add(row)
        print(msg if msg is not None else f"  {row}", flush=True)
        return row

    def budget_spent(self):
        """Why no further kernel starts (the time budget is spent), or None."""
        return budget_spent(self.args.time_budget_s, self.t_start)

    def skip(self, why, **keys):
        return self.add({**keys, "skipped": why}, f"  {keys}: skipped, {why}")

    def run(self):
        a = self.args
        print(f"# {self.info['gpu']} | torch {self.info['torch']} | triton {self.info['triton']} | "
              f"cudnn-frontend {self.info['nvidia-cudnn-frontend']} | commit {self.info['git_commit'][:12]}", flush=True)
        for s in a.seqlens:
            for d in a.head_dims:
                why = self.budget_spent()
                if why:
                    self.skip(why, kind="shape", S=s, D=d)
                    continue
                self.shape(s, d)
                if self.args.device == "cuda":
                    torch.cuda.empty_cache()
        self.log.write()
        from benchmarks.attention_report import report

        print(f"\nwrote {self.out}\n")
        print(report(self.data()))

    def shape(self, s, d):
        a, dev = self.args, self.args.device
        b, h, r = a.batch, a.heads, a.rank
        torch.manual_seed(0)
        q, k, v, do = (torch.randn(b, h, s, d, device=dev, dtype=self.dtype) for _ in range(4))
        q_lr, k_lr = (torch.randn(b, h, s, r, device=dev, dtype=self.dtype) for _ in range(2))
        dense = {"kind": dense_kind(dev), "S": s, "D": d, "sparsity": 0.0}
        time_attention(self.timer, dense_sdpa, q, k, v, do, dense)
        flops = 4.0 * b * h * s * s * d
        dense.update(fwd_tflops=flops / dense["fwd_ms"] / 1e9, fwd_bwd_tflops=3.5 * flops / dense["fwd_bwd_ms"] / 1e9)
        self.add(dense, f"S={s} D={d} {dense['kind']}: fwd {dense['fwd_ms']:.2f} ms, fwd+bwd {dense['fwd_bwd_ms']:.2f} ms")
        for i, sp in enumerate(a.sparsities):
            self.sparsity(s, d, sp, i == 0, q, k, v, do, q_lr, k_lr, dense)

    def sparsity(self, s, d, sp, first, q, k, v, do, q_lr, k_lr, dense):
        """Ours at every (kv_block, G), then the peers on the 64x64 index (ours where we ran it)."""
        a = self.args
        check = first and not a.no_check
        shared = None
        for kvb in a.kv_blocks:
            for g in a.group_sizes:
                why = self.budget_spent()
                if why:
                    self.skip(why, kind=f"dsv_kvb{kvb}", S=s, D=d, G=g, kv_block=kvb, sparsity_nominal=sp)
                    continue
                res = self.ours(s, d, sp, kvb, g, first, check, q, k, v, do, q_lr, k_lr, dense)
                if (kvb, g) == (PEER_BLOCK, PEER_BLOCK):
                    shared = res
        if not (a.cudnn_block_sparse or a.flex_blocks):
            return
        if shared is None:
            kh = int(k_from_sparsity(torch.tensor(sp), s // PEER_BLOCK))
            index = select_topk(q_lr, k_lr, PEER_BLOCK, kh, kv_block=PEER_BLOCK, backend="triton")
            t_sel = self.timer(lambda: select_topk(q_lr, k_lr, PEER_BLOCK, kh, kv_block=PEER_BLOCK, backend="triton"))
            ref = ReferenceCheck(q, k, v, do, index) if check else None
            shared = (index, t_sel, ref, None)
        index, t_sel, ref, ours_run = shared
        if a.cudnn_block_sparse:
            self.cudnn(s, d, sp, first, q, k, v, do, index, t_sel, ref, ours_run, dense)
        for blk in a.flex_blocks:
            if a.flex_head_dims is None or d in a.flex_head_dims:
                self.flex_row(s, d, sp, blk, first, check, q, k, v, do, shared, dense)

    def ours(self, s, d, sp, kvb, g, first, check, q, k, v, do, q_lr, k_lr, dense):
        """Our selection + Triton kernels; returns (index, selection ms, reference, our outputs)."""
        a = self.args
        n_units = s // kvb
        kh = int(k_from_sparsity(torch.tensor(sp), n_units))

        def select():
            return select_topk(q_lr, k_lr, g, kh, kv_block=kvb, backend="triton")

        index = select()
        t_sel = self.timer(select)
        row = {"kind": f"dsv_kvb{kvb}", "S": s, "D": d, "G": g, "kv_block": kvb, "sparsity_nominal": sp,
               "sparsity": 1.0 - kh / n_units, "K_units": kh, "select_ms": t_sel}
        if first:
            row["first_call"] = first_calls(
                lambda q_, k_, v_: sparse_attention(q_, k_, v_, index, backend="triton"), q, k, v, do, self.timer)
        opts = KernelOptions()
        if a.tune:
            key = (d, kvb, g)
            if key not in self.tuned:
                self.tuned[key] = tune(index, q, k, v, do, kvb)
                print(f"  tuned D={d} kvb={kvb} G={g}: {self.tuned[key]}", flush=True)
            opts = tuned_options(self.tuned[key])
            row["tune"] = self.tuned[key]

        def fn(q_, k_, v_):
            return sparse_attention(q_, k_, v_, index, backend="triton", options=opts)

        ref = ours_run = None
        if check:
            ref = ReferenceCheck(q, k, v, do, index)
            ours_run = ref.run(fn, q, k, v)
            row["check"] = ref.errors(*ours_run)
            print(f"  check kvb={kvb} G={g}: {row['check']}", flush=True)
        attn = _attn(index, opts)
        time_attention(self.timer, attn, q, k, v, do, row)
        fb = fwd_bwd_fns(attn, q, k, v, do)[3]
        row["peak_mem_gib"] = self.timer.peak_mem_gib(lambda: (select(), fb()))
        flops = 4.0 * index.computed_pairs() * d
        total = t_sel + row["fwd_bwd_ms"]
        row.update(
            total_ms=total,
            speedup_fwd_bwd=dense["fwd_bwd_ms"] / total,
            speedup_fwd=dense["fwd_ms"] / (t_sel + row["fwd_ms"]),
            select_frac=t_sel / total,
            fwd_tflops=flops / row["fwd_ms"] / 1e9,
            fwd_bwd_tflops=3.5 * flops / row["fwd_bwd_ms"] / 1e9,
        )
        if a.atomic_compare and kvb > 1:
            _, setup_bwd, bwd, _ = fwd_bwd_fns(_attn(index, dataclasses.replace(opts, force_atomic_dkdv=True)), q, k, v, do)
            setup_bwd()
            row["bwd_ms_atomic_dkdv"] = self.timer(bwd)
        self.add(row, (
            f"  dsv kvb={kvb} G={g} sp={row['sparsity']:.3f}: sel {t_sel:.2f} fwd {row['fwd_ms']:.2f} "
            f"bwd {row['bwd_ms']:.2f} fwd+bwd {row['fwd_bwd_ms']:.2f} ms -> x{row['speedup_fwd_bwd']:.2f} "
            f"({row['fwd_tflops']:.0f}/{row['fwd_bwd_tflops']:.0f} TF/s)"
            + (f" atomic bwd {row['bwd_ms_atomic_dkdv']:.2f}" if "bwd_ms_atomic_dkdv" in row else "")))
        return index, t_sel, ref, ours_run

    def cudnn(self, s, d, sp, first, q, k, v, do, index, t_sel, ref, ours_run, dense):
        base = {"kind": "cudnn_block_sparse", "S": s, "D": d, "sparsity_nominal": sp}
        why = self.budget_spent()
        if why:
            return self.skip(why, **base)
        status, reason = cudnn_status(q, k, index)
        base.update(status=status, reason=reason)
        if status != "ok":
            return self.add(base, f"  cuDNN block-sparse sp={sp}: {status}: {reason}")
        return self.peer(base, lambda: cudnn_fn(index), index, first, ref, ours_run, q, k, v, do, t_sel, dense)

    def flex_row(self, s, d, sp, blk, first, check, q, k, v, do, shared, dense):
        base = {"kind": f"flex_block{blk}", "S": s, "D": d, "sparsity_nominal": sp, "block": blk}
        why = self.budget_spent()
        if why:
            return self.skip(why, **base)
        failed = self.flex_failed.get((d, blk))
        if failed is not None:
            base.update(error=failed["error"], error_stage=failed["error_stage"],
                        not_retried=f"failed at S={failed['S']} with this head dim and block")
            return self.add(base, f"  flex {blk} sp={sp}: {base['error']} (not retried)")
        index, t_sel, ref, ours_run = shared
        if blk != PEER_BLOCK:
            b, h = q.shape[:2]
            kh = int(k_from_sparsity(torch.tensor(sp), s // blk))
            index = random_block_index(b, h, s, blk, kh, q.device)
            ref = ReferenceCheck(q, k, v, do, index) if check else None
            ours_run = None
        row = self.peer(base, lambda: self.flex.attention(index), index, first, ref, ours_run, q, k, v, do, t_sel, dense)
        if row.get("error_stage") in ("build", "first call"):
            self.flex_failed[(d, blk)] = {"error": row["error"], "error_stage": row["error_stage"], "S": s}
        return row

    def peer(self, row, make_fn, index, first, ref, against, q, k, v, do, t_sel, dense):
        """A block-sparse peer over ``index``: first calls and check (at the first sparsity), then
        timings; a failure is the row's ``error`` (its first line) and the stage it happened in."""
        b, h, s, d = q.shape
        row.update(sparsity=1.0 - index.computed_pairs() / (b * h * s * index.seq_len_kv),
                   K_blocks=int(index.kv_count.max()), select_ms=t_sel)
        stage = "build"
        try:
            fn = make_fn()
            stage = "first call"
            if first:
                row["first_call"] = first_calls(fn, q, k, v, do, self.timer)
            if ref is not None:
                stage = "check"
                row["check"] = ref.check(fn, q, k, v, against)
            stage = "timing"
            time_attention(self.timer, lambda q_, k_, v_: fn(q_, k_, v_)[0], q, k, v, do, row)
            flops = 4.0 * index.computed_pairs() * d
            total = t_sel + row["fwd_bwd_ms"]
            row.update(
                total_ms=total, speedup_fwd_bwd=dense["fwd_bwd_ms"] / total,
                speedup_kernel_only=dense["fwd_bwd_ms"] / row["fwd_bwd_ms"],
                speedup_fwd=dense["fwd_ms"] / (t_sel + row["fwd_ms"]),
                fwd_tflops=flops / row["fwd_ms"] / 1e9, fwd_bwd_tflops=3.5 * flops / row["fwd_bwd_ms"] / 1e9,
            )
            msg = (f"  {row['kind']} sp={row['sparsity']:.3f}: fwd {row['fwd_ms']:.2f} bwd {row['bwd_ms']:.2f} "
                   f"fwd+bwd {row['fwd_bwd_ms']:.2f} ms -> x{row['speedup_fwd_bwd']:.2f}"
                   + (f", check {row['check']}" if "check" in row else "")
                   + (f", first call {row['first_call']}" if "first_call" in row else ""))
        except Exception as err:  # record and go on: one peer's failure must not hide the other columns
            row.update(error=first_line(err), error_stage=stage)
            msg = f"  {row['kind']} sp={row['sparsity_nominal']}: failed at {stage}: {row['error']}"
        if self.args.device == "cuda":
            torch.cuda.empty_cache()
        return self.add(row, msg)


def main():
    if ARGS.profile_once:
        return profile_once()
    if ARGS.profile_trace:
        return profile_trace()
    if ARGS.sweep:
        return sweep()
    KernelBench(ARGS).run()


if __name__ == "__main__":
    ARGS = parse_args()
    main()
