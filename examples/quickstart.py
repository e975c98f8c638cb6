"""Quickstart: a megatron-core TransformerBlock with DSV attention, trained on CPU or GPU.

The task has the structure of video attention: a T x H x W token grid holds a few "objects"
(each a set of 2x2x2 cubes scattered over the video), and every token must output the mean
feature of all tokens of its object. A layer solves it by attending to the object's tokens
wherever they are: sparse and non-local, like a trained video DiT.

1. Stage 1: train densely while each layer's low-rank predictor learns (its loss reaches only
   predictor parameters) and the profiler measures per-head sparsity and predictor recall.
2. Switch: every layer goes sparse with K per head from its measured sparsity.
3. Print per-layer sparsity, recall and the sparse-vs-dense output difference; train on sparse.

    python examples/quickstart.py            # ~1-2 min on 2 CPU cores
    python examples/quickstart.py --help
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from megatron_dsv.ops.layout import cube_major_positions  # noqa: E402
from megatron_dsv.ops.sparse_index import k_from_sparsity  # noqa: E402


def parse():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video", default="4x8x8", help="token grid T x H x W")
    p.add_argument("--objects", type=int, default=16, help="objects per video")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--dense-steps", type=int, default=60)
    p.add_argument("--sparse-steps", type=int, default=20)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--critical-mass", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    return p.parse_args()


def init_single_process(device: str):
    """Megatron model-parallel state for one process. On CPU Megatron's CUDA RNG tracker cannot
    fork, and nothing here needs it (no dropout in tensor-parallel regions): make fork a no-op."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    if not dist.is_initialized():
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel()
    if device == "cuda":
        mrandom.model_parallel_cuda_manual_seed(1234)
    else:
        mrandom.get_cuda_rng_tracker().fork = lambda *a, **k: contextlib.nullcontext()


