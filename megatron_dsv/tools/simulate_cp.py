"""Simulate the context-parallel planner on a cluster we do not have (e.g. 128 GPUs, 520k tokens).

    python -m megatron_dsv.tools.simulate_cp --gpus 128 --gpus-per-node 8 --seq-len 520000 \\
        --heads 16 --head-dim 128 --layers 32 [--calibration cal.json] [--out sim.json]

For every layer of a sparsity profile (synthetic, seeded, shaped like the DSV paper's; or measured:
``--profile``) it prints the planner's split, heads per rank and predicted attention time
(forward + backward) against pure head-parallel, pure sequence-parallel and an even head count,
and totals them. The compute fits are the ones shipped with the package (or ``--benchmark``);
link bandwidths and latencies come from a calibration (``python -m
megatron_dsv.tools.calibrate_cp``) where it measured them and are assumed elsewhere
(``--intra-gbps``, ``--inter-gbps``, ``--latency-ms``). Needs no repository files.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import math
import random
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from megatron_dsv.cp.cost_model import LINK_KINDS, AttentionShape, Calibration, CostModel, Links
from megatron_dsv.cp.planner import compare_plans, feasible_head_sizes


def synthetic_profile(
    num_layers: int, num_heads: int, seed: int = 0, dense_ish_frac: float = 0.15
) -> List[Optional[List[float]]]:
    """A per-layer, per-head sparsity profile shaped like the DSV paper's measurements.

    The first and the last layer stay dense (None: below the sparsity threshold; with fewer than 4
    layers none does). In the other layers each head is, with probability ``dense_ish_frac``, a dense-ish head with
    sparsity uniform in [0.5, 0.8], otherwise sparsity uniform in [0.9, 0.99]. Deterministic in
    ``seed`` (``random.Random``).
    """
    rng = random.Random(seed)
    dense = {0, num_layers - 1} if num_layers >= 4 else set()
    prof: List[Optional[List[float]]] = []
    for layer in range(num_layers):
        heads = [rng.uniform(0.5, 0.8) if rng.random() < dense_ish_frac else rng.uniform(0.9, 0.99)
                 for _ in range(num_heads)]
        prof.append(None if layer in dense else [round(x, 4) for x in heads])
    return prof


def load_profile(path) -> List[Optional[List[float]]]:
    """Per-layer sparsity from a file: a JSON list (per layer a list of per-head sparsities or
    null), a JSON object with ``layers`` (entries with ``sparsity`` and optional ``sparse`` flag,
    as the controller's stats log writes), or that log itself (``.jsonl``: the last record)."""
    text = Path(path).read_text()
    if str(path).endswith(".jsonl"):
        lines = [ln for ln in text.splitlines() if ln.strip()]
        data = json.loads(lines[-1])
    else:
        data = json.loads(text)
    layers = data["layers"] if isinstance(data, dict) else data
    out = []
    for entry in layers:
        if isinstance(entry, dict):
            sp = entry.get("sparsity")
            out.append(None if sp is None or entry.get("sparse") is False else [float(x) for x in sp])
        else:
            out.append(None if entry is None else [float(x) for x in entry])
    return out


def simulate(
    cost: CostModel,
    shape: AttentionShape,
    profile: Sequence[Optional[Sequence[float]]],
    *,
    cp_size: int,
    gpus_per_node: int,
    granule: int = 64,
    memory_budget_gib: Optional[float] = None,
) -> Dict:
    """Plan every layer of ``profile`` (per-layer sparsity per head, None = dense) and total it.

    Returns:
        JSON-ready dict: ``layers`` (per layer the comparison) and ``totals`` (ms summed over layers).
    """
    layers, tot = [], collections.defaultdict(float)
    for i, sp in enumerate(profile):
        dens = None if sp is None else [1.0 - float(x) for x in sp]
        cmp = compare_plans(cost, shape, dens, cp_size=cp_size, gpus_per_node=gpus_per_node, granule=granule,
                            memory_budget_gib=memory_budget_gib)
        entry = {"layer": i, "mode": "dense" if dens is None else "sparse",
                 "density": None if dens is None else [round(d, 6) for d in dens]}
        entry.update(cmp.to_dict())
        layers.append(entry)
        tot["planner_ms"] += cmp.best.total_ms
        tot["even_count_ms"] += cmp.even_count.total_ms
        tot["pure_head_ms"] += cmp.pure_head.total_ms if cmp.pure_head else math.nan
        tot["pure_seq_ms"] += cmp.pure_seq.total_ms if cmp.pure_seq else math.nan
    totals = dict(tot)
    totals["best_fixed_ms"] = min(totals["pure_head_ms"], totals["pure_seq_ms"])
    totals["speedup_vs_pure_head"] = totals["pure_head_ms"] / totals["planner_ms"]
    totals["speedup_vs_pure_seq"] = totals["pure_seq_ms"] / totals["planner_ms"]
    totals["speedup_vs_best_fixed"] = totals["best_fixed_ms"] / totals["planner_ms"]
    totals["lpt_vs_even_count"] = totals["even_count_ms"] / totals["planner_ms"]
    totals["target_met"] = totals["planner_ms"] <= totals["best_fixed_ms"] * (1 + 1e-12)
    return {"layers": layers, "totals": totals}


def _git_commit() -> Optional[str]:
    """Short commit of the checkout the simulator runs from (None for an installed package)."""
    import subprocess

    root = Path(__file__).resolve().parents[2]
    if not (root / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def links_note(links: Links) -> str:
    """One line saying which link kinds are measured (and where) and which are assumed."""

    def fmt(kinds):
        return ", ".join(f"{k} {getattr(links, k).gbps:.4g} GB/s + {getattr(links, k).latency_ms:.4g} ms"
                         for k in kinds) or "none"

    measured = links.measured
    assumed = [k for k in LINK_KINDS if k not in measured]
    return (f"links measured: {fmt(measured)}" + (f" ({links.source})" if measured else "")
            + f"; assumed: {fmt(assumed)}")


def _fmt_slots(plan_dict: Dict) -> str:
    hp = plan_dict["heads_per_slot"]
    return f"{min(hp)}-{max(hp)}" if min(hp) != max(hp) else f"{hp[0]}"


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Simulate the planner on a cluster; print the per-layer plan and totals; optional JSON."""
    p = argparse.ArgumentParser(prog="python -m megatron_dsv.tools.simulate_cp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", type=int, default=128, help="CP group size (GPUs holding one sequence)")
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=520000,
                   help="tokens per sample; padded up to whole query groups per rank")
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=None, help="key/value heads (GQA); default: --heads")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--hidden", type=int, default=None, help="model width (recorded; must be heads * head dim if given)")
    p.add_argument("--layers", type=int, default=32, help="layers of the synthetic profile")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--granule", type=int, default=64, help="tokens per query group (the benchmark's G = 64)")
    p.add_argument("--profile", default="synthetic",
                   help="'synthetic' or a JSON / stats .jsonl file (see load_profile)")
    p.add_argument("--seed", type=int, default=0, help="seed of the synthetic profile")
    p.add_argument("--benchmark", default=None,
                   help="kernel fits JSON or benchmarks/attention.py JSON; default: the fits shipped with the package")
    p.add_argument("--calibration", default=None,
                   help="calibration JSON (python -m megatron_dsv.tools.calibrate_cp): measured links replace the "
                        "assumed ones")
    p.add_argument("--intra-gbps", type=float, default=150.0,
                   help="NVLink all-to-all / p2p GB/s per GPU, where not calibrated (assumed)")
    p.add_argument("--inter-gbps", type=float, default=40.0,
                   help="InfiniBand GB/s per GPU, where not calibrated (assumed; 400 Gb/s NDR)")
    p.add_argument("--latency-ms", type=float, default=0.01,
                   help="per collective / ring step, where not calibrated (assumed)")
    p.add_argument("--union-factor", type=float, default=2.0, help="remote key union vs density (assumed)")
    p.add_argument("--memory-budget-gib", type=float, default=None, help="reject plans holding more K/V per rank")
    p.add_argument("--out", default=None, help="write the full result as JSON")
    args = p.parse_args(argv)

    if args.hidden is not None and args.hidden != args.heads * args.head_dim:
        p.error(f"--hidden {args.hidden} != --heads {args.heads} x --head-dim {args.head_dim}.")
    unit = args.gpus * args.granule
    seq_len = -(-args.seq_len // unit) * unit
    links = Links.assumed(args.intra_gbps, args.inter_gbps, args.latency_ms)
    cal = Calibration.load(args.calibration) if args.calibration else None
    cost = CostModel.from_benchmark(args.benchmark, links=links, calibration=cal, union_factor=args.union_factor)
    shape = AttentionShape(seq_len, args.heads, args.head_dim, args.kv_heads, args.batch)
    if args.profile == "synthetic":
        profile = synthetic_profile(args.layers, args.heads, args.seed)
        profile_desc = (f"synthetic (seed {args.seed}): layers 0 and {args.layers - 1} dense; other layers' heads "
                        f"sparsity U[0.9, 0.99], 15% of heads dense-ish U[0.5, 0.8]")
    else:
        profile = load_profile(args.profile)
        profile_desc = f"file {args.profile}"
    for i, sp in enumerate(profile):
        if sp is not None and len(sp) != args.heads:
            p.error(f"profile layer {i} has {len(sp)} heads, --heads is {args.heads}.")
    sim = simulate(cost, shape, profile, cp_size=args.gpus, gpus_per_node=args.gpus_per_node, granule=args.granule,
                   memory_budget_gib=args.memory_budget_gib)
    largest = max(feasible_head_sizes(shape, args.gpus))
    notes = [
        f"sequence {args.seq_len} tokens padded to {seq_len} (a multiple of gpus x granule = {unit}).",
        f"pure head-parallel = the largest feasible head split ({largest}) with the remaining factor "
        f"{args.gpus // largest} sequence-parallel" + (" (heads are fewer than GPUs)" if largest < args.gpus else "")
        + (f"; its all-to-all crosses nodes ({largest} > {args.gpus_per_node} GPUs per node)."
           if largest > args.gpus_per_node and args.gpus > args.gpus_per_node else "."),
        "imb = largest slot work (summed density) over the mean slot work, for LPT and for an even head count.",
        "pure sequence-parallel = head split 1. even_count = the planner's split with an even head-count "
        "assignment instead of LPT. Times are attention forward+backward per layer (ms), one micro-batch.",
        f"compute fitted on {cost.source} ({dict(cost.env).get('gpu', '?')}). {links_note(cost.links)}; key union "
        f"= min(1, {args.union_factor} x density) (assumed).",
    ]
    result = {
        "cluster": {"gpus": args.gpus, "gpus_per_node": args.gpus_per_node,
                    "nodes": -(-args.gpus // args.gpus_per_node)},
        "shape": {**dataclasses.asdict(shape), "seq_len_requested": args.seq_len, "hidden": args.hidden,
                  "layers": len(profile), "granule": args.granule},
        "profile": {"source": profile_desc, "sparsity": profile},
        "cost_model": cost.to_dict(),
        "benchmark": cost.source,
        "git_commit": _git_commit(),
        "args": {**vars(args), "benchmark": cost.source},
        "calibration": None if cal is None else cal.to_dict(),
        "notes": notes,
        **sim,
    }

    print(f"# {args.gpus} GPUs ({args.gpus_per_node}/node), S={seq_len}, H={args.heads}, H_kv={shape.num_kv_heads}, "
          f"D={args.head_dim}, B={args.batch}, {len(profile)} layers; profile: {profile_desc}")
    for n in notes:
        print(f"# {n}")
    print(f"{'layer':>5} {'mode':>6} {'dens':>6} {'g_h x g_s':>9} {'heads/slot':>10} {'imb LPT':>7} {'imb even':>8} "
          f"{'planner':>9} {'even cnt':>9} {'pure head':>9} {'pure seq':>9}  (ms, fwd+bwd)")
    for e in sim["layers"]:
        b = e["best"]
        dens = "-" if e["density"] is None else f"{sum(e['density']) / len(e['density']):.3f}"
        ph, ps = e["pure_head"], e["pure_seq"]
        print(f"{e['layer']:>5} {e['mode']:>6} {dens:>6} {b['head_size']:>4}x{b['seq_size']:<4} {_fmt_slots(b):>10} "
              f"{b['work_imbalance']:>7.3f} {e['even_count']['work_imbalance']:>8.3f} {b['predicted_ms']:>9.2f} "
              f"{e['even_count']['predicted_ms']:>9.2f} "
              f"{ph['predicted_ms'] if ph else math.nan:>9.2f} {ps['predicted_ms'] if ps else math.nan:>9.2f}")
    t = sim["totals"]
    print(f"total: planner {t['planner_ms']:.1f} ms, even head count {t['even_count_ms']:.1f} ms "
          f"(LPT x{t['lpt_vs_even_count']:.3f}), pure head {t['pure_head_ms']:.1f} ms "
          f"(x{t['speedup_vs_pure_head']:.3f}), pure seq {t['pure_seq_ms']:.1f} ms (x{t['speedup_vs_pure_seq']:.3f}); "
          f"target (<= best fixed) {'met' if t['target_met'] else 'MISSED'}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.out}")
    return result


__all__ = ["synthetic_profile", "load_profile", "simulate", "main"]


if __name__ == "__main__":
    main(sys.argv[1:])
