"""Quickstart: a megatron-core TransformerBlock with DSV attention, trained on CPU or GPU.

The task has the structure of video attention (``megatron_dsv.data.objects``): a T x H x W token
grid holds "objects", each a set of 2x2x4 cubes scattered over the video, and every token must
output the mean feature of its object. A layer solves it by attending to its object's tokens
wherever they are: sparse and non-local, like a trained video DiT.

The DSV controller runs the two-stage schedule:
1. stage 1: dense attention while each layer's low-rank predictor learns (its loss reaches only
   predictor parameters) and the profiler measures per-head sparsity and predictor recall;
2. switch when the predictor loss and recall reach their thresholds: layers sparse enough go
   sparse with K per head from their measured sparsity, the others stay dense;
3. stage 2: train on, predictors keep learning at a lower rate on profiling iterations.
It prints per-layer sparsity, recall, decisions and the sparse-vs-dense output difference.

    python examples/quickstart.py            # ~20 s on 2 CPU cores
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_dsv.quiet import quiet_third_party  # noqa: E402

quiet_third_party()  # megatron-core's TE/apex fallback notices; never our own warnings


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", default="4x8x8", help="token grid T x H x W")
    p.add_argument("--objects", type=int, default=16, help="objects per video")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stats-log", default="", help="write per-layer/per-head stats (JSON lines) here")
    p.add_argument("--speed-table", default="assume",
                   help="--dsv-speed-table: assume (default here: the demo shows the sparse path at toy lengths "
                   "where it need not beat dense, e.g. the plain-PyTorch reference on CPU), measure (timed in "
                   "the run, the library's default: may keep every layer dense here) or a speed-table JSON")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def main():
    args = parse()
    torch.manual_seed(args.seed)
    from megatron_dsv.runtime.megatron import init_single_process

    init_single_process(args.device)
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_dsv.data.objects import ObjectRetrievalTask
    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.runtime.controller import DSVController
    from megatron_dsv.runtime.lr import is_predictor_param
    from megatron_dsv.layers.transformer_config import DSVTransformerConfig
    from megatron_dsv.specs import dsv_gpt_layer_spec

    thw = tuple(int(v) for v in args.video.split("x"))
    cfg = DSVTransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False,
        # key blocks of 16 = one 2x2x4 cube, the unit the task's objects are made of (the default
        # 64 would leave 4 blocks of 256 tokens to choose from)
        dsv_mode="auto", dsv_query_group=(2, 2, 4), dsv_kv_block=16, dsv_profile_stride=4, dsv_min_keys=8,
        dsv_k_multiple=1, dsv_min_sparsity=0.6, dsv_switch_min_iters=20, dsv_switch_max_iters=args.steps // 2,
        dsv_profile_interval_stage1=1, dsv_profile_interval_stage2=5, dsv_stats_log=args.stats_log,
        dsv_log_interval=10,
        dsv_speed_table=args.speed_table,
    )
    model = torch.nn.ModuleDict(
        {"block": TransformerBlock(cfg, dsv_gpt_layer_spec), "head": torch.nn.Linear(args.hidden, args.hidden)}
    ).to(args.device)
    named = list(model.named_parameters())
    opt = torch.optim.Adam([
        {"params": [p for n, p in named if not is_predictor_param(n, p)]},
        {"params": [p for n, p in named if is_predictor_param(n, p)]},
    ], lr=args.lr)
    lines = []
    controller = DSVController(model, optimizer=opt, log=lambda s: (lines.append(s), print("  " + s)))
    attn = dsv_attention_layers(model)
    task = ObjectRetrievalTask(thw, args.objects, args.hidden, seed=args.seed, device=args.device, cube=cfg.dsv_query_group)
    print(f"megatron-core TransformerBlock: {args.layers} layers, {args.heads} heads, "
          f"{task.seq_len} tokens ({args.video}), device {args.device}")
    for a in attn:
        print("  " + a.describe())

    def forward(x):
        return model["head"](model["block"](x, attention_mask=None))

    t0 = time.time()
    print(f"\ntraining {args.steps} steps (status every 10 iterations and at every decision)")
    for it in range(args.steps):
        controller.on_iteration_start(it)
        x, y = task.batch(args.batch)
        loss = torch.nn.functional.mse_loss(forward(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        summary = controller.on_iteration_end(it)
        if it % 10 == 0:
            print(f"  step {it:4d}  task loss {loss.item():.4f}")

    print("\nper layer (EMA over profiling iterations, mean over heads):")
    for a in attn:
        e = a.stats_ema
        print(f"  layer {a.layer_number}: sparsity {e['sparsity'].mean():.3f} "
              f"(per head {[round(float(s), 3) for s in e['sparsity']]}), predictor recall "
              f"{e['recall'].mean():.3f}, predictor loss {float(e['loss']):.4f}")
        print("    " + a.describe())

    model.eval()
    with torch.no_grad():
        x, y = task.batch(args.batch)
        out_sparse = forward(x)
        chosen = [a.sparse for a in attn]
        for a in attn:
            a.set_sparse(False)
        out_dense = forward(x)
        for a, sp in zip(attn, chosen):
            a.set_sparse(sp)
    rel = ((out_sparse - out_dense).norm() / out_dense.norm()).item()
    print(f"\nsparse vs dense output on a held-out batch: relative difference {rel:.4f}; task loss "
          f"dense {torch.nn.functional.mse_loss(out_dense, y).item():.4f}, "
          f"sparse {torch.nn.functional.mse_loss(out_sparse, y).item():.4f}")
    print(f"done in {time.time() - t0:.1f} s")
    return {"relative_difference": rel, "summary": summary, "log": lines, "layers": attn}


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
