"""Chunk-causal sparse attention (issue 19) against dense causal attention, on one GPU, in one run.

On the same q/k/v (bf16, B=1, H=16, D=128, S=64k unless told), chunks of ``--chunk-tokens`` tokens
(full attention inside a chunk, causal across chunks: ``CausalMask("chunk_causal", T)``), query
groups of ``--group-size`` and key blocks of ``--kv-block`` tokens:

- ``cudnn_causal_dense``: cuDNN SDPA with ``is_causal=True`` (token-causal: the dense causal kernel
  a causal model runs; about S^2/2 pairs, fewer than chunk-causal's);
- ``sdpa_chunk_causal_dense``: the DSV layer's own dense chunk-causal path, SDPA with the bool
  ``[S, S]`` keep-mask (``CausalMask.dense``), on the first backend of the layer's order (cuDNN,
  flash, efficient, math) that takes it; the row names it;
- ``flex_chunk_causal``: FlexAttention (compiled) with the chunk-causal block mask (``--flex``;
  every 128x128 block full or empty, so no token-wise mask runs); a compile error is a row;
- ``ours_block_causal_dense``: our Triton kernel over every allowed key block (K = all units;
  units past a group's chunk are skipped by the kernel), the block-causal dense baseline;
- ``ours_sparse``: our Triton kernel at each density of ``--densities``: the fraction of the
  allowed key blocks computed, over all query groups (K per head is the smallest that reaches it;
  a group with fewer allowed blocks than K computes them all). The index comes from masked
  selection (``select_topk(..., mask=)`` on the Triton backend, what a layer runs on a GPU) over
  random rank-r projections of q and k: ``selection_ms`` is the time of both, what a layer pays
  besides the kernel; ``selection_reference_ms`` the same with the PyTorch reference selection
  (what layers ran before the Triton selection took a mask), and ``selection_same_as_reference``
  the fraction of index entries the two agree on (1 up to near-ties at the K-th score).

Correctness first, before anything is timed, for each index: (a) the whole problem at
``--check-seqlen`` tokens (chunks scaled by the same factor, same groups and blocks): out and LSE on
2 heads, dq/dk/dv on head 0, against the fp32 reference (``sparse_peers.ReferenceCheck``);
(b) at the benchmarked length, the last ``--check-groups`` query groups (the most keys) of 2
heads: out, LSE and dq against the fp32 reference of those rows alone (a query row's out, LSE and
dq depend only on its own keys). A failed check is recorded and that kernel is not timed; the
script then exits 1.

Timing: ``triton.testing.do_bench`` medians of fwd, bwd and fwd+bwd. TF/s count 4*pairs*D FLOPs
forward (x3.5 fwd+bwd) of the pairs each kernel computes (allowed pairs only). Speedups are
fwd+bwd time ratios, also with the selection time added to ours.

    python benchmarks/causal_attention.py --seqlen 65536 --chunk-tokens 8192 --densities 0.9,0.1

Writes ``benchmarks/results/causal_attention_<gpu>_<time>.json`` (or ``--out``) after every row.
``--device cpu`` (with ``TRITON_INTERPRET=1``, fp32) runs the same path at tiny sizes as a smoke
test; its times mean nothing.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from typing import Optional

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.json_out import ResultLog  # noqa: E402
# CHECK_TOL: the relative error bound of every check here, the other kernel benchmarks' bound
from benchmarks.sparse_peers import (  # noqa: E402
    CHECK_TOL, DTYPES, ReferenceCheck, Timer, env_info, first_line, float_list, rel, time_attention,
)
from megatron_dsv.ops.mask import CausalMask  # noqa: E402
from megatron_dsv.ops.options import KernelOptions  # noqa: E402
from megatron_dsv.ops.selection import select_topk  # noqa: E402
from megatron_dsv.ops.sparse_attention import sparse_attention  # noqa: E402
from megatron_dsv.ops.sparse_attention.naive import sparse_attention_reference  # noqa: E402
from megatron_dsv.ops.sparse_index import SparseIndex  # noqa: E402

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seqlen", type=int, default=65536)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk-tokens", type=int, default=8192,
                   help="tokens per causal chunk (a video chunk of f frames of H x W patches: f*H*W)")
    p.add_argument("--group-size", type=int, default=64, help="query group G (tokens)")
    p.add_argument("--kv-block", type=int, default=64, help="key block (tokens)")
    p.add_argument("--densities", type=float_list, default=[0.9, 0.1],
                   help="fractions of the allowed key blocks computed (0.9: the issue's case; 0.1: 90%% sparse)")
    p.add_argument("--rank", type=int, default=16, help="low-rank dimension of the selection's inputs")
    p.add_argument("--check-seqlen", type=int, default=8192, help="length of the whole-problem check")
    p.add_argument("--check-groups", type=int, default=8, help="query groups checked at the full length")
    p.add_argument("--no-check", action="store_true", help="skip the correctness checks")
    p.add_argument("--fwd-stages", type=int, default=None,
                   help="our forward's pipeline stages (KernelOptions.tune; default: the library's choice)")
    p.add_argument("--flex", action=argparse.BooleanOptionalAction, default=None,
                   help="time FlexAttention's chunk-causal block mask (default: on CUDA)")
    p.add_argument("--sdpa-mask", action=argparse.BooleanOptionalAction, default=True,
                   help="time the layer's dense SDPA with the [S, S] bool mask (S^2 bytes)")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time, ms")
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda",
                   help="cpu: the smoke path under TRITON_INTERPRET=1 (times mean nothing)")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/causal_attention_<gpu>_<time>.json)")
    args = p.parse_args(argv)
    if args.flex is None:
        args.flex = args.device == "cuda"
    check_shape(args.seqlen, args.chunk_tokens, args.group_size, args.kv_block)
    check_shape(args.check_seqlen, check_chunk(args), args.group_size, args.kv_block)
    if not all(0 < d <= 1 for d in args.densities):
        p.error(f"--densities must lie in (0, 1], got {args.densities}.")
    return args


def check_shape(s: int, chunk: int, g: int, kvb: int) -> None:
    """The benchmark counts pairs per whole block: chunks must be whole query groups and key
    blocks (then every (group, block) pair is fully allowed or fully disallowed)."""
    unit = math.lcm(g, kvb)
    if chunk < 1 or chunk % unit or s % chunk:
        raise ValueError(
            f"S={s} tokens in chunks of {chunk}: a chunk must be a multiple of lcm(group {g}, key block {kvb}) "
            f"= {unit} tokens and divide S. Choose --chunk-tokens (and --check-seqlen) accordingly."
        )


def check_chunk(args) -> int:
    """Chunk of the whole-problem check: the benchmark's chunk scaled with the length."""
    return args.chunk_tokens * args.check_seqlen // args.seqlen


