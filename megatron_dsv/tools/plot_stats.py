"""Render a run's DSV statistics as PNG: a layer x head sparsity heatmap and recall/loss curves.

    python -m megatron_dsv.tools.plot_stats RUN/dsv_stats.jsonl --out RUN/plots

Reads the JSON lines the controller writes with ``--dsv-stats-log`` and writes
``sparsity_heatmap.png`` (per layer and head, at the last profiling iteration; sparse layers
marked with their mean K) and ``curves.png`` (per-layer recall, sparsity and predictor loss over
iterations, the stage switch marked). Needs matplotlib (``pip install megatron_dsv[viz]``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List


def load(path: str) -> List[Dict]:
    with open(path) as f:
        lines = [json.loads(line) for line in f if line.strip()]
    if not lines:
        raise SystemExit(f"{path} holds no statistics (was --dsv-stats-log set and a profile run?)")
    return lines


def plot(lines: List[Dict], out_dir: str) -> List[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - optional dependency
        raise SystemExit(f"plot_stats needs matplotlib ({err}); pip install matplotlib") from err
    os.makedirs(out_dir, exist_ok=True)
    last = lines[-1]
    layers = [l for l in last["layers"] if l["sparsity"] is not None]
    grid = [l["sparsity"] for l in layers]

    fig, ax = plt.subplots(figsize=(max(6, 2 + 0.45 * len(grid[0])), max(3, 1.5 + 0.35 * len(grid))))
    im = ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
    ax.set_xlabel("head")
    ax.set_xticks(range(len(grid[0])))
    ax.set_ylabel("layer")
    ax.set_yticks(range(len(layers)), [
        f"{l['layer']}" + (f" sparse (K~{sum(l['k']) // len(l['k'])})" if l["sparse"] and l["k"] else "")
        for l in layers
    ])
    ax.set_title(f"sparsity per head, iteration {last['iteration']} (stage {last['stage']})")
    fig.colorbar(im, ax=ax, label="sparsity")
    fig.tight_layout()
    heat = os.path.join(out_dir, "sparsity_heatmap.png")
    fig.savefig(heat, dpi=120)
    plt.close(fig)

    its = [ln["iteration"] for ln in lines]
    fig, axes = plt.subplots(3, 1, figsize=(8, 9), sharex=True)
    for idx, layer in enumerate(layers):
        def series(stat, mean=True):
            vals = [ln["layers"][idx][stat] for ln in lines]
            return [None if v is None else (sum(v) / len(v) if mean else v) for v in vals]

        axes[0].plot(its, series("recall"), label=f"layer {layer['layer']}")
        axes[1].plot(its, series("sparsity"), label=f"layer {layer['layer']}")
        axes[2].plot(its, series("loss", mean=False), label=f"layer {layer['layer']}")
    for ax, name in zip(axes, ("predictor recall", "sparsity", "predictor loss")):
        ax.set_ylabel(name)
        if last.get("switch_iteration") is not None:
            ax.axvline(last["switch_iteration"], color="k", linestyle="--", linewidth=1)
    axes[2].set_yscale("log")
    axes[2].set_xlabel("iteration (dashed: stage switch)")
    if len(layers) <= 12:
        axes[0].legend(fontsize=7, ncol=2)
    fig.tight_layout()
    curves = os.path.join(out_dir, "curves.png")
    fig.savefig(curves, dpi=120)
    plt.close(fig)
    return [heat, curves]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stats", help="JSON-lines file written with --dsv-stats-log")
    p.add_argument("--out", default=None, help="output folder (default: beside the stats file)")
    args = p.parse_args(argv)
    out = args.out or os.path.join(os.path.dirname(os.path.abspath(args.stats)), "dsv_plots")
    for path in plot(load(args.stats), out):
        print(path)


if __name__ == "__main__":
    sys.exit(main())
