"""Where sparse attention beats dense: the kernel benchmark's speedups as a lookup table."""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from megatron_dsv.ops._utils import log_once


@dataclass
class SpeedTable:
    """Where sparse attention beats dense, from the kernel benchmark.

    ``rows``: dicts with ``S``, ``D``, ``density`` (fraction of pairs computed) and ``speedup``
    (dense time / sparse time, selection included). Without rows, sparse is taken to be faster
    at ``density <= default_max_density`` (``--dsv-speed-table assume``); ``source`` says why in
    the warning logged once.
    """

    rows: List[Dict] = field(default_factory=list)
    default_max_density: float = 0.5
    source: str = "no speed table given"

    @classmethod
    def from_json(cls, path: str, kv_block: Optional[int] = None) -> "SpeedTable":
        """Read ``benchmarks/attention.py`` output: rows (under ``rows``) with ``kind`` starting
        with ``dsv``, ``S``, ``D``, ``sparsity`` (or ``density``), ``speedup_fwd_bwd`` (vs cuDNN
        dense, selection included) and ``kv_block``; only rows of ``kv_block`` when given."""
        with open(path) as f:
            data = json.load(f)
        raw = data.get("rows", data.get("results", [])) if isinstance(data, dict) else data
        rows = []
        for r in raw:
            if not str(r.get("kind", "dsv")).startswith("dsv"):
                continue
            if kv_block is not None and r.get("kv_block", kv_block) != kv_block:
                continue
            speed = r.get("speedup_fwd_bwd", r.get("speedup"))
            dens = r.get("density", None if r.get("sparsity") is None else 1 - r["sparsity"])
            if speed is None or dens is None or "S" not in r or "D" not in r:
                continue
            rows.append({"S": int(r["S"]), "D": int(r["D"]), "density": float(dens), "speedup": float(speed)})
        if not rows:
            raise ValueError(
                f"{path} holds no DSV rows with S, D, sparsity and speedup_fwd_bwd"
                + (f" for kv_block={kv_block}" if kv_block is not None else "")
                + "; write one with benchmarks/attention.py."
            )
        return cls(rows)

    def sparse_faster(self, seq_len: int, head_dim: int, density: float) -> bool:
        if not self.rows:
            log_once(
                logging.WARNING,
                f"DSV: {self.source}: assuming sparse attention is faster at density <= "
                f"{self.default_max_density}, unmeasured (--dsv-speed-table measure times it in the run "
                "for layers without context parallelism).",
            )
            return density <= self.default_max_density
        d_best = min({r["D"] for r in self.rows}, key=lambda d: abs(d - head_dim))
        rows = [r for r in self.rows if r["D"] == d_best]
        s_best = min({r["S"] for r in rows}, key=lambda s: abs(math.log(s / seq_len)))
        pts = sorted((r["density"], r["speedup"]) for r in rows if r["S"] == s_best)
        if density <= pts[0][0]:
            return pts[0][1] > 1.0
        if density >= pts[-1][0]:
            return pts[-1][1] > 1.0 and density <= pts[-1][0] * 1.05
        for (d0, v0), (d1, v1) in zip(pts, pts[1:]):
            if d0 <= density <= d1:
                return v0 + (v1 - v0) * (density - d0) / (d1 - d0) > 1.0
        return False


__all__ = ["SpeedTable"]
