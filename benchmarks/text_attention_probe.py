"""Does a small causal GPT trained on bytes learn attention that DSV can make sparse? (CPU proxy)

    python benchmarks/text_attention_probe.py --data stdlib --steps 300 \
        --out benchmarks/results/text_attention_probe_cpu.json

A cheap stand-in for the H200 ``pretrain_gpt.py`` run of ``run_gpu_causal_gpt.sh`` (8 layers, 16384
tokens), asking what that run's DSV statistics will say before spending device time on it: a plain
PyTorch pre-LN GPT with RoPE and token-causal attention (default 2 layers, hidden 128, 2 heads of 64,
1024-token windows, batch 4) is trained with AdamW on ``--data stdlib`` (the byte corpus of
``benchmarks/text_corpus.py``: the first 98% of the token stream for training, windows of the last 2%
for profiling) or ``--data mock`` (MockGPTDataset's documents: ``1, 2, ..., n-1`` then EOD, n uniform
in [1, 4096), the data the H200 run used). Every ``--profile-every`` steps, on a fixed batch of
held-out windows, every layer's post-RoPE q and k go through the layer's own statistics
(``layers.profiler``) under the token-causal mask (``ops.mask.CausalMask``), on every row whose
group has a ranking choice: the recall curve with query groups and key blocks of ``--block`` tokens,
K per head for recall ``--target`` (``RecallCurve.k_for_recall``, the rule of
``DSVController.choose_k`` without its rounding to a multiple and its floor), its density K/U, and
token sparsity at the same critical mass. The ranking is exact q/k (``q_lr = q``, ``k_lr = k``): the
best a predictor can do, so these densities are lower bounds for what the run's predictors reach.
The same statistics for uniform attention (q = 0) are the reference: a layer at that density has
learned nothing DSV can use. Also logged: training and held-out loss in bits per token.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import numpy
import torch
import torch.nn as nn
import torch.nn.functional as F

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.json_out import write_json
from benchmarks.text_corpus import EOD, VOCAB_SIZE, build_corpus
from megatron_dsv.layers.profiler import recall_curve, sampled_attention_stats
from megatron_dsv.ops.mask import CausalMask


def _rope(x: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """Rotary embedding of ``[B, H, S, D]`` (halves rotated, as Megatron's non-interleaved RoPE)."""
    s, d = x.shape[2], x.shape[3]
    inv = base ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
    ang = torch.arange(s, dtype=torch.float32).view(-1, 1) * inv.view(1, -1)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    x1, x2 = x[..., : d // 2], x[..., d // 2 :]
    return x * cos + torch.cat([-x2, x1], -1) * sin


class Block(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor, keep: List) -> torch.Tensor:
        b, s, hd = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, s, 3, self.heads, hd // self.heads).permute(2, 0, 3, 1, 4)
        q, k = _rope(q), _rope(k)
        if keep is not None:
            keep.append((q.detach(), k.detach()))
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.proj(a.transpose(1, 2).reshape(b, s, hd))
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, layers: int, hidden: int, heads: int):
        super().__init__()
        self.emb = nn.Embedding(VOCAB_SIZE, hidden)
        self.blocks = nn.ModuleList(Block(hidden, heads) for _ in range(layers))
        self.ln = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, VOCAB_SIZE, bias=False)

    def forward(self, tokens: torch.Tensor, keep: List = None) -> torch.Tensor:
        x = self.emb(tokens)
        for blk in self.blocks:
            x = blk(x, keep)
        return self.head(self.ln(x))


def mock_stream(n_tokens: int, seed: int = 0) -> numpy.ndarray:
    """MockGPTDataset's documents (``1 .. n-1`` then EOD; its tokens wrap at its vocab, 1000 in the
    H200 run, which here is the byte vocab) concatenated to ``n_tokens``."""
    rng = numpy.random.default_rng(seed)
    parts, total = [], 0
    while total < n_tokens:
        n = int(rng.integers(1, 4096))
        parts.append(numpy.concatenate([(numpy.arange(n - 1) + 1) % EOD, [EOD]]))
        total += n
    return numpy.concatenate(parts)[:n_tokens].astype(numpy.int64)


def windows(stream: numpy.ndarray, starts: numpy.ndarray, length: int) -> torch.Tensor:
    return torch.from_numpy(numpy.stack([stream[s : s + length] for s in starts]).astype(numpy.int64))