def allowed_blocks(s: int, mask: CausalMask, g: int, kvb: int) -> torch.Tensor:
    """Key blocks each query group may read, int64 ``[S/G]`` (chunk-aligned: whole blocks)."""
    last = torch.arange(g - 1, s, g, dtype=torch.int64)
    return mask.limit(last) // kvb + 1


def k_for_density(allowed: torch.Tensor, density: float, floor: int) -> int:
    """Smallest K >= floor with sum_g min(K, allowed_g) >= density * sum_g allowed_g."""
    total = float(allowed.sum())
    for k in range(floor, int(allowed.max()) + 1):
        if float(allowed.clamp(max=k).sum()) >= density * total - 1e-9:
            return k
    return int(allowed.max())


def build_index(q, k, args, s, chunk, kv_units_k, seed=0, backend="triton") -> SparseIndex:
    """Masked selection over random rank-r projections of q and k (Triton; under
    TRITON_INTERPRET=1 on the CPU smoke path)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    w = torch.randn(q.shape[-1], args.rank, generator=gen).to(q.device)
    q_lr, k_lr = q.float() @ w, k.float() @ w
    return select_topk(q_lr, k_lr, args.group_size, kv_units_k, kv_block=args.kv_block, backend=backend,
                       mask=CausalMask("chunk_causal", chunk))


def listed_allowed(index: SparseIndex, allowed: torch.Tensor) -> int:
    """Allowed blocks the index lists, summed over (batch, head, group): the computed blocks."""
    idx = index.kv_idx.long()
    return int(((idx >= 0) & (idx < allowed.to(idx.device).view(1, 1, -1, 1))).sum())


def ours(index: SparseIndex, options: Optional[KernelOptions] = None):
    """Our Triton kernel over ``index`` (variant ``options``): ``fn(q, k, v) -> (out, lse)``."""
    return lambda q_, k_, v_: sparse_attention(q_, k_, v_, index, backend="triton", options=options)


def ours_out(index: SparseIndex, options: Optional[KernelOptions] = None):
    """The same, ``-> out`` (what ``time_attention`` times)."""
    return lambda q_, k_, v_: sparse_attention(q_, k_, v_, index, backend="triton", options=options)[0]


def check_rows(q, k, v, do, index: SparseIndex, groups: int, heads: int = 2, fn=None) -> dict:
    """Out, LSE and dq of the last ``groups`` query groups of ``heads`` heads of ``fn`` (default:
    our Triton kernel over ``index``) against the fp32 reference of those rows alone (queries at
    ``q_offset``; their keys are all of the sequence)."""
    g, s = index.group_size, index.seq_len_q
    rows = slice(s - groups * g, s)
    sub = SparseIndex(index.kv_idx[:, :heads, -groups:].contiguous(), index.kv_count[:, :heads].contiguous(), g,
                      index.kv_block, groups * g, index.seq_len_kv, index.mask, s - groups * g)
    q0 = q[:, :heads, rows].float().detach().requires_grad_(True)
    ref_out, ref_lse = sparse_attention_reference(q0, k[:, :heads].float(), v[:, :heads].float(), sub, q.shape[-1] ** -0.5)
    (ref_dq,) = torch.autograd.grad(ref_out, q0, do[:, :heads, rows].float())
    qg, kg, vg = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out, lse = (fn or ours(index))(qg, kg, vg)
    (dq,) = torch.autograd.grad(out, qg, do)
    res = {"out": rel(out[:, :heads, rows], ref_out), "lse": rel(lse[:, :heads, rows], ref_lse),
           "dq": rel(dq[:, :heads, rows], ref_dq)}
    res["all_finite"] = all(bool(torch.isfinite(t).all()) for t in (out, lse, dq))
    res["ok"] = res["all_finite"] and all(math.isfinite(x) and x < CHECK_TOL for n, x in res.items() if n != "all_finite")
    return res


def sdpa_order():
    """The DSV layer's SDPA backends in priority order (``layers.attention.sdpa_backends``;
    tests/test_causal_attention_benchmark.py keeps the two equal)."""
    from torch.nn.attention import SDPBackend

    return [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


def sdpa_fn(backend, **kw):
    from torch.nn.attention import sdpa_kernel

    def attn(q, k, v):
        with sdpa_kernel([backend]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, **kw)

    return attn


def masked_sdpa(q, k, v, do, mask):
    """The first backend of the layer's order that runs SDPA with ``mask`` forward and backward
    (what its priority list picks), as ``(name, attn)``; ``(None, errors)`` when none does."""
    order = sdpa_order() if q.is_cuda else [sdpa_order()[-1]]
    errors = {}
    for backend in order:
        attn = sdpa_fn(backend, attn_mask=mask)
        try:
            qg = q.detach().clone().requires_grad_(True)
            torch.autograd.grad(attn(qg, k, v), qg, do)
            return backend.name, attn
        except RuntimeError as err:  # "No available kernel" for this backend and these inputs
            errors[backend.name] = first_line(err)
    return None, errors


def flex_chunk_causal(s: int, chunk: int, device):
    """FlexAttention with the chunk-causal block mask, compiled."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    def mask_mod(b, h, q_idx, kv_idx):
        return kv_idx // chunk <= q_idx // chunk

    block_mask = create_block_mask(mask_mod, None, None, s, s, device=device)
    fn = torch.compile(flex_attention, dynamic=False)
    return lambda q, k, v: fn(q, k, v, block_mask=block_mask)


