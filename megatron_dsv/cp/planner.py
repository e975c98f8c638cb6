"""Cost model and per-layer context-parallel planner, with a cluster simulator (DESIGN.md section 5).

A CP group of ``N`` ranks is split ``head_size x seq_size`` (``g_h x g_s``, layout in
:mod:`megatron_dsv.cp.plan`). For every layer the planner enumerates the feasible splits, gives
each head slot a set of heads balanced by per-head work (LPT, :func:`balance_heads`), predicts the
layer's attention time (forward + backward) with :class:`CostModel` and keeps the fastest.
:class:`ReplanPolicy` re-plans a layer when the profiler's sparsity moved, at a bounded cadence;
:func:`check_plans_agree` proves every rank holds the same plans. ``python -m
megatron_dsv.cp.planner`` simulates a cluster we do not have (e.g. 128 GPUs, 520k tokens).

What the cost model assumes (all times in ms, bytes per element ``e``, batch ``B``, tokens ``S``,
head dim ``D``, ``H`` query heads, ``H_kv`` key/value heads, slot ``j`` holds ``h_j`` query heads
and receives ``kv_j`` key/value heads):

* **Compute** comes from the kernel benchmark (``benchmarks/attention.py`` JSON, H100, H = 16,
  S = 65536, fwd+bwd), divided by heads and batch, fitted per measured head dim by least squares:
  ``dense(Sq, Skv) = c * Sq*Skv`` (cuDNN), ``sparse(Sq, Skv, d) = a * Sq + b * Sq*Skv*d`` (the
  ``a`` term is the density-independent per-query work: q/o/do/lse traffic) and
  ``select(Sq, Skv) = s * Sq*Skv`` (predictor scores + top-k, independent of the density). Head dims
  between two measured ones interpolate each coefficient linearly in D; outside the measured range
  the nearest one is scaled by ``D / D_near`` (FLOPs and bytes grow with D; same efficiency assumed),
  selection unchanged (it works at predictor rank r). The sparse kernel measured is the one with
  64-key blocks and 64-query groups.
* **Head all-to-all** (``g_h > 1``): forward sends q, k, v of the rank's ``S/N`` tokens to the slots
  owning those heads and receives the output back; backward moves the same volume (dout in; dq, dk,
  dv out). Per collective a rank's time is ``max(send, receive) / bandwidth`` per link class (peers
  in its node over ``intra_node_gbps``, others over ``inter_node_gbps``, concurrently) plus
  ``latency_ms``; the collective lasts as long as its slowest rank. Not overlapped with compute.
* **Sequence part** (``g_s > 1``), a rank holds ``Sq = S / g_s`` queries of its heads and all S keys:
  dense layers run a ring passing K, V chunks (``Sq`` tokens) ``g_s - 1`` times forward and K, V,
  dK, dV backward, each step overlapping its transfer (``time = max(compute, transfer)`` per step).
  Sparse layers all-gather the rank-r predictor keys, then fetch, per key/value head, the union of
  remote key blocks its queries selected: ``u * (S - Sq) * D * 2 * e * B`` bytes forward and the
  same for dK, dV backward, not overlapped (selection must finish before the fetch, conservative).
  ``u = min(1, union_factor * density)`` of the query head (the largest over a GQA group a slot
  holds whole): **an assumption** (default 2.0) that the runtime's measured union replaces
  (``union_density``, e.g. ``ExchangeStats.union_density`` of ``cp/seq_parallel.py``). A ring or
  fetch that crosses a node boundary runs at ``inter_node_gbps``.
* A layer's time is the all-to-all plus the slowest slot's compute + exposed sequence
  communication (collectives synchronise, so the slot with most work sets the pace).
* CP ranks are consecutive on nodes (TP = 1, CP innermost): CP rank r lives on node
  ``r // gpus_per_node``. Bandwidths are per GPU per direction (algorithmic) and are inputs; the
  defaults are assumptions, not measurements: NVLink all-to-all 150 GB/s, InfiniBand NDR 400 Gb/s
  per GPU at about 40 GB/s achieved.
* Memory (optional budget): the K, V, dK, dV a rank holds at the backward's peak, see
  :attr:`SlotTime.kv_bytes`.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import json
import math
import random
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_dsv.cp.head_parallel import kv_send_heads
from megatron_dsv.cp.plan import LayerPlan, balance_heads, even_slots, head_unit

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_BENCHMARK = REPO_ROOT / "benchmarks" / "results" / "attention_h100_20261124_pass4.json"
DEFAULT_RING_BENCHMARK = REPO_ROOT / "benchmarks" / "results" / "cp_chunk_h100_20261124_privops.json"

Density = Optional[Sequence[float]]
"""Per query head ``1 - sparsity`` (fraction of (query, key) pairs computed), ``[H]``; None: dense."""


def _xfer_ms(nbytes: float, gbps: float) -> float:
    """Milliseconds to move ``nbytes`` at ``gbps`` GB/s (1 GB = 1e9 bytes)."""
    return nbytes / (gbps * 1e6)


# ---------------------------------------------------------------------------------------------
# shapes and kernel fits


@dataclass(frozen=True)
class AttentionShape:
    """One attention layer as the CP group sees it (heads of one tensor-parallel rank).

    Attributes:
        seq_len: tokens per sample over the whole CP group, ``S``.
        num_heads: query heads ``H``.
        head_dim: ``D``.
        num_kv_heads: key/value heads ``H_kv`` (GQA), ``H % H_kv == 0``; None means ``H``.
        batch: samples per micro-batch ``B``.
        bytes_per_elem: ``e`` (bf16 = 2).
        predictor_rank: low-rank predictor width ``r`` per head (its keys are all-gathered).
    """

    seq_len: int
    num_heads: int
    head_dim: int
    num_kv_heads: Optional[int] = None
    batch: int = 1
    bytes_per_elem: int = 2
    predictor_rank: int = 16

    def __post_init__(self):
        if self.num_kv_heads is None:
            object.__setattr__(self, "num_kv_heads", self.num_heads)
        for name in ("seq_len", "num_heads", "head_dim", "num_kv_heads", "batch", "bytes_per_elem", "predictor_rank"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"AttentionShape.{name} must be >= 1, got {getattr(self, name)}.")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})."
            )

    @property
    def q_per_kv(self) -> int:
        return self.num_heads // self.num_kv_heads


@dataclass(frozen=True)
class KernelFit:
    """Per-head, per-sample attention times (fwd+bwd, ms) fitted at one head dim.

    Pairs are counted in units of 1e9 (query, key) pairs ("Gpair"), queries in units of 1e6.
    """

    head_dim: int
    dense_ms_per_gpair: float
    """cuDNN dense fwd+bwd per 1e9 pairs."""
    dense_fwd_fraction: float
    """Forward share of the dense fwd+bwd time (splits ring steps into forward and backward)."""
    sparse_ms_per_mquery: float
    """Sparse fwd+bwd work independent of density, per 1e6 queries."""
    sparse_ms_per_gpair: float
    """Sparse fwd+bwd per 1e9 computed pairs (pairs x density)."""
    select_ms_per_gpair: float
    """Selection (predictor scores + top-k) per 1e9 pairs before sparsification."""

    def dense_ms(self, sq: float, skv: float) -> float:
        return self.dense_ms_per_gpair * sq * skv * 1e-9

    def sparse_ms(self, sq: float, skv: float, density: float) -> float:
        return self.sparse_ms_per_mquery * sq * 1e-6 + self.sparse_ms_per_gpair * sq * skv * density * 1e-9

    def select_ms(self, sq: float, skv: float) -> float:
        return self.select_ms_per_gpair * sq * skv * 1e-9


def _lstsq2(xs: Sequence[Tuple[float, float]], ys: Sequence[float]) -> Tuple[float, float]:
    """Least squares ``y = a*x0 + b*x1`` with ``a >= 0`` (refit ``b`` alone when ``a`` < 0)."""
    s00 = sum(x[0] * x[0] for x in xs)
    s01 = sum(x[0] * x[1] for x in xs)
    s11 = sum(x[1] * x[1] for x in xs)
    t0 = sum(x[0] * y for x, y in zip(xs, ys))
    t1 = sum(x[1] * y for x, y in zip(xs, ys))
    det = s00 * s11 - s01 * s01
    if len(xs) >= 2 and abs(det) > 1e-12 * max(s00 * s11, 1e-300):
        a = (t0 * s11 - t1 * s01) / det
        b = (t1 * s00 - t0 * s01) / det
        if a >= 0 and b > 0:
            return a, b
    return 0.0, t1 / s11


def fit_kernel_rows(rows: Sequence[Dict], heads: int, batch: int = 1) -> Tuple[KernelFit, ...]:
    """Fit :class:`KernelFit` per head dim from ``benchmarks/attention.py`` rows.

    Uses rows of kind ``cudnn_dense`` (``fwd_ms``, ``bwd_ms``, ``fwd_bwd_ms``) and ``dsv_*``
    (``fwd_bwd_ms`` without selection, ``select_ms``, ``sparsity``); ``S`` and ``D`` per row. Times
    are for ``heads`` heads and ``batch`` samples and are divided by both.
    """
    by_d: Dict[int, Dict[str, list]] = collections.defaultdict(lambda: {"dense": [], "sparse": []})
    for row in rows:
        kind = str(row.get("kind", ""))
        if kind == "cudnn_dense":
            by_d[int(row["D"])]["dense"].append(row)
        elif kind.startswith("dsv") and "fwd_bwd_ms" in row and "select_ms" in row:
            by_d[int(row["D"])]["sparse"].append(row)
    n = heads * batch
    fits = []
    for d in sorted(by_d):
        dense, sparse = by_d[d]["dense"], by_d[d]["sparse"]
        if not dense or not sparse:
            continue
        xd = [float(r["S"]) ** 2 * 1e-9 for r in dense]
        c = sum(x * r["fwd_bwd_ms"] / n for x, r in zip(xd, dense)) / sum(x * x for x in xd)
        ffrac = sum(r["fwd_ms"] / (r["fwd_ms"] + r["bwd_ms"]) for r in dense) / len(dense)
        xs = [(float(r["S"]) * 1e-6, float(r["S"]) ** 2 * (1.0 - float(r["sparsity"])) * 1e-9) for r in sparse]
        a, b = _lstsq2(xs, [r["fwd_bwd_ms"] / n for r in sparse])
        xsel = [float(r["S"]) ** 2 * 1e-9 for r in sparse]
        s = sum(x * r["select_ms"] / n for x, r in zip(xsel, sparse)) / sum(x * x for x in xsel)
        fits.append(KernelFit(d, c, ffrac, a, b, s))
    if not fits:
        raise ValueError("no head dim has both cudnn_dense and dsv_* rows with fwd_bwd_ms and select_ms to fit.")
    return tuple(fits)


# ---------------------------------------------------------------------------------------------
# plan costs


@dataclass(frozen=True)
class SlotTime:
    """Predicted time of one head slot (every rank of the slot's sequence group), ms, fwd+bwd."""

    heads: Tuple[int, ...]
    kv_heads: int
    """Key/value heads the slot receives: each GQA group once when the slot holds it whole, else one
    per query head (as :func:`megatron_dsv.cp.head_parallel.kv_send_heads` sends them)."""
    work: float
    """Summed density of the slot's heads (number of heads for a dense layer)."""
    compute_ms: float
    """Attention kernels (+ selection for sparse layers) of the slot's heads on ``S/g_s`` queries."""
    head_a2a_ms: float
    """Head all-to-alls (4 collectives); shared by the head group, set by its busiest rank."""
    seq_comm_ms: float
    """Sequence-part transfer time (ring steps or predictor all-gather + key fetch), overlapped or not."""
    seq_exposed_ms: float
    """Part of the sequence communication not hidden under compute."""
    kv_bytes: int
    """K, V, dK, dV bytes held at the backward's peak: ``4*S`` tokens per kv head without a
    sequence split; ``8*Sq`` (local + in-flight chunk) for the ring; local ``4*Sq`` plus ``4*u*(S-Sq)``
    fetched for sparse layers; times ``B * D * e``."""
    total_ms: float


@dataclass(frozen=True)
class PlanCost:
    """A plan (``plan.predicted_ms`` filled) with its per-slot breakdown."""

    plan: LayerPlan
    slots: Tuple[SlotTime, ...]
    head_link: str
    """``none`` (g_h = 1), ``intra`` or ``inter`` (some head group spans nodes)."""
    seq_link: str
    """``none`` (g_s = 1), ``intra`` or ``inter`` (sequence groups span nodes)."""

    @property
    def total_ms(self) -> float:
        return self.plan.predicted_ms

    @property
    def imbalance(self) -> float:
        """Slowest slot's compute over the mean slot's compute (1.0 = balanced)."""
        c = [s.compute_ms for s in self.slots]
        mean = sum(c) / len(c)
        return max(c) / mean if mean > 0 else 1.0

    @property
    def work_imbalance(self) -> float:
        """Largest slot work over mean slot work (1.0 = balanced)."""
        w = [s.work for s in self.slots]
        mean = sum(w) / len(w)
        return max(w) / mean if mean > 0 else 1.0

    def to_dict(self) -> Dict:
        crit = max(self.slots, key=lambda s: s.total_ms)
        return {
            "head_size": self.plan.head_size,
            "seq_size": self.plan.seq_size,
            "predicted_ms": self.plan.predicted_ms,
            "slots": [list(s) for s in self.plan.slots],
            "heads_per_slot": [len(s) for s in self.plan.slots],
            "slot_work": [s.work for s in self.slots],
            "slot_total_ms": [s.total_ms for s in self.slots],
            "imbalance": self.imbalance,
            "work_imbalance": self.work_imbalance,
            "head_link": self.head_link,
            "seq_link": self.seq_link,
            "critical_slot": {k: v for k, v in dataclasses.asdict(crit).items() if k != "heads"},
            "max_kv_gib": max(s.kv_bytes for s in self.slots) / 2**30,
        }


@dataclass(frozen=True)
class CostModel:
    """Attention time of a layer under a CP plan: kernel fits + link bandwidths (module docstring).

    Attributes:
        fits: kernel fits, one per measured head dim, ascending.
        intra_node_gbps: all-to-all / point-to-point bandwidth inside a node, GB/s per GPU per
            direction (assumption: NVLink ~150 GB/s achieved in all-to-all).
        inter_node_gbps: across nodes, GB/s per GPU per direction (assumption: InfiniBand NDR
            400 Gb/s per GPU, ~40 GB/s achieved).
        latency_ms: fixed cost per collective or ring step.
        union_factor: key-block union over a rank's query groups relative to one group's density,
            ``u = min(1, union_factor * density)`` (assumption; measured unions replace it).
        ring_compute_factor: time of a dense ring step relative to cuDNN dense attention on the
            same chunk pair. The ring needs each step's log-sum-exp, which the public SDPA does not
            return; on GPU its steps run PyTorch's cuDNN op that does (0.97x SDPA, measured on an
            H100, ``benchmarks/results/cp_chunk_h100_20261124_privops.json``, loaded by
            :meth:`from_benchmark`; our Triton all-blocks fallback is 1.43-1.53x).
        source: the benchmark file the fits came from; ``env``: its hardware line.
    """

    fits: Tuple[KernelFit, ...]
    intra_node_gbps: float = 150.0
    inter_node_gbps: float = 40.0
    latency_ms: float = 0.01
    union_factor: float = 2.0
    ring_compute_factor: float = 1.0
    source: str = ""
    env: Tuple[Tuple[str, str], ...] = ()

    def __post_init__(self):
        if not self.fits:
            raise ValueError("CostModel needs at least one KernelFit.")
        object.__setattr__(self, "fits", tuple(sorted(self.fits, key=lambda f: f.head_dim)))
        for name in ("intra_node_gbps", "inter_node_gbps"):
            if not getattr(self, name) > 0:
                raise ValueError(f"CostModel.{name} must be > 0 GB/s, got {getattr(self, name)}.")
        if self.latency_ms < 0:
            raise ValueError(f"CostModel.latency_ms must be >= 0, got {self.latency_ms}.")
        if self.ring_compute_factor <= 0:
            raise ValueError(f"CostModel.ring_compute_factor must be > 0, got {self.ring_compute_factor}.")
        if self.union_factor < 1:
            raise ValueError(
                f"CostModel.union_factor must be >= 1 (a union covers each group), got {self.union_factor}."
            )

    @classmethod
    def from_benchmark(cls, path=DEFAULT_BENCHMARK, ring_path=DEFAULT_RING_BENCHMARK, **kwargs) -> "CostModel":
        """Fit the kernels from a ``benchmarks/attention.py`` JSON (``env``, ``args``, ``rows``)
        and the ring step factor from a ``benchmarks/cp_chunk.py`` JSON (the mean ratio to cuDNN
        SDPA of the step the runtime uses: the cuDNN op where it was correct, else Triton; skipped
        when ``ring_path`` is None or missing); ``kwargs`` set the bandwidths, latency and union
        factor."""
        if ring_path is not None and Path(ring_path).exists() and "ring_compute_factor" not in kwargs:
            with open(ring_path) as f:
                rows = json.load(f)["rows"]
            variant = "cudnn_op" if all(r.get("cudnn_op", {}).get("correct") for r in rows) else "triton"
            ratios = [r[variant]["vs_cudnn_sdpa_fwd_bwd"] for r in rows if r.get(variant, {}).get("correct")]
            if ratios:
                kwargs["ring_compute_factor"] = sum(ratios) / len(ratios)
        path = Path(path)
        with open(path) as f:
            data = json.load(f)
        args = data.get("args", {})
        fits = fit_kernel_rows(data["rows"], heads=int(args.get("heads", 16)), batch=int(args.get("batch", 1)))
        try:
            source = str(path.resolve().relative_to(REPO_ROOT))
        except ValueError:
            source = str(path)
        env = tuple((str(k), v if isinstance(v, (str, int, float, bool, type(None))) else str(v))
                    for k, v in data.get("env", {}).items())
        return cls(fits=fits, source=source, env=env, **kwargs)

    def fit_for(self, head_dim: int) -> KernelFit:
        """The kernel fit at ``head_dim``: measured, interpolated linearly in D, or the nearest
        measured one scaled by ``head_dim / D_near`` (selection unscaled)."""
        dims = [f.head_dim for f in self.fits]
        if head_dim in dims:
            return self.fits[dims.index(head_dim)]
        lo = [f for f in self.fits if f.head_dim < head_dim]
        hi = [f for f in self.fits if f.head_dim > head_dim]
        if lo and hi:
            a, b = lo[-1], hi[0]
            t = (head_dim - a.head_dim) / (b.head_dim - a.head_dim)
            mix = lambda x, y: x + t * (y - x)  # noqa: E731
            return KernelFit(
                head_dim, *(mix(getattr(a, k), getattr(b, k)) for k in (
                    "dense_ms_per_gpair", "dense_fwd_fraction", "sparse_ms_per_mquery",
                    "sparse_ms_per_gpair", "select_ms_per_gpair")),
            )
        near = hi[0] if hi else lo[-1]
        r = head_dim / near.head_dim
        return KernelFit(
            head_dim, near.dense_ms_per_gpair * r, near.dense_fwd_fraction, near.sparse_ms_per_mquery * r,
            near.sparse_ms_per_gpair * r, near.select_ms_per_gpair,
        )

    def to_dict(self) -> Dict:
        return {
            "source": self.source,
            "env": dict(self.env),
            "intra_node_gbps": self.intra_node_gbps,
            "inter_node_gbps": self.inter_node_gbps,
            "latency_ms": self.latency_ms,
            "union_factor": self.union_factor,
            "ring_compute_factor": self.ring_compute_factor,
            "fits": [dataclasses.asdict(f) for f in self.fits],
            "fit_units": "ms per head per sample: dense = dense_ms_per_gpair * Sq*Skv/1e9; sparse = "
                         "sparse_ms_per_mquery * Sq/1e6 + sparse_ms_per_gpair * Sq*Skv*density/1e9; "
                         "select = select_ms_per_gpair * Sq*Skv/1e9 (fwd+bwd)",
        }

    # ---- the model -------------------------------------------------------------------------

    def plan_cost(
        self,
        shape: AttentionShape,
        plan: LayerPlan,
        density: Density,
        *,
        gpus_per_node: int,
        union_density: Optional[Sequence[float]] = None,
    ) -> PlanCost:
        """Predicted per-slot time of ``plan`` for one layer (fwd+bwd, ms).

        Args:
            shape: the layer; ``plan.num_heads`` must equal ``shape.num_heads``.
            plan: the split and head slots (its ``predicted_ms`` is ignored and filled in the result).
            density: per query head ``1 - sparsity``, ``[H]``, or None for a dense layer (also
                DSV stage 1).
            gpus_per_node: GPUs per node; CP rank r is on node ``r // gpus_per_node``.
            union_density: measured per key/value head union density of remote key blocks ``[H_kv]``
                (replaces ``union_factor``); sparse layers only.

        Returns:
            :class:`PlanCost` with ``plan.predicted_ms`` = all-to-all + the slowest slot.
        """
        density = _check_density(shape, density)
        union, union_heads = self._union(shape, density, union_density)
        g_h, g_s = plan.head_size, plan.seq_size
        if plan.num_heads != shape.num_heads:
            raise ValueError(f"the plan has {plan.num_heads} heads, the layer {shape.num_heads}.")
        if gpus_per_node < 1:
            raise ValueError(f"gpus_per_node must be >= 1, got {gpus_per_node}.")
        fit = self.fit_for(shape.head_dim)
        s, b = shape.seq_len, shape.batch
        tok_bytes = b * shape.head_dim * shape.bytes_per_elem  # one token of one head
        sq = s / g_s
        # key/value heads each slot receives, as the runtime sends them: a GQA group once when the
        # slot holds it whole, else one key/value head per query head
        kv_sets = kv_send_heads(plan.slots, shape.q_per_kv)
        a2a_ms, head_link = self._a2a_ms(shape, plan, [len(k) for k in kv_sets], gpus_per_node)
        slots = []
        for j, heads in enumerate(plan.slots):
            kvs = kv_sets[j]
            members = [i * g_h + j for i in range(g_s)]
            nodes = [r // gpus_per_node for r in members]
            count = collections.Counter(nodes)
            if density is None:
                work = float(len(heads))
                compute = b * len(heads) * fit.dense_ms(sq, s) * (self.ring_compute_factor if g_s > 1 else 1.0)
                if g_s == 1:
                    seq_comm = exposed = 0.0
                    kv_bytes = 4 * s * len(kvs) * tok_bytes
                else:
                    # ring: step compute on one chunk pair; transfer of one K,V chunk (fwd) or
                    # K,V,dK,dV (bwd) over the slowest hop
                    ring_inter = any(nodes[i] != nodes[(i + 1) % g_s] for i in range(g_s))
                    gbps = self.inter_node_gbps if ring_inter else self.intra_node_gbps
                    step = b * len(heads) * fit.dense_ms(sq, sq) * self.ring_compute_factor
                    cf, cb = step * fit.dense_fwd_fraction, step * (1.0 - fit.dense_fwd_fraction)
                    chunk = 2 * sq * len(kvs) * tok_bytes
                    tf = _xfer_ms(chunk, gbps) + self.latency_ms
                    tb = _xfer_ms(2 * chunk, gbps) + self.latency_ms
                    seq_comm = (g_s - 1) * (tf + tb)
                    exposed = (g_s - 1) * (max(0.0, tf - cf) + max(0.0, tb - cb))
                    kv_bytes = int(8 * sq * len(kvs) * tok_bytes)
            else:
                work = float(sum(density[h] for h in heads))
                compute = b * sum(fit.sparse_ms(sq, s, density[h]) + fit.select_ms(sq, s) for h in heads)
                if len(kvs) * shape.q_per_kv == len(heads):
                    u_slot = [union[k] for k in kvs]  # whole groups: the group's union
                else:  # one key/value copy per query head: that head's own selection
                    u_slot = [union_heads[h] for h in heads]
                kv_tokens = sum(sq + u * (s - sq) for u in u_slot) if g_s > 1 else s * len(kvs)
                kv_bytes = int(4 * kv_tokens * tok_bytes)
                if g_s == 1:
                    seq_comm = exposed = 0.0
                else:
                    # predictor keys all-gathered from every peer, then the union of selected key
                    # blocks fetched (K,V forward, dK,dV returned backward): per peer an equal share
                    lowrank = sq * len(heads) * b * shape.predictor_rank * shape.bytes_per_elem
                    fetch = sum(u_slot) * sq * 2 * tok_bytes
                    worst = 0.0
                    for r_node in nodes:
                        intra, inter = count[r_node] - 1, g_s - count[r_node]
                        t = 0.0
                        for per_peer in (lowrank, fetch, fetch):
                            t += max(_xfer_ms(intra * per_peer, self.intra_node_gbps),
                                     _xfer_ms(inter * per_peer, self.inter_node_gbps)) + self.latency_ms
                        worst = max(worst, t)
                    seq_comm = exposed = worst
            slots.append(SlotTime(tuple(heads), len(kvs), work, compute, a2a_ms, seq_comm, exposed, kv_bytes,
                                  a2a_ms + compute + exposed))
        spans = any(len({(i * g_h + j) // gpus_per_node for i in range(g_s)}) > 1 for j in range(g_h))
        seq_link = "none" if g_s == 1 else ("inter" if spans else "intra")
        total = max(st.total_ms for st in slots)
        return PlanCost(dataclasses.replace(plan, predicted_ms=total), tuple(slots), head_link, seq_link)

    def _union(self, shape, density, union_density):
        """Union density of remote key blocks per key/value head ``[H_kv]`` (over its query heads)
        and per query head ``[H]`` (a slot holding a duplicated key/value head for one query head)."""
        if density is None:
            return None, None
        q = shape.q_per_kv
        if union_density is not None:
            u = [float(x) for x in union_density]
            if len(u) != shape.num_kv_heads or not all(0.0 <= x <= 1.0 for x in u):
                raise ValueError(
                    f"union_density needs {shape.num_kv_heads} values in [0, 1] (one per key/value head), got {u}."
                )
            return u, [u[h // q] for h in range(shape.num_heads)]
        per_head = [min(1.0, self.union_factor * d) for d in density]
        return [max(per_head[k * q:(k + 1) * q]) for k in range(shape.num_kv_heads)], per_head

    def _a2a_ms(self, shape: AttentionShape, plan: LayerPlan, kv: List[int], gpus_per_node: int) -> Tuple[float, str]:
        """Four head all-to-alls (q,k,v in; out back; dout in; dq,dk,dv back): each lasts as long
        as its slowest rank's ``max(send, receive)`` per link class."""
        g_h = plan.head_size
        if g_h == 1:
            return 0.0, "none"
        shard = shape.seq_len // plan.cp_size * shape.batch * shape.head_dim * shape.bytes_per_elem
        h = [len(s) for s in plan.slots]
        qkv = [h[j] + 2 * kv[j] for j in range(g_h)]
        worst_in, worst_out, inter_any = 0.0, 0.0, False
        seen = set()
        for i in range(plan.seq_size):
            nodes = tuple((i * g_h + j) // gpus_per_node for j in range(g_h))
            pattern = tuple(x - nodes[0] for x in nodes)
            if pattern in seen:
                continue
            seen.add(pattern)
            inter_any |= len(set(nodes)) > 1
            for j in range(g_h):
                # per link class: [intra, inter] bytes sent / received
                sq_, rq, so, ro = [0.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 0.0]
                for p in range(g_h):
                    if p == j:
                        continue
                    c = 0 if nodes[p] == nodes[j] else 1
                    sq_[c] += shard * qkv[p]
                    rq[c] += shard * qkv[j]
                    so[c] += shard * h[j]
                    ro[c] += shard * h[p]
                t_in = max(_xfer_ms(max(sq_[0], rq[0]), self.intra_node_gbps),
                           _xfer_ms(max(sq_[1], rq[1]), self.inter_node_gbps))
                t_out = max(_xfer_ms(max(so[0], ro[0]), self.intra_node_gbps),
                            _xfer_ms(max(so[1], ro[1]), self.inter_node_gbps))
                worst_in, worst_out = max(worst_in, t_in), max(worst_out, t_out)
        return 2 * (worst_in + worst_out) + 4 * self.latency_ms, ("inter" if inter_any else "intra")


def _check_density(shape: AttentionShape, density: Density) -> Optional[Tuple[float, ...]]:
    if density is None:
        return None
    d = tuple(float(x) for x in density)
    if len(d) != shape.num_heads or not all(0.0 <= x <= 1.0 for x in d):
        raise ValueError(
            f"density needs {shape.num_heads} values in [0, 1] (1 - sparsity per query head), got {list(d)}."
        )
    return d


# ---------------------------------------------------------------------------------------------
# planning


def _unit(shape: AttentionShape, head_size: int) -> int:
    return head_unit(shape.num_heads, shape.num_kv_heads, head_size)


def feasible_head_sizes(shape: AttentionShape, cp_size: int, head_sizes: Optional[Sequence[int]] = None) -> List[int]:
    """Head-parallel sizes ``g_h`` dividing ``cp_size`` with at least ``g_h`` head units, ascending
    (optionally only those in ``head_sizes``, e.g. the process groups that were built)."""
    out = []
    for g in range(1, cp_size + 1):
        if cp_size % g or (head_sizes is not None and g not in head_sizes):
            continue
        if g <= shape.num_heads // _unit(shape, g):
            out.append(g)
    return out


def check_tokens(seq_len: int, cp_size: int, granule: int) -> None:
    """Raise unless every rank's ``seq_len / cp_size`` tokens are whole query groups of ``granule``."""
    if cp_size < 1 or granule < 1:
        raise ValueError(f"cp_size ({cp_size}) and granule ({granule}) must be >= 1.")
    unit = cp_size * granule
    if seq_len % unit:
        up = -(-seq_len // unit) * unit
        raise ValueError(
            f"{seq_len} tokens do not split into whole query groups of {granule} tokens on {cp_size} CP ranks: "
            f"the sequence must be a multiple of cp_size * granule = {unit}; pad it to {up} tokens, or choose "
            f"a CP size dividing {seq_len // granule} query groups"
            + ("." if seq_len % granule == 0 else f" (and a length that is a multiple of {granule}).")
        )


def _lpt_plan(shape: AttentionShape, density: Density, head_size: int, cp_size: int) -> LayerPlan:
    unit = _unit(shape, head_size)
    if density is None:
        slots = even_slots(shape.num_heads, head_size, unit)
    else:
        slots = balance_heads(list(density), head_size, unit)
    return LayerPlan(head_size, cp_size // head_size, slots)


@dataclass(frozen=True)
class PlanComparison:
    """The planner's choice for one layer next to the fixed strategies, all in one cost model.

    ``pure_head``: the largest feasible head split (the rest of the CP group sequence-parallel when
    heads are fewer than ranks); ``pure_seq``: head_size 1; ``even_count``: the chosen split with an
    even head-count assignment instead of LPT. ``candidates``: every feasible split, ascending
    head_size. Plans rejected by the memory budget are absent (``pure_*`` may be None).
    """

    best: PlanCost
    pure_head: Optional[PlanCost]
    pure_seq: Optional[PlanCost]
    even_count: PlanCost
    candidates: Tuple[PlanCost, ...]

    def to_dict(self) -> Dict:
        return {
            "best": self.best.to_dict(),
            "pure_head": self.pure_head.to_dict() if self.pure_head else None,
            "pure_seq": self.pure_seq.to_dict() if self.pure_seq else None,
            "even_count": self.even_count.to_dict(),
            "candidates": [{"head_size": c.plan.head_size, "seq_size": c.plan.seq_size, "predicted_ms": c.total_ms}
                           for c in self.candidates],
        }


def compare_plans(
    cost: CostModel,
    shape: AttentionShape,
    density: Density,
    *,
    cp_size: int,
    gpus_per_node: int,
    granule: int = 64,
    head_sizes: Optional[Sequence[int]] = None,
    memory_budget_gib: Optional[float] = None,
    union_density: Optional[Sequence[float]] = None,
) -> PlanComparison:
    """Cost every feasible ``head_size x seq_size`` split of ``cp_size`` for one layer.

    Args:
        cost: the cost model.
        shape: the layer (heads of one TP rank).
        density: per query head ``1 - sparsity`` ``[H]``, or None for a dense layer.
        cp_size: CP ranks ``N``.
        gpus_per_node: GPUs per node.
        granule: tokens per query group; each rank's ``S/N`` tokens must be whole groups.
        head_sizes: allowed head-parallel sizes (None: every divisor of ``cp_size``).
        memory_budget_gib: reject plans whose :attr:`SlotTime.kv_bytes` exceeds this.
        union_density: measured union density per key/value head ``[H_kv]`` (sparse layers).

    Returns:
        :class:`PlanComparison`; the best plan is the fastest, ties going to the larger head_size
        (less traffic across nodes; one candidate per head size, so the order is total).
    """
    check_tokens(shape.seq_len, cp_size, granule)
    density = _check_density(shape, density)
    sizes = feasible_head_sizes(shape, cp_size, head_sizes)
    if not sizes:
        raise ValueError(
            f"no head-parallel size in {sorted(head_sizes)} divides cp_size={cp_size} with enough heads "
            f"({shape.num_heads} query heads, {shape.num_kv_heads} key/value heads); feasible sizes: "
            f"{feasible_head_sizes(shape, cp_size)}. Allow one of them or change the CP size."
        )
    kw = dict(gpus_per_node=gpus_per_node, union_density=union_density)
    all_costs = [cost.plan_cost(shape, _lpt_plan(shape, density, g, cp_size), density, **kw) for g in sizes]
    budget = None if memory_budget_gib is None else memory_budget_gib * 2**30
    costs = [c for c in all_costs if budget is None or max(s.kv_bytes for s in c.slots) <= budget]
    if not costs:
        need = min(max(s.kv_bytes for s in c.slots) for c in all_costs) / 2**30
        raise ValueError(
            f"every split exceeds the K/V memory budget of {memory_budget_gib} GiB per rank (the smallest needs "
            f"{need:.3f} GiB): raise the budget or the CP size."
        )
    best = min(costs, key=lambda c: (round(c.total_ms, 9), -c.plan.head_size))
    largest = max(sizes)
    pure_head = next((c for c in costs if c.plan.head_size == largest), None)
    pure_seq = next((c for c in costs if c.plan.head_size == 1), None)
    g = best.plan.head_size
    even = cost.plan_cost(shape, LayerPlan(g, cp_size // g, even_slots(shape.num_heads, g, _unit(shape, g))),
                          density, **kw)
    return PlanComparison(best, pure_head, pure_seq, even, tuple(costs))


def plan_layer(cost: CostModel, shape: AttentionShape, density: Density, **kwargs) -> LayerPlan:
    """The fastest feasible plan for one layer, ``predicted_ms`` filled (keyword arguments as
    :func:`compare_plans`). A pure function of its arguments: ranks that pass the same
    (synchronised) statistics get the same plan."""
    return compare_plans(cost, shape, density, **kwargs).best.plan


# ---------------------------------------------------------------------------------------------
# runtime re-planning and agreement


class ReplanPolicy:
    """Holds each layer's plan and re-plans it when its sparsity profile moves, at a bounded cadence.

    A sparse layer is re-planned when the largest per-head change in density since its last plan
    exceeds ``threshold`` **and** at least ``min_interval`` iterations passed since its last re-plan.
    A layer switching between dense and sparse (a stage change or a recall fallback, a handful of
    times per run) is re-planned at once. Dense layers keep their plan (it does not depend on
    sparsity). Inputs must be synchronised over ranks (the controller averages its statistics over
    the data+context-parallel group), so every rank makes the same decisions; verify with
    :func:`check_plans_agree`.

    Args:
        cost: the cost model.
        shapes: one :class:`AttentionShape` per layer.
        cp_size, gpus_per_node, granule, head_sizes, memory_budget_gib: as :func:`compare_plans`.
        threshold: density change (absolute, per head) that triggers a re-plan.
        min_interval: iterations between two re-plans of a layer.
    """

    def __init__(
        self,
        cost: CostModel,
        shapes: Sequence[AttentionShape],
        *,
        cp_size: int,
        gpus_per_node: int,
        granule: int = 64,
        threshold: float = 0.02,
        min_interval: int = 100,
        head_sizes: Optional[Sequence[int]] = None,
        memory_budget_gib: Optional[float] = None,
    ):
        if threshold < 0 or min_interval < 0:
            raise ValueError(f"threshold ({threshold}) and min_interval ({min_interval}) must be >= 0.")
        self.cost, self.shapes = cost, list(shapes)
        self.kw = dict(cp_size=cp_size, gpus_per_node=gpus_per_node, granule=granule, head_sizes=head_sizes,
                       memory_budget_gib=memory_budget_gib)
        self.threshold, self.min_interval = float(threshold), int(min_interval)
        n = len(self.shapes)
        self.plans: List[Optional[LayerPlan]] = [None] * n
        self.planned_density: List[Optional[Tuple[float, ...]]] = [None] * n
        self.last_replan: List[Optional[int]] = [None] * n
        self.replans = 0

    def maybe_replan(
        self,
        iteration: int,
        sparsity: Sequence[Optional[Sequence[float]]],
        sparse: Optional[Sequence[bool]] = None,
        union_density: Optional[Sequence[Optional[Sequence[float]]]] = None,
    ) -> List[int]:
        """Re-plan the layers whose profile moved enough, if their interval allows.

        Args:
            iteration: training iteration (the same on all ranks).
            sparsity: per layer, per query head sparsity ``[H]``, or None (dense / not profiled).
            sparse: per layer, whether it runs sparse (False forces dense); None: every layer with
                a sparsity profile is sparse.
            union_density: per layer measured union densities ``[H_kv]`` or None.

        Returns:
            Indices of layers whose plan (``LayerPlan.key()``) changed, ascending.
        """
        n = len(self.shapes)
        if len(sparsity) != n or (sparse is not None and len(sparse) != n):
            raise ValueError(f"maybe_replan needs one sparsity entry and sparse flag per layer ({n}).")
        changed = []
        for i in range(n):
            dens = None
            if sparsity[i] is not None and (sparse is None or sparse[i]):
                dens = tuple(1.0 - float(x) for x in sparsity[i])
            old = self.plans[i]
            if old is not None:
                was = self.planned_density[i]
                if (was is None) == (dens is None):
                    if dens is None:
                        continue
                    if len(was) != len(dens):
                        raise ValueError(f"layer {i}: {len(dens)} heads now, {len(was)} when planned.")
                    moved = max(abs(a - b) for a, b in zip(dens, was))
                    if moved <= self.threshold or iteration - self.last_replan[i] < self.min_interval:
                        continue
            ud = union_density[i] if union_density is not None else None
            plan = plan_layer(self.cost, self.shapes[i], dens, union_density=ud, **self.kw)
            self.plans[i], self.planned_density[i], self.last_replan[i] = plan, dens, iteration
            self.replans += 1
            if old is None or old.key() != plan.key():
                changed.append(i)
        return changed

    def state_dict(self) -> Dict:
        """Plain-data state for checkpoints (plans are recomputed from it deterministically)."""
        return {
            "plans": [None if p is None else [p.head_size, p.seq_size, [list(s) for s in p.slots], p.predicted_ms]
                      for p in self.plans],
            "planned_density": [None if d is None else list(d) for d in self.planned_density],
            "last_replan": list(self.last_replan),
            "replans": self.replans,
        }

    def load_state_dict(self, state: Dict) -> None:
        if len(state["plans"]) != len(self.shapes):
            raise ValueError(f"state has {len(state['plans'])} layers, the policy {len(self.shapes)}.")
        self.plans = [None if p is None else LayerPlan(p[0], p[1], tuple(tuple(s) for s in p[2]), p[3])
                      for p in state["plans"]]
        self.planned_density = [None if d is None else tuple(d) for d in state["planned_density"]]
        self.last_replan = list(state["last_replan"])
        self.replans = int(state["replans"])


def plans_digest(plans: Sequence[Optional[LayerPlan]]) -> str:
    """SHA-256 of the plans' float-free keys: stable across processes (unlike salted ``hash()``)."""
    keys = tuple(None if p is None else p.key() for p in plans)
    return hashlib.sha256(repr(keys).encode()).hexdigest()


def check_plans_agree(plans: Sequence[Optional[LayerPlan]], group=None) -> str:
    """All-gather the plans' digest over ``group`` and raise on every rank if ranks disagree.

    Returns:
        The common digest (hex).
    """
    import torch.distributed as dist

    digest = plans_digest(plans)
    if not dist.is_available() or not dist.is_initialized():
        return digest
    gathered: List[Optional[str]] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, digest, group=group)
    if len(set(gathered)) > 1:
        by = collections.defaultdict(list)
        for r, d in enumerate(gathered):
            by[d].append(r)
        parts = "; ".join(f"ranks {v} -> {k[:12]}" for k, v in by.items())
        raise RuntimeError(
            f"context-parallel plans differ across ranks ({parts}): the planner's inputs (sparsity, "
            f"iteration, shapes, cost model) must be identical on every rank; synchronise the "
            f"profiler's statistics over the CP group before planning."
        )
    return digest


# ---------------------------------------------------------------------------------------------
# simulation (CLI)


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
    """Short commit of the checkout the simulator runs from (None outside a git checkout)."""
    import subprocess

    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True,
                             timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _fmt_slots(plan_dict: Dict) -> str:
    hp = plan_dict["heads_per_slot"]
    return f"{min(hp)}-{max(hp)}" if min(hp) != max(hp) else f"{hp[0]}"


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Simulate the planner on a cluster; print the per-layer plan and totals; optional JSON."""
    p = argparse.ArgumentParser(prog="python -m megatron_dsv.cp.planner", description=__doc__,
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
    p.add_argument("--benchmark", default=str(DEFAULT_BENCHMARK),
                   help="kernel benchmark JSON the compute fits come from")
    p.add_argument("--intra-gbps", type=float, default=150.0, help="NVLink all-to-all / p2p GB/s per GPU (assumed)")
    p.add_argument("--inter-gbps", type=float, default=40.0, help="InfiniBand GB/s per GPU (assumed; 400 Gb/s NDR)")
    p.add_argument("--latency-ms", type=float, default=0.01, help="per collective / ring step")
    p.add_argument("--union-factor", type=float, default=2.0, help="remote key union vs density (assumed)")
    p.add_argument("--memory-budget-gib", type=float, default=None, help="reject plans holding more K/V per rank")
    p.add_argument("--out", default=None, help="write the full result as JSON")
    args = p.parse_args(argv)

    if args.hidden is not None and args.hidden != args.heads * args.head_dim:
        p.error(f"--hidden {args.hidden} != --heads {args.heads} x --head-dim {args.head_dim}.")
    unit = args.gpus * args.granule
    seq_len = -(-args.seq_len // unit) * unit
    cost = CostModel.from_benchmark(args.benchmark, intra_node_gbps=args.intra_gbps, inter_node_gbps=args.inter_gbps,
                                    latency_ms=args.latency_ms, union_factor=args.union_factor)
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
        f"compute fitted on {cost.source} ({dict(cost.env).get('gpu', '?')}); bandwidths, latency and the "
        "union factor are assumptions, see cost_model.",
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


__all__ = [
    "AttentionShape", "KernelFit", "CostModel", "SlotTime", "PlanCost", "PlanComparison", "fit_kernel_rows",
    "feasible_head_sizes", "check_tokens", "compare_plans", "plan_layer", "ReplanPolicy",
    "plans_digest", "check_plans_agree", "synthetic_profile", "load_profile", "simulate", "main",
]


if __name__ == "__main__":
    main(sys.argv[1:])