@torch.no_grad()
def layer_stats(model: TinyGPT, tokens: torch.Tensor, block: int, target: float, uniform: bool = False) -> List[Dict]:
    keep: List = []
    model(tokens, keep)
    s = tokens.shape[1]
    mask = CausalMask("causal")
    rows = torch.arange(s)
    rows = rows[mask.rows_with_choice(rows, block, block, s)]
    out = []
    for q, k in keep:
        if uniform:
            q = torch.zeros_like(q)
        scale = q.shape[-1] ** -0.5
        curve = recall_curve(q, k, q, k, rows, group_size=block, kv_block=block, scale=scale,
                             critical_mass=target, mask=mask)
        k_units = curve.k_for_recall(target)
        tok = sampled_attention_stats(q[:, :, rows], k, scale, target, mask=mask, rows=rows)
        out.append({
            "k_per_head": k_units.tolist(),
            "density": float(k_units.double().mean()) / curve.num_units,
            "recall_at_k": curve.recall(k_units).tolist(),
            "token_sparsity": float(tok["sparsity"].mean()),
        })
        if uniform:
            break  # q = 0 gives every layer the same softmax (uniform over the prefix)
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", choices=("stdlib", "mock"), default="stdlib")
    p.add_argument("--corpus", default=None,
                   help="prefix of a text_corpus.py build (default: build one in a temp folder)")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--block", type=int, default=16, help="query group and key block size of the statistics")
    p.add_argument("--target", type=float, default=0.9, help="target recall (--dsv-critical-mass)")
    p.add_argument("--profile-every", type=int, default=50)
    p.add_argument("--eval-windows", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    if args.seq % args.block:
        raise ValueError(f"--seq {args.seq} must be a multiple of --block {args.block}.")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = numpy.random.default_rng(args.seed)

    if args.data == "stdlib":
        prefix = args.corpus
        if prefix is None:
            prefix = os.path.join(tempfile.mkdtemp(prefix="text_probe."), "stdlib")
            corpus = build_corpus(prefix)
        raw = Path(prefix + ".bin").read_bytes()
        if args.corpus is not None:
            corpus = {"prefix": prefix, "tokens": len(raw) // 2, "sha256": hashlib.sha256(raw).hexdigest()}
        stream = numpy.frombuffer(raw, dtype="<u2").astype(numpy.int64)
    else:
        corpus = {"mock": True}
        stream = mock_stream(4_000_000, args.seed)
    cut = int(len(stream) * 0.98)
    train, held = stream[:cut], stream[cut:]
    n = args.seq + 1
    eval_tokens = windows(held, rng.integers(0, len(held) - n, args.eval_windows), n)

    model = TinyGPT(args.layers, args.hidden, args.heads)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    def lr_factor(i: int) -> float:  # 20 warm-up steps, cosine to a tenth, as the H200 run's schedule
        return min(1.0, (i + 1) / 20) * (0.1 + 0.45 * (1 + math.cos(math.pi * min(i, args.steps) / args.steps)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)
    bits = 1 / math.log(2)
    uniform = layer_stats(model, eval_tokens[:, :-1], args.block, args.target, uniform=True)[0]
    print(f"uniform attention: density {uniform['density']:.3f} token sparsity {uniform['token_sparsity']:.3f}",
          flush=True)
    profiles, losses = [], []
    start = time.perf_counter()
    for step in range(args.steps + 1):
        if step % args.profile_every == 0 or step == args.steps:
            model.eval()
            with torch.no_grad():
                x = eval_tokens
                held_loss = float(F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())) * bits
            stats = layer_stats(model, eval_tokens[:, :-1], args.block, args.target)
            profiles.append({"step": step, "held_out_bits": held_loss, "layers": stats})
            print(f"step {step} held-out {held_loss:.3f} bits/token | " + " | ".join(
                f"L{i} density {s['density']:.3f} sparsity {s['token_sparsity']:.3f}" for i, s in enumerate(stats)),
                flush=True)
            model.train()
        if step == args.steps:
            break
        x = windows(train, rng.integers(0, len(train) - n, args.batch), n)
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()) * bits)
    result = {
        "env": {"device": f"CPU ({platform.processor() or platform.machine()}, {args.threads} threads)",
                "torch": torch.__version__, "python": platform.python_version()},
        "args": vars(args), "corpus": corpus, "seconds": round(time.perf_counter() - start, 1),
        "uniform": uniform, "train_bits": losses, "profiles": profiles,
    }
    if args.out:
        write_json(result, args.out)
    return result


if __name__ == "__main__":
    main()