class CausalBench:
    def __init__(self, args):
        self.args = args
        self.dtype = DTYPES[args.dtype]
        self.timer = Timer(args.device, args.warmup, args.rep)
        self.info = env_info(args.device)
        self.options = KernelOptions(tune={"fwd": {"num_stages": args.fwd_stages}}) if args.fwd_stages else None
        self.log = ResultLog("causal_attention", self.info, args, args.out)
        self.rows, self.out, self.failed = self.log.rows, self.log.path, False

    def data(self):
        return self.log.data()

    def add(self, row):
        self.log.add(row)
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}
        print(f"  {shown}", flush=True)
        return row

    def inputs(self, s, seed):
        a = self.args
        gen = torch.Generator(device="cpu").manual_seed(seed)
        return [torch.randn(a.batch, a.heads, s, a.head_dim, generator=gen).to(a.device, self.dtype) for _ in range(4)]

    def timed(self, row, attn, q, k, v, do, pairs):
        try:
            time_attention(self.timer, attn, q, k, v, do, row)
        except Exception as err:  # a kernel that cannot run here is a row that says why
            row["error"] = first_line(err)
            return row
        flops = 4.0 * pairs * self.args.head_dim
        row.update(pairs=pairs, fwd_tflops=flops / row["fwd_ms"] / 1e9, fwd_bwd_tflops=3.5 * flops / row["fwd_bwd_ms"] / 1e9)
        return row

    def indexes(self, s, chunk, q, k):
        """``[(name, density target, index, allowed blocks)]``: every density, then all allowed blocks."""
        a = self.args
        mask = CausalMask("chunk_causal", chunk)
        allowed = allowed_blocks(s, mask, a.group_size, a.kv_block)
        floor = mask.max_forced(s, a.group_size, a.kv_block)
        out = []
        for density in a.densities + [1.0]:
            kk = k_for_density(allowed, density, floor)
            t0 = time.perf_counter()
            index = build_index(q, k, a, s, chunk, kk)
            self.timer.sync()
            out.append(("ours_block_causal_dense" if density == 1.0 else "ours_sparse", density, kk, index, allowed,
                        time.perf_counter() - t0))
        return out

    def check(self):
        """(a) the whole problem at --check-seqlen; rows recorded, failures remembered."""
        a = self.args
        s, chunk = a.check_seqlen, check_chunk(a)
        q, k, v, do = self.inputs(s, seed=1)
        ok = {}
        for name, density, kk, index, _, _ in self.indexes(s, chunk, q, k):
            res = ReferenceCheck(q, k, v, do, index, heads=min(2, a.heads)).check(ours(index, self.options), q, k, v)
            self.add({"kind": "check_whole", "of": name, "S": s, "chunk_tokens": chunk, "density_target": density,
                      "K": kk, "check": res})
            ok[density] = res["ok"]
        return ok

    def run(self):
        a = self.args
        print(f"# {self.info['gpu']} | torch {self.info['torch']} | triton {self.info['triton']} | "
              f"commit {self.info['git_commit'][:12]}", flush=True)
        whole_ok = {} if a.no_check else self.check()
        s, chunk, b, h = a.seqlen, a.chunk_tokens, a.batch, a.heads
        q, k, v, do = self.inputs(s, seed=0)
        n = s // chunk
        causal_pairs = b * h * s * (s + 1) // 2
        chunk_pairs = b * h * chunk * chunk * n * (n + 1) // 2
        base = {"S": s, "H": h, "D": a.head_dim, "B": b, "chunk_tokens": chunk, "G": a.group_size,
                "kv_block": a.kv_block, "dtype": a.dtype, "fwd_stages": a.fwd_stages}
        dense = {}
        row = self.timed({"kind": "cudnn_causal_dense" if a.device == "cuda" else "sdpa_math_causal_dense", **base},
                         sdpa_fn(sdpa_order()[0 if a.device == "cuda" else -1], is_causal=True), q, k, v, do, causal_pairs)
        dense["cudnn_causal"] = self.add(row)  # no fallback: cuDNN or an error row
        if a.sdpa_mask:
            mask = CausalMask("chunk_causal", chunk).dense(s, device=q.device)
            name, attn = masked_sdpa(q, k, v, do, mask)
            row = {"kind": "sdpa_chunk_causal_dense", "sdpa_backend": name, **base}
            if name is None:
                row["error"] = attn
                dense["sdpa_chunk_causal"] = self.add(row)
            else:
                dense["sdpa_chunk_causal"] = self.add(self.timed(row, attn, q, k, v, do, chunk_pairs))
            del mask
        if a.flex:
            row = {"kind": "flex_chunk_causal", **base}
            try:
                attn = flex_chunk_causal(s, chunk, q.device)
            except Exception as err:
                row["error"] = first_line(err)
                attn = None
            dense["flex"] = self.add(row if attn is None else self.timed(row, attn, q, k, v, do, chunk_pairs))
        timed = []
        for name, density, kk, index, allowed, select_s in reversed(self.indexes(s, chunk, q, k)):
            blocks = listed_allowed(index, allowed)
            row = {"kind": name, **base, "density_target": density, "K": kk,
                   "density_allowed_blocks": blocks / (b * h * float(allowed.sum())),
                   "density_of_all_pairs": blocks * a.group_size * a.kv_block / (b * h * s * s)}
            row["selection_ms"] = self.timer(lambda: build_index(q, k, a, s, chunk, kk))
            row["selection_reference_ms"] = self.timer(lambda: build_index(q, k, a, s, chunk, kk, backend="reference"))
            ref_idx = build_index(q, k, a, s, chunk, kk, backend="reference").kv_idx
            row["selection_same_as_reference"] = (index.kv_idx == ref_idx).float().mean().item()
            del ref_idx
            row["first_selection_s"] = select_s
            if not a.no_check:
                row["check_whole"] = bool(whole_ok.get(density))
                row["check_rows"] = check_rows(q, k, v, do, index, a.check_groups, heads=min(2, h),
                                               fn=ours(index, self.options))
                if not (row["check_whole"] and row["check_rows"]["ok"]):
                    row["skipped"] = "correctness check failed: not timed"
                    self.failed = True
                    self.add(row)
                    continue
            self.timed(row, ours_out(index, self.options), q, k, v, do, blocks * a.group_size * a.kv_block)
            if "fwd_bwd_ms" in row:
                for key, ref in (("cudnn_causal", dense.get("cudnn_causal")), ("sdpa_chunk_causal", dense.get("sdpa_chunk_causal")),
                                 ("flex", dense.get("flex")), ("ours_block_causal_dense", timed[0] if timed else None)):
                    if ref is not None and "fwd_bwd_ms" in ref and ref is not row:
                        row[f"speedup_vs_{key}"] = ref["fwd_bwd_ms"] / row["fwd_bwd_ms"]
                        row[f"speedup_vs_{key}_with_selection"] = ref["fwd_bwd_ms"] / (row["fwd_bwd_ms"] + row["selection_ms"])
            timed.append(self.add(row))
            del index
            if a.device == "cuda":
                torch.cuda.empty_cache()
        self.log.write()
        print(f"\nwrote {self.out}")
        for r in self.rows:
            if "fwd_bwd_ms" in r:
                extra = "".join(f"  x{r[k]:.2f} {k[len('speedup_vs_'):]}" for k in sorted(r) if k.startswith("speedup_vs_")
                                and not k.endswith("_with_selection"))
                print(f"{r['kind']:<26} {r.get('density_target', '')!s:>5} fwd+bwd {r['fwd_bwd_ms']:9.2f} ms "
                      f"{r['fwd_bwd_tflops']:7.1f} TF/s{extra}")
        return 1 if self.failed else 0


if __name__ == "__main__":
    sys.exit(CausalBench(parse_args()).run())