class ObjectTask:
    """Batches of (tokens [S, B, hidden], targets [S, B, hidden]) in cube-major order."""

    def __init__(self, thw, objects, hidden, device, seed):
        self.thw, self.objects, self.hidden, self.device = thw, objects, hidden, device
        self.gen = torch.Generator().manual_seed(seed)
        # Each object has a fixed code in the upper half of the features; the values to be
        # averaged live in the lower half. Attention must match codes: q.k large within an object.
        half = hidden // 2
        self.codes = torch.nn.functional.pad(torch.randn(objects, half, generator=self.gen) * 2.0, (half, 0))
        pos = cube_major_positions(thw, (2, 2, 2)).float()
        t, h, w = thw
        freqs = torch.arange(1, hidden // 6 + 1).float()
        ang = torch.cat([pos[:, i : i + 1] / n * freqs * 3.14159 for i, n in enumerate((t, h, w))], -1)
        self.pos = torch.cat([ang.sin(), ang.cos()], -1)[:, :hidden]
        self.pos = torch.nn.functional.pad(self.pos, (0, hidden - self.pos.shape[1])) * 0.5

    def batch(self, b):
        s = self.pos.shape[0]
        ncubes = s // 8
        cube_obj = torch.randint(0, self.objects, (b, ncubes), generator=self.gen)
        obj = cube_obj.repeat_interleave(8, dim=1)  # [B, S]: each 2x2x2 cube belongs to one object
        half = self.hidden // 2
        value = torch.nn.functional.pad(torch.randn(b, s, half, generator=self.gen), (0, half))
        x = self.codes[obj] + value + self.pos
        onehot = torch.nn.functional.one_hot(obj, self.objects).float()  # [B, S, O]
        mean = (onehot.transpose(1, 2) @ value) / onehot.sum(1).clamp(min=1).unsqueeze(-1)
        y = onehot @ mean
        return x.transpose(0, 1).to(self.device), y.transpose(0, 1).to(self.device)


def main():
    args = parse()
    torch.manual_seed(args.seed)
    init_single_process(args.device)
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.layers.transformer_config import DSVTransformerConfig
    from megatron_dsv.specs import dsv_gpt_layer_spec

    thw = tuple(int(v) for v in args.video.split("x"))
    cfg = DSVTransformerConfig(
        num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False,
        dsv_mode="auto", dsv_query_group=(2, 2, 2), dsv_profile_stride=4, dsv_min_keys=8,
        dsv_critical_mass=args.critical_mass,
    )
    block = TransformerBlock(cfg, dsv_gpt_layer_spec)
    model = torch.nn.ModuleDict(
        {"block": block, "head": torch.nn.Linear(args.hidden, args.hidden)}
    ).to(args.device)
    attn = dsv_attention_layers(model)
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    task = ObjectTask(thw, args.objects, args.hidden, args.device, args.seed)
    print(f"megatron-core TransformerBlock: {args.layers} layers, {args.heads} heads, "
          f"{thw[0] * thw[1] * thw[2]} tokens {args.video}, device {args.device}")
    for a in attn:
        print("  " + a.describe())

    def forward(x):
        return model["head"](model["block"](x, attention_mask=None))

    def step(it):
        for a in attn:
            a.set_iteration(it)
        x, y = task.batch(args.batch)
        loss = torch.nn.functional.mse_loss(forward(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    t0 = time.time()
    print(f"\nstage 1: dense attention, predictors learning ({args.dense_steps} steps)")
    for it in range(args.dense_steps):
        loss = step(it)
        if it % 10 == 0 or it == args.dense_steps - 1:
            pl = sum(float(a.stats_ema["loss"]) for a in attn) / len(attn)
            rc = sum(float(a.stats_ema["recall"].mean()) for a in attn) / len(attn)
            print(f"  step {it:4d}  task loss {loss:.4f}  predictor loss {pl:.4f}  recall {rc:.3f}")

    print("\nswitch to sparse; per layer (mean over heads, measured on sampled queries):")
    s_kv = thw[0] * thw[1] * thw[2]
    for a in attn:
        e = a.stats_ema
        k = k_from_sparsity(e["sparsity"], s_kv, floor=a.dsv.dsv_min_keys)
        sparse = float(e["sparsity"].mean()) >= a.dsv.dsv_min_sparsity
        print(f"  layer {a.layer_number}: sparsity {e['sparsity'].mean():.3f} "
              f"(per head {[round(float(s), 3) for s in e['sparsity']]}), predictor recall "
              f"{e['recall'].mean():.3f} -> "
              + (f"sparse, K/head {k.tolist()} of {s_kv}" if sparse else
                 f"stays dense (sparsity < --dsv-min-sparsity {a.dsv.dsv_min_sparsity})"))
        if sparse:
            a.set_sparse(True, k)

    model.eval()
    with torch.no_grad():
        x, y = task.batch(args.batch)
        out_sparse = forward(x)
        chosen = [a.sparse for a in attn]
        for a in attn:
            a.sparse = False
        out_dense = forward(x)
        for a, sp in zip(attn, chosen):
            a.sparse = sp
    rel = ((out_sparse - out_dense).norm() / out_dense.norm()).item()
    print(f"\nsparse vs dense output on a held-out batch: relative difference {rel:.4f}; task loss "
          f"dense {torch.nn.functional.mse_loss(out_dense, y).item():.4f}, "
          f"sparse {torch.nn.functional.mse_loss(out_sparse, y).item():.4f}")
    model.train()
    for a in attn:
        print("  " + a.describe())

    print(f"\nstage 2: sparse attention ({args.sparse_steps} steps)")
    for it in range(args.dense_steps, args.dense_steps + args.sparse_steps):
        loss = step(it)
        if it % 10 == 0 or it == args.dense_steps + args.sparse_steps - 1:
            rc = sum(float(a.last_stats["recall"].mean()) for a in attn) / len(attn)
            print(f"  step {it:4d}  task loss {loss:.4f}  predictor recall {rc:.3f}")
    print(f"\ndone in {time.time() - t0:.1f} s")
    return {"relative_difference": rel, "stats": [a.stats_ema for a in attn]}


if __name__ == "__main__":
    main()
