"""DSV training-step costs on a megatron-core layer stack (GPU, bf16): dense vs sparse, and the
overhead of the predictor and the profiler.

    python benchmarks/overhead.py --seqlens 16384,32768,65536 --out benchmarks/results/overhead.json

For each sequence length, on the same input, one forward+backward of a TransformerBlock
(hidden 2048, 16 heads of 128, ffn 8192, ``--layers`` layers, B=1) is timed with do_bench (median):

* ``dense``: ``--dsv-mode dense`` (cuDNN SDPA), the baseline;
* ``stage1``: dense attention + the predictor's work on every stage-1 iteration (the gradient
  fit's loss; nothing for the closed-form fit, ``--fit``);
* ``stage1_profile``: the same + profiling (recall curve, token sparsity, score moments) and, for
  the closed-form fit, the refit (every ``--dsv-profile-interval-stage1``);
* ``sparse``: stage-2 sparse attention at ``--sparsity`` with no predictor work;
* ``sparse_profile``: the same + profiling, predictor step or refit (every ``--dsv-profile-interval-stage2``).

``--strides 32,64`` times the two profiling variants again at every further profile stride (rows
sampled every n-th query: a profiling step's cost apart from the refit scales with the rows) as
``stage1_profile_s64_ms`` / ``sparse_profile_s64_ms``, and ``--intervals1 10,20`` reports the
stage-1 overhead per step of every (stride, stage-1 interval) pair from the same timings
(``stage1_overhead``: ``{"s32_i10": ...}``), so a default can be chosen against the 5% target.

The stage-2 overhead per step is ``(sparse_profile - sparse) / interval2``, reported against the
dense step (target < 5%). ``dense_opt`` / ``sparse_opt`` time the whole training step, forward +
backward + a fused AdamW step over the block's parameters (the end-to-end step of the project's targets), with
peak memory including the optimizer state; each optimizer is freed before the next variant.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def main():
    from triton.testing import do_bench

    from megatron.core.transformer.transformer_block import TransformerBlock

    from benchmarks.dense_path import env_info
    from benchmarks.sparse_peers import int_list
    from megatron_dsv.config import DSVConfig
    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.layers.state import StepControl
    from megatron_dsv.layers.transformer_config import DSVTransformerConfig
    from megatron_dsv.runtime.megatron import init_megatron
    from megatron_dsv.specs import dsv_gpt_layer_spec

    p = argparse.ArgumentParser()
    p.add_argument("--seqlens", default="16384,32768,65536")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--kv-block", type=int, default=64)
    p.add_argument("--interval1", type=int, default=None, help="default: --dsv-profile-interval-stage1's")
    p.add_argument("--interval2", type=int, default=None, help="default: --dsv-profile-interval-stage2's")
    p.add_argument("--strides", default="32", help="profile strides; the first is the main one")
    p.add_argument("--intervals1", default=None, help="stage-1 intervals to report (default: --interval1)")
    p.add_argument("--fit", default="closed_form", choices=("closed_form", "gradient"))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    defaults = DSVConfig()
    args.interval1 = args.interval1 or defaults.dsv_profile_interval_stage1
    args.interval2 = args.interval2 or defaults.dsv_profile_interval_stage2
    strides = int_list(args.strides)
    intervals1 = int_list(args.intervals1) if args.intervals1 else [args.interval1]
    init_megatron("cuda")
    torch.manual_seed(1234)
    rows = []
    for s in (int(x) for x in args.seqlens.split(",")):
        res = {"S": s, "layers": args.layers, "sparsity": args.sparsity, "kv_block": args.kv_block}
        blocks = {}
        for mode in ("dense", "auto"):
            cfg = DSVTransformerConfig(
                num_layers=args.layers, hidden_size=2048, num_attention_heads=16, ffn_hidden_size=8192,
                hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False,
                gradient_accumulation_fusion=False, bf16=True, params_dtype=torch.bfloat16,
                dsv_mode=mode, dsv_query_group=(4, 4, 4), dsv_kv_block=args.kv_block,
                dsv_fixed_sparsity=args.sparsity, dsv_profile_stride=strides[0], dsv_predictor_fit=args.fit,
            )
            torch.manual_seed(0)
            blocks[mode] = TransformerBlock(cfg, dsv_gpt_layer_spec).cuda().bfloat16()
        weights = {k: v for k, v in blocks["dense"].state_dict().items() if not k.endswith("_extra_state")}
        blocks["auto"].load_state_dict(weights, strict=False)
        x = torch.randn(s, 1, 2048, device="cuda", dtype=torch.bfloat16, requires_grad=True)
        gy = torch.randn_like(x)
        attn = dsv_attention_layers(blocks["auto"])

        def setup(sparse, train, stats):
            for a in attn:
                a.set_sparse(sparse)
                a.begin_iteration(StepControl(train_predictor=train, collect_stats=stats))

        def step(block, flags=None):
            if flags is None or not flags[2]:
                return lambda: block(x, attention_mask=None).backward(gy)

            def profiled():  # a profiling iteration: one measured microbatch, then the refit
                for a in attn:
                    a.begin_iteration(StepControl(train_predictor=flags[1], collect_stats=True))
                block(x, attention_mask=None).backward(gy)
                for a in attn:
                    a.refit_predictor()
            return profiled

        variants = {
            "dense": (blocks["dense"], None),
            "stage1": (blocks["auto"], (False, True, False)),
            "stage1_profile": (blocks["auto"], (False, True, True)),
            "sparse": (blocks["auto"], (True, False, False)),
            "sparse_profile": (blocks["auto"], (True, True, True)),
        }
        params = [x] + [q for b in blocks.values() for q in b.parameters()]
        for name, (block, flags) in variants.items():
            if flags is not None:
                setup(*flags)
            torch.cuda.reset_peak_memory_stats()
            res[f"{name}_ms"] = do_bench(step(block, flags), warmup=100, rep=500, return_mode="median", grad_to_none=params)
            res[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
        main_cfg = [a.dsv for a in attn]
        for stride in strides[1:]:
            for a, c in zip(attn, main_cfg):
                a.dsv = dataclasses.replace(c, dsv_profile_stride=stride)
            for name in ("stage1_profile", "sparse_profile"):
                block, flags = variants[name]
                setup(*flags)
                res[f"{name}_s{stride}_ms"] = do_bench(step(block, flags), warmup=100, rep=500, return_mode="median", grad_to_none=params)
        for a, c in zip(attn, main_cfg):
            a.dsv = c
        for name, block, flags in (("dense_opt", blocks["dense"], None), ("sparse_opt", blocks["auto"], (True, False, False))):
            if flags is not None:
                setup(*flags)
            opt = torch.optim.AdamW(block.parameters(), lr=1e-6, fused=True)

            def train_step(block=block, opt=opt):
                block(x, attention_mask=None).backward(gy)
                opt.step()
                opt.zero_grad(set_to_none=True)

            train_step()  # allocate the optimizer state before measuring
            torch.cuda.reset_peak_memory_stats()
            res[f"{name}_ms"] = do_bench(train_step, warmup=100, rep=500, return_mode="median", grad_to_none=[x])
            res[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            del opt, train_step
            torch.cuda.empty_cache()
        res["train_step_speedup"] = res["dense_opt_ms"] / res["sparse_opt_ms"]
        d = res["dense_ms"]
        res["stage1_overhead_per_step"] = (res["stage1_ms"] - d + (res["stage1_profile_ms"] - res["stage1_ms"]) / args.interval1) / d
        res["stage2_overhead_per_step_vs_dense"] = (res["sparse_profile_ms"] - res["sparse_ms"]) / args.interval2 / d
        res["stage2_overhead_per_step_vs_sparse"] = (res["sparse_profile_ms"] - res["sparse_ms"]) / args.interval2 / res["sparse_ms"]
        res["sparse_step_speedup"] = d / res["sparse_ms"]
        res["stage1_overhead"] = {}
        res["stage2_overhead_vs_dense"] = {}
        for stride in strides:
            tag = "" if stride == strides[0] else f"_s{stride}"
            for every in intervals1:
                profile = res[f"stage1_profile{tag}_ms"] - res["stage1_ms"]
                res["stage1_overhead"][f"s{stride}_i{every}"] = (res["stage1_ms"] - d + profile / every) / d
            res["stage2_overhead_vs_dense"][f"s{stride}_i{args.interval2}"] = (res[f"sparse_profile{tag}_ms"] - res["sparse_ms"]) / args.interval2 / d
        rows.append(res)
        print(json.dumps(res), flush=True)
        del blocks, x, gy
        torch.cuda.empty_cache()
    out = {"env": env_info(), "args": vars(args), "rows": rows}
    print("\n| S | train step dense ms (peak GiB) | train step sparse ms (peak GiB) | speedup |")
    print("|---|---|---|---|")
    for r in rows:
        print(f"| {r['S']} | {r['dense_opt_ms']:.1f} ({r['dense_opt_peak_gib']:.2f}) | "
              f"{r['sparse_opt_ms']:.1f} ({r['sparse_opt_peak_gib']:.2f}) | x{r['train_step_speedup']:.2f} |")
    print("\n| S | dense ms | stage-1 step ms (+profile) | sparse ms (+profile) | stage-1 overhead | stage-2 overhead vs dense | sparse step speedup |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['S']} | {r['dense_ms']:.1f} | {r['stage1_ms']:.1f} ({r['stage1_profile_ms']:.1f}) | "
              f"{r['sparse_ms']:.1f} ({r['sparse_profile_ms']:.1f}) | {100 * r['stage1_overhead_per_step']:.1f}% | "
              f"{100 * r['stage2_overhead_per_step_vs_dense']:.2f}% | x{r['sparse_step_speedup']:.2f} |")
    if len(strides) > 1 or len(intervals1) > 1:
        print("\n| S | " + " | ".join(f"stage 1, stride {k.split('_')[0][1:]}, every {k.split('_')[1][1:]}" for k in rows[0]["stage1_overhead"]) + " |")
        print("|---|" + "---|" * len(rows[0]["stage1_overhead"]))
        for r in rows:
            print(f"| {r['S']} | " + " | ".join(f"{100 * v:.1f}%" for v in r["stage1_overhead"].values()) + " |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
