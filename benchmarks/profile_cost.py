"""What one profiled microbatch of one DSV layer costs, piece by piece (GPU, bf16).

    python benchmarks/profile_cost.py --shapes 16x16384x128,8x16384x64 --out benchmarks/results/profile_cost.json

For q, k of ``[1, H, S, D]`` (random, bf16) and the low-rank projections of a rank-16 predictor,
times with do_bench (median) the parts a profiling forward runs: the recall curve over the sampled
rows (``recall_curve``), token sparsity on all sampled rows and on every 8th (``sampled_attention_stats``),
the score moments (``accumulate_moments``), the predictor loss without grad (``predictor_loss``),
and the closed-form refit (``refit``: alone, as ``refit_ms``, and after the moments), beside a
dense cuDNN forward+backward of the same shape (token-causal, ``is_causal``, under either mask).
The refit is ``LowRankPredictor.refit``, the call the runtime makes
(``DSVCoreAttention.refit_predictor``): on the GPU, without host sync.

``--mask causal`` (or ``chunk_causal:T``, chunks of T tokens) times the masked statistics on the
rows the layer samples under that mask (``CausalMask.rows_with_choice``, query groups and key
blocks of 64), e.g. the token-causal GPT case of issue 19:

    python benchmarks/profile_cost.py --shapes 8x16384x64 --mask causal
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from triton.testing import do_bench

    from benchmarks.dense_path import env_info
    from megatron_dsv.layers.predictor import LowRankPredictor, predictor_loss
    from megatron_dsv.layers.profiler import recall_curve, sample_rows, sampled_attention_stats
    from megatron_dsv.ops.mask import CausalMask

    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="16x16384x128,8x16384x64,16x65536x128")
    p.add_argument("--stride", type=int, default=32)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--mask", default="none", help="none, causal or chunk_causal:T (T tokens per chunk)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.mask == "none":
        mask = None
    elif args.mask == "causal":
        mask = CausalMask("causal")
    elif args.mask.startswith("chunk_causal:"):
        mask = CausalMask("chunk_causal", int(args.mask.split(":", 1)[1]))
    else:
        p.error(f"--mask must be none, causal or chunk_causal:T, got {args.mask!r}")
    masked = {} if mask is None else {"mask": mask}
    rows_out = []
    for shape in args.shapes.split(","):
        h, s, d = (int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        q, k, v = (torch.randn(1, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        pred = LowRankPredictor(h, d, args.rank, device="cuda").requires_grad_(False)
        q_lr, k_lr = pred.project(q, k)
        rows = sample_rows(s, args.stride, 3, q.device)
        if mask is not None:
            rows = rows[mask.rows_with_choice(rows, 64, 64, s)]
            masked["rows"] = rows
        scale = d ** -0.5
        res = {"H": h, "S": s, "D": d, "rank": args.rank, "rows": rows.numel(), "mask": args.mask}
        bench = lambda fn: do_bench(fn, warmup=25, rep=200, return_mode="median")  # noqa: E731

        def dense():
            qq, kk, vv = (t.detach().requires_grad_(True) for t in (q, k, v))
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                F.scaled_dot_product_attention(qq, kk, vv, is_causal=mask is not None).sum().backward()

        res["dense_fwd_bwd_ms"] = bench(dense)
        res["recall_curve_ms"] = bench(lambda: recall_curve(q, k, q_lr, k_lr, rows, group_size=64, kv_block=64,
                                                            scale=scale, critical_mass=0.9, mask=mask))
        res["token_sparsity_all_rows_ms"] = bench(
            lambda: sampled_attention_stats(q[:, :, rows], k, scale, 0.9, mask=mask, rows=rows if mask is not None else None))
        res["token_sparsity_every8_ms"] = bench(
            lambda: sampled_attention_stats(q[:, :, rows[::8]], k, scale, 0.9, mask=mask, rows=rows[::8] if mask is not None else None))

        def moments():
            pred.reset_moments()
            pred.accumulate_moments(q[:, :, rows], k, **masked)

        res["moments_ms"] = bench(moments)
        with torch.no_grad():
            u = pred.project_queries(q[:, :, rows], torch.float32)
            res["predictor_loss_ms"] = bench(lambda: predictor_loss(pred, q[:, :, rows], u, k, scale, **masked))

        def refit():
            pred.accumulate_moments(q[:, :, rows], k, **masked)
            pred.refit()

        res["moments_and_refit_ms"] = bench(refit)
        pred.accumulate_moments(q[:, :, rows], k, **masked)
        res["refit_ms"] = bench(lambda: pred.refit(reset=False))  # the same moments each time
        pred.reset_moments()
        res["profile_total_ms"] = (res["recall_curve_ms"] + res["token_sparsity_every8_ms"] + res["moments_ms"]
                                   + res["predictor_loss_ms"] + res["moments_and_refit_ms"] - res["moments_ms"])
        res["profile_vs_dense_step"] = res["profile_total_ms"] / res["dense_fwd_bwd_ms"]
        rows_out.append(res)
        print(json.dumps(res), flush=True)
    out = {"env": env_info(), "args": vars(args), "rows": rows_out}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
