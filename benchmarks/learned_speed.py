"""End-to-end training step at learned sparsity: 2.7B-shaped layers at 64k tokens with the per-layer,
per-head K that DSV chose in a quality run, against dense cuDNN (issue 14 item 4).

    python benchmarks/learned_speed.py --arms benchmarks/results/quality_procedural_arms.json \\
        --out benchmarks/results/learned_speed_h200.json

The densities are *transplanted*: the ``dsv`` arm of ``benchmarks/quality.py arms`` (``--seed``,
default its first seed) ended with K key units per head for each of its layers (``runs[i]
["layers"][l]["k"]``) out of ``units = tokens / kv_block`` of its own model. Layer ``i`` of this
benchmark takes source layer ``i % L_src``, head ``j`` source head ``j % H_src``, and K =
``ceil(k / units_src * units)`` (the same density, at least 1 unit); a layer the arm kept dense
stays dense. The JSON says so (``source``). Query group and key block default to the arm's, so a
K means the same granularity.

A megatron-core ``TransformerBlock`` of ``--layers`` layers (hidden 2048, 16 heads of 128, ffn
8192, B=1, bf16) runs forward + backward + a fused AdamW step: once with ``--dsv-mode dense``
(cuDNN SDPA), once with the transplanted K (DSV sparse layers as in stage 2: no predictor work,
no profiling; kernels as ``--dsv-backend`` picks them). Both are timed with ``do_bench``
(median) and their peak memory taken (optimizer state included); the dense block is freed before
the DSV block is built, and both hold the same weights. On a CPU (the smoke test) steps are
timed with a wall clock and no memory is reported.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))


def source_run(arms: Dict, seed: Optional[int]) -> Dict:
    """The ``dsv`` run of ``seed`` (default: the first) in an arms JSON."""
    runs = [r for r in arms.get("runs", []) if r.get("arm") == "dsv"]
    if seed is not None:
        runs = [r for r in runs if r.get("seed") == seed]
    if not runs:
        raise ValueError(f"the arms JSON holds no dsv run{'' if seed is None else f' of seed {seed}'}; run "
                         "`benchmarks/quality.py arms --arms dense,dsv,...` first or pick another --seed.")
    if not runs[0].get("layers"):
        raise ValueError("the dsv run has no per-layer summary ('layers'); it was cut short before its end.")
    return runs[0]


def source_units(setup: Dict) -> int:
    """Key units per row of the arms' model: tokens (latent grid / patch) / kv_block."""
    _, t, h, w = setup["latent_shape"]
    pt, ph, pw = setup["patch"]
    tokens = (t // pt) * (h // ph) * (w // pw)
    if tokens % setup["kv_block"]:
        raise ValueError(f"the arms' {tokens} tokens are not whole key blocks of {setup['kv_block']}.")
    return tokens // setup["kv_block"]


def transplant(layers: Sequence[Dict], units_src: int, num_layers: int, num_heads: int,
               units: int) -> List[Optional[List[int]]]:
    """K per head for each of ``num_layers`` layers (None: dense), from the arm's ``layers``
    (``{"sparse": bool, "k": [H_src] or None}``): layer ``i`` <- source ``i % L_src``, head ``j``
    <- source head ``j % H_src``, ``K = ceil(k / units_src * units)`` clamped to ``[1, units]``."""
    if not layers:
        raise ValueError("no source layers to transplant from.")
    out: List[Optional[List[int]]] = []
    for i in range(num_layers):
        src = layers[i % len(layers)]
        if not src.get("sparse") or src.get("k") is None:
            out.append(None)
            continue
        k = [int(x) for x in src["k"]]
        if not k or min(k) < 1 or max(k) > units_src:
            raise ValueError(f"source layer {src.get('layer')} has K {k} outside [1, {units_src}] units.")
        # the integer form of ceil(k * units / units_src): no float rounding of a whole density
        out.append([min(units, max(1, -(-k[j % len(k)] * units // units_src))) for j in range(num_heads)])
    return out


def _parse_cube(text: str):
    parts = [int(p) for p in text.lower().split("x")]
    if len(parts) != 3 or min(parts) < 1:
        raise ValueError(f"--query-group is TxHxW with positive integers, got {text!r}.")
    return tuple(parts)


def _bench(fn, device, warmup_ms: int, rep_ms: int, cpu_steps: int) -> float:
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    times = []
    for _ in range(cpu_steps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return sorted(times)[len(times) // 2]


def run(args) -> Dict:
    from megatron.core.transformer.transformer_block import TransformerBlock

    from benchmarks.quality import environment
    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.layers.state import StepControl
    from megatron_dsv.layers.transformer_config import DSVTransformerConfig
    from megatron_dsv.runtime.megatron import init_megatron
    from megatron_dsv.specs import dsv_gpt_layer_spec

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    with open(args.arms) as f:
        arms = json.load(f)
    src = source_run(arms, args.seed)
    setup = arms["setup"]
    units_src = source_units(setup)
    query_group = _parse_cube(args.query_group) if args.query_group else tuple(setup["query_group"])
    kv_block = args.kv_block or setup["kv_block"]
    group = math.prod(query_group)
    s = args.seqlen
    if s % group or s % kv_block:
        raise ValueError(f"--seqlen {s} must be a multiple of the query group ({group} tokens) and of the key "
                         f"block ({kv_block}); pick another --seqlen, --query-group or --kv-block.")
    units = s // kv_block
    plan = transplant(src["layers"], units_src, args.layers, args.heads, units)

    init_megatron(device.type)
    res: Dict = {
        "benchmark": "learned_speed", "environment": environment(device), "args": vars(args),
        "source": {"label": f"transplanted from {args.arms}", "file": os.path.abspath(args.arms),
                   "seed": src.get("seed"), "units": units_src, "kv_block": setup["kv_block"],
                   "query_group": list(setup["query_group"]),
                   "layers": [{"layer": l.get("layer"), "sparse": l.get("sparse"), "k": l.get("k")} for l in src["layers"]]},
        "S": s, "hidden": args.hidden, "heads": args.heads, "ffn": args.ffn, "layers": args.layers,
        "query_group": list(query_group), "kv_block": kv_block, "units": units,
    }

    def build(mode: str):
        cfg = DSVTransformerConfig(
            num_layers=args.layers, hidden_size=args.hidden, num_attention_heads=args.heads, ffn_hidden_size=args.ffn,
            hidden_dropout=0.0, attention_dropout=0.0, bias_dropout_fusion=False, gradient_accumulation_fusion=False,
            bf16=cuda, params_dtype=dtype, use_cpu_initialization=not cuda, dsv_mode=mode,
            dsv_query_group=query_group, dsv_kv_block=kv_block, dsv_backend=args.backend,
        )
        return TransformerBlock(cfg, dsv_gpt_layer_spec).to(device=device, dtype=dtype)

    torch.manual_seed(0)
    x = torch.randn(s, 1, args.hidden, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn_like(x)
    weights = None
    for name in ("dense", "dsv"):
        torch.manual_seed(0)
        block = build("dense" if name == "dense" else "auto")
        if weights is None:
            weights = {k: v.detach().cpu().clone() for k, v in block.state_dict().items() if not k.endswith("_extra_state")}
        else:
            block.load_state_dict({k: v.to(device) for k, v in weights.items()}, strict=False)
        if name == "dsv":
            attn = dsv_attention_layers(block)
            for a, k in zip(attn, plan):
                a.set_sparse(k is not None, None if k is None else torch.tensor(k, dtype=torch.int32))
                a.begin_iteration(StepControl(train_predictor=False, collect_stats=False))
        opt = torch.optim.AdamW(block.parameters(), lr=1e-6, fused=cuda)

        def train_step(block=block, opt=opt):
            block(x, attention_mask=None).backward(gy)
            opt.step()
            opt.zero_grad(set_to_none=True)
            x.grad = None

        train_step()  # allocate the optimizer state and compile kernels before measuring
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        res[f"{name}_ms"] = _bench(train_step, device, args.warmup, args.rep, args.cpu_steps)
        res[f"{name}_peak_gib"] = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
        if name == "dsv":
            res["per_layer"] = [{
                "layer": a.layer_number, "sparse": a.sparse, "k_transplanted": k,
                "k_used": None if not a.sparse else a.kv_count_global(s).tolist(),
                "density": None if not a.sparse else float(a.kv_count_global(s).double().mean()) / units,
                "path": a.describe(),
            } for a, k in zip(attn, plan)]
        print(f"{name}: {res[f'{name}_ms']:.2f} ms/step" + (f", peak {res[f'{name}_peak_gib']:.2f} GiB" if cuda else ""),
              flush=True)
        del block, opt, train_step
        if cuda:
            torch.cuda.empty_cache()
    res["speedup"] = res["dense_ms"] / res["dsv_ms"]
    if cuda:
        res["memory_ratio"] = res["dsv_peak_gib"] / res["dense_peak_gib"]
    sparse = [l for l in res["per_layer"] if l["sparse"]]
    res["mean_density_sparse_layers"] = sum(l["density"] for l in sparse) / len(sparse) if sparse else None
    print_table(res)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(res, f, indent=1)
    return res


def print_table(res: Dict) -> None:
    mem = lambda v: "-" if v is None else f"{v:.2f}"  # noqa: E731
    sparse = sum(1 for l in res["per_layer"] if l["sparse"])
    dens = res["mean_density_sparse_layers"]
    print(f"\n{res['source']['label']} (seed {res['source']['seed']}); {sparse}/{res['layers']} layers sparse, "
          f"mean density {'-' if dens is None else f'{dens:.3f}'} on them")
    print("| S | layers | dense ms (peak GiB) | DSV ms (peak GiB) | speedup |")
    print("|---|---|---|---|---|")
    print(f"| {res['S']} | {res['layers']} | {res['dense_ms']:.1f} ({mem(res['dense_peak_gib'])}) | "
          f"{res['dsv_ms']:.1f} ({mem(res['dsv_peak_gib'])}) | x{res['speedup']:.2f} |")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", required=True, help="arms JSON of benchmarks/quality.py with a dsv run")
    p.add_argument("--seed", type=int, default=None, help="the dsv run's seed (default: the first dsv run)")
    p.add_argument("--seqlen", type=int, default=65536)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--ffn", type=int, default=8192)
    p.add_argument("--query-group", default="", help="TxHxW query-group cube (default: the arms' model's)")
    p.add_argument("--kv-block", type=int, default=0, help="tokens per key block (default: the arms' model's)")
    p.add_argument("--backend", default="auto", help="--dsv-backend of the sparse layers")
    p.add_argument("--warmup", type=int, default=100, help="do_bench warm-up, ms")
    p.add_argument("--rep", type=int, default=5000,
                   help="do_bench repetition time, ms (it repeats rep / step time times: a long step needs a long rep)")
    p.add_argument("--cpu-steps", type=int, default=3, help="timed steps on a CPU (median)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", default=None)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
