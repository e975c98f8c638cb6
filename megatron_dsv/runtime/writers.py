"""Where the runtime's statistics and decisions go: status lines, TensorBoard, W&B, JSON lines.

Only rank 0 writes (statistics are identical on every rank). A run without ``logging`` configured
still sees its decisions: the default ``log`` prints them (``DSVController(log=...)`` overrides).
"""

from __future__ import annotations

import json
import os
from typing import Dict, Optional

import torch.distributed as dist


def print_rank_0(msg: str) -> None:
    """Print on rank 0 only (every rank when torch.distributed is not initialised)."""
    if dist.is_initialized() and dist.get_rank() != 0:
        return
    print(msg, flush=True)


def layer_means(summary: Dict, name: str) -> Optional[float]:
    """Mean over layers of the per-layer mean of statistic ``name`` (None before any statistics)."""
    vals = []
    for layer in summary["layers"]:
        v = layer[name]
        if v is None:
            return None
        vals.append(sum(v) / len(v) if isinstance(v, list) else v)
    return sum(vals) / len(vals) if vals else None


def status_line(summary: Dict) -> str:
    """One compact line: stage, predictor loss, recall, sparsity, sparse layers."""
    it, stage = summary["iteration"], summary["stage"]
    n_sparse = sum(l["sparse"] for l in summary["layers"])
    n = len(summary["layers"])
    loss = layer_means(summary, "loss")
    if loss is None:
        return f"DSV it {it} stage {stage} | sparse layers {n_sparse}/{n}"
    line = (
        f"DSV it {it} stage {stage} | predictor loss {loss:.4f} | "
        f"recall {layer_means(summary, 'recall'):.3f} | token sparsity {layer_means(summary, 'sparsity'):.3f}"
    )
    rel, density = layer_means(summary, "relative_recall"), layer_means(summary, "density")
    if rel is not None:
        line += f" | density for target recall {density:.3f} | relative recall {rel:.3f}"
    line += f" | sparse layers {n_sparse}/{n}"
    ex = [l["cp_exchange"] for l in summary["layers"] if l.get("cp_exchange")]
    if ex:
        fetched, full = sum(e["fetched_bytes"] for e in ex), sum(e["allgather_bytes"] for e in ex)
        line += (f" | CP exchange {fetched / 2**20:.1f} MiB over {len(ex)} layers, "
                 f"{fetched / max(1, full):.3f} of an all-gather of K/V")
    return line


class StatsWriter:
    """Scalars per layer and head to TensorBoard / W&B, the summary to a JSON-lines file."""

    def __init__(self, tb_writer=None, wandb_writer=None, jsonl_path: Optional[str] = None):
        self.tb_writer, self.wandb_writer, self.jsonl_path = tb_writer, wandb_writer, jsonl_path

    def write(self, summary: Dict) -> None:
        if dist.is_initialized() and dist.get_rank() != 0:
            return
        iteration = summary["iteration"]
        scalars = {"dsv/stage": summary["stage"], "dsv/sparse_layers": sum(l["sparse"] for l in summary["layers"])}
        for l in summary["layers"]:
            if l["loss"] is None:
                continue
            n = l["layer"]
            scalars[f"dsv/predictor_loss/layer{n}"] = l["loss"]
            if l.get("relative_recall") is not None:
                scalars[f"dsv/density/layer{n}"] = l["density"]
                scalars[f"dsv/relative_recall/layer{n}"] = sum(l["relative_recall"]) / len(l["relative_recall"])
            for stat in ("sparsity", "recall"):
                scalars[f"dsv/{stat}/layer{n}"] = sum(l[stat]) / len(l[stat])
                for h, v in enumerate(l[stat]):
                    scalars[f"dsv/{stat}_heads/layer{n}/head{h}"] = v
        if self.tb_writer is not None:
            for k, v in scalars.items():
                self.tb_writer.add_scalar(k, v, iteration)
        if self.wandb_writer is not None:
            self.wandb_writer.log(scalars, iteration)
        if self.jsonl_path:
            os.makedirs(os.path.dirname(os.path.abspath(self.jsonl_path)), exist_ok=True)
            with open(self.jsonl_path, "a") as f:
                f.write(json.dumps(summary) + "\n")


__all__ = ["StatsWriter", "layer_means", "print_rank_0", "status_line"]
