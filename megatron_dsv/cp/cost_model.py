"""Attention time of one layer under a context-parallel plan: kernel fits + a link model.

A CP group of ``N`` ranks is split ``head_size x seq_size`` (``g_h x g_s``, layout in
:mod:`megatron_dsv.cp.plan`); :meth:`CostModel.plan_cost` predicts one layer's attention time
(forward + backward) under a plan, slot by slot. The planner (:mod:`megatron_dsv.cp.planner`)
picks the fastest plan with it. All times in ms; bytes per element ``e``, batch ``B``, tokens
``S``, head dim ``D``, ``H`` query heads, ``H_kv`` key/value heads; slot ``j`` holds ``h_j`` query
heads and receives ``kv_j`` key/value heads.

* **Compute** (:class:`KernelFit`) comes from the kernel benchmark (``benchmarks/attention.py``
  JSON: H100, H = 16, S = 65536, fwd+bwd), divided by heads and batch, fitted per measured head dim
  by least squares: ``dense(Sq, Skv) = c * Sq*Skv`` (cuDNN), ``sparse(Sq, Skv, d) = a * Sq + b *
  Sq*Skv*d`` (``a``: the density-independent per-query work, q/o/do/lse traffic) and
  ``select(Sq, Skv) = s * Sq*Skv`` (predictor scores + top-k, independent of the density). Head
  dims between two measured ones interpolate each coefficient linearly in D; outside the measured
  range the nearest one is scaled by ``D / D_near`` (FLOPs and bytes grow with D; same efficiency
  assumed), selection unchanged (it works at predictor rank r). The sparse kernel measured is the
  one with 64-key blocks and 64-query groups. The fits ship with the package
  (:data:`DEFAULT_FITS`, made by :func:`fit_document`), so an installed package plans without the
  repository's benchmark files.
* **Links** (:class:`Links`): four link kinds, inside a node (``intra``) or across nodes
  (``inter``), for all-to-all collectives (``a2a``) and point-to-point ring steps (``p2p``); each
  a :class:`Link` with a bandwidth (GB/s per GPU per direction, algorithmic) and a latency (ms per
  collective or step). A transfer of ``n`` bytes over a link costs ``latency + n / bandwidth``.
  They are measured on the real process groups (:mod:`megatron_dsv.cp.calibration`, a
  :class:`Calibration`), or assumed (:meth:`Links.assumed`: NVLink 150 GB/s, InfiniBand NDR 400
  Gb/s per GPU at about 40 GB/s achieved, 0.01 ms); :attr:`Links.measured` says which are which.
* **Head all-to-all** (``g_h > 1``): forward sends q, k, v of the rank's ``S/N`` tokens to the slots
  owning those heads and receives the output back; backward moves the same volume (dout in; dq, dk,
  dv out). Per collective a rank's time is, per link class it has peers in (concurrently), the
  ``a2a`` link's cost of ``max(send, receive)`` bytes, and the slower class; the collective lasts
  as long as its slowest rank. Not overlapped with compute.
* **Sequence part** (``g_s > 1``), a rank holds ``Sq = S / g_s`` queries of its heads and all S keys:
  dense layers run a ring passing K, V chunks (``Sq`` tokens) ``g_s - 1`` times forward and K, V,
  dK, dV backward over the ``p2p`` link of the slowest hop, each step overlapping its transfer
  (``time = max(compute, transfer)`` per step). Sparse layers all-gather the rank-r predictor keys,
  then fetch, per key/value head, the union of remote key blocks its queries selected: ``u * (S -
  Sq) * D * 2 * e * B`` bytes forward and the same for dK, dV backward, over the ``a2a`` links, not
  overlapped (selection must finish before the fetch, conservative). ``u = min(1, union_factor *
  density)`` of the query head (the largest over a GQA group a slot holds whole): **an
  assumption** (default 2.0) that a measured union replaces (``union_density``, synchronised over
  the ranks with :func:`megatron_dsv.cp.planner.synced_union_density`).
* A layer's time is the all-to-all plus the slowest slot's compute + exposed sequence
  communication (collectives synchronise, so the slot with most work sets the pace).
* CP ranks are consecutive on nodes (TP = 1, CP innermost): CP rank r lives on node
  ``r // gpus_per_node``.
* Memory (optional budget): the K, V, dK, dV a rank holds at the backward's peak, see
  :attr:`SlotTime.kv_bytes`.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib.resources
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_dsv.cp.head_parallel import kv_send_heads
from megatron_dsv.cp.plan import LayerPlan
from megatron_dsv.ops.mask import CausalMask

DEFAULT_FITS = importlib.resources.files("megatron_dsv.cp") / "data" / "kernel_fits_h100.json"
"""The shipped kernel fits (package data; :func:`fit_document` of the H100 benchmarks)."""

FITS_FORMAT = "megatron_dsv.cp.kernel_fits/1"
CALIBRATION_FORMAT = "megatron_dsv.cp.calibration/1"
LINK_KINDS = ("intra_a2a", "intra_p2p", "inter_a2a", "inter_p2p")

Density = Optional[Sequence[float]]
"""Per query head ``1 - sparsity`` (fraction of (query, key) pairs computed), ``[H]``; None: dense."""


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
        mask: the layer's causal mask over the sequence (None: bidirectional). Contiguous shards
            of a masked sequence carry unequal work: :meth:`pair_fractions`.
    """

    seq_len: int
    num_heads: int
    head_dim: int
    num_kv_heads: Optional[int] = None
    batch: int = 1
    bytes_per_elem: int = 2
    predictor_rank: int = 16
    mask: Optional[CausalMask] = None

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

    def pair_fractions(self, seq_size: int) -> Tuple[float, ...]:
        """Per contiguous sequence shard ``i`` of ``seq_size``, the fraction of its queries' pairs
        with every key (``S/seq_size x S``) that the mask allows: all 1 without a mask. Token-causal
        over N shards: shard ``r`` holds about ``(2r + 1) / N^2`` of the allowed pairs, the last
        ``(2N - 1) / N^2``; one shard (a head split) holds them all, about half the pairs."""
        if self.seq_len % seq_size:
            raise ValueError(f"{seq_size} sequence shards do not divide {self.seq_len} tokens.")
        if self.mask is None:
            return (1.0,) * seq_size
        sq, s = self.seq_len // seq_size, self.seq_len
        return tuple(self.mask.allowed_pairs(i * sq, (i + 1) * sq, 0, s) / (sq * s) for i in range(seq_size))


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


def ring_factor_from_rows(rows: Sequence[Dict]) -> float:
    """Mean time of the dense ring step relative to cuDNN SDPA from ``benchmarks/cp_chunk.py`` rows:
    the step the runtime uses, PyTorch's cuDNN op where it was correct on every row, else Triton."""
    variant = "cudnn_op" if all(r.get("cudnn_op", {}).get("correct") for r in rows) else "triton"
    ratios = [r[variant]["vs_cudnn_sdpa_fwd_bwd"] for r in rows if r.get(variant, {}).get("correct")]
    if not ratios:
        raise ValueError("no correct ring-step row (cudnn_op or triton with vs_cudnn_sdpa_fwd_bwd) to fit.")
    return sum(ratios) / len(ratios)


def fit_document(benchmark_path, ring_path, *, name_relative_to=None, fitted_at_commit: Optional[str] = None) -> Dict:
    """The shipped-fits JSON (:data:`DEFAULT_FITS`) from a kernel and a ring-step benchmark.

    Args:
        benchmark_path: ``benchmarks/attention.py`` JSON (``env``, ``args``, ``rows``).
        ring_path: ``benchmarks/cp_chunk.py`` JSON.
        name_relative_to: directory the recorded file names are relative to (the repository).
        fitted_at_commit: the commit of the code that fitted them (recorded).
    """

    def name(p):
        p = Path(p)
        return str(p.resolve().relative_to(Path(name_relative_to).resolve())) if name_relative_to else str(p)

    bench = json.loads(Path(benchmark_path).read_text())
    ring = json.loads(Path(ring_path).read_text())
    args = bench.get("args", {})
    fits = fit_kernel_rows(bench["rows"], heads=int(args.get("heads", 16)), batch=int(args.get("batch", 1)))
    benv, renv = bench.get("env", {}), ring.get("env", {})
    return {
        "format": FITS_FORMAT,
        "source": name(benchmark_path),
        "env": benv,
        "fits": [dataclasses.asdict(f) for f in fits],
        "ring_compute_factor": ring_factor_from_rows(ring["rows"]),
        "provenance": {
            "kernels": {"file": name(benchmark_path), "gpu": benv.get("gpu"),
                        "commit": benv.get("git_commit", benv.get("commit")), "date_utc": benv.get("date_utc")},
            "ring_step": {"file": name(ring_path), "gpu": renv.get("gpu"),
                          "commit": renv.get("git_commit", renv.get("commit"))},
            "fitted_by": "megatron_dsv.cp.cost_model.fit_document",
            "fitted_at_commit": fitted_at_commit,
        },
    }


@dataclass(frozen=True)
class Link:
    """One link kind: ``ms(n) = latency_ms + n / (gbps * 1e6)`` for ``n`` bytes per rank.

    Attributes:
        gbps: bandwidth, GB/s (1e9 bytes) per GPU per direction.
        latency_ms: fixed cost of one collective or ring step.
        measured: True when a calibration measured it, False when assumed.
    """

    gbps: float
    latency_ms: float
    measured: bool = False

    def __post_init__(self):
        if not (math.isfinite(self.gbps) and self.gbps > 0):
            raise ValueError(f"Link.gbps must be a finite number > 0, got {self.gbps}.")
        if not (math.isfinite(self.latency_ms) and self.latency_ms >= 0):
            raise ValueError(f"Link.latency_ms must be a finite number >= 0, got {self.latency_ms}.")

    def ms(self, nbytes: float) -> float:
        return self.latency_ms + nbytes / (self.gbps * 1e6)


def fit_link(samples: Sequence[Tuple[float, float]]) -> Link:
    """Least-squares :class:`Link` (``measured=True``) from ``(bytes per rank, ms)`` samples:
    ``ms = latency + bytes / bandwidth`` in relative error, latency >= 0 (refit through 0 when it
    comes out < 0)."""
    pts = [(float(b), float(t)) for b, t in samples]
    if len({b for b, _ in pts}) < 2 or any(not (b > 0 and math.isfinite(t) and t > 0) for b, t in pts):
        raise ValueError(
            f"fit_link needs samples at >= 2 distinct byte counts, bytes > 0 and finite times > 0; got {pts}."
        )
    # relative errors (each row divided by its time): the sizes span orders of magnitude, and in
    # absolute terms the largest message would decide the latency alone
    lat, ms_per_mb = _lstsq2([(1.0 / t, b * 1e-6 / t) for b, t in pts], [1.0] * len(pts))
    return Link(gbps=1.0 / ms_per_mb, latency_ms=lat, measured=True)


@dataclass(frozen=True)
class Links:
    """The four link kinds of the cost model (module docstring), each measured or assumed.

    ``*_a2a``: all-to-all collectives (head exchange, predictor-key all-gather, key fetch);
    ``*_p2p``: point-to-point ring steps (dense sequence parallelism). ``intra``: peers in the same
    node; ``inter``: peers in other nodes. ``source`` names where the measured ones came from.
    """

    intra_a2a: Link
    intra_p2p: Link
    inter_a2a: Link
    inter_p2p: Link
    source: str = "assumed"

    @classmethod
    def assumed(cls, intra_node_gbps: float = 150.0, inter_node_gbps: float = 40.0,
                latency_ms: float = 0.01) -> "Links":
        """Assumed links, one bandwidth per node class and one latency for all: NVLink all-to-all
        ~150 GB/s achieved, InfiniBand NDR 400 Gb/s per GPU ~40 GB/s achieved (not measured)."""
        intra, inter = Link(intra_node_gbps, latency_ms), Link(inter_node_gbps, latency_ms)
        return cls(intra, intra, inter, inter, source="assumed")

    def get(self, inter: bool, pattern: str) -> Link:
        """The link for peers in another node (``inter``) or the same one, ``pattern`` a2a or p2p."""
        if pattern not in ("a2a", "p2p"):
            raise ValueError(f"link pattern must be 'a2a' or 'p2p', got {pattern!r}.")
        return getattr(self, f"{'inter' if inter else 'intra'}_{pattern}")

    @property
    def measured(self) -> Tuple[str, ...]:
        """Link kinds that were measured (the others are assumptions)."""
        return tuple(k for k in LINK_KINDS if getattr(self, k).measured)

    def to_dict(self) -> Dict:
        return {"source": self.source, "measured": list(self.measured),
                **{k: dataclasses.asdict(getattr(self, k)) for k in LINK_KINDS}}


@dataclass(frozen=True)
class Calibration:
    """Links measured on real process groups (:func:`megatron_dsv.cp.calibration.measure_links`).

    Identical on every rank of the group that measured it (times are the slowest rank's), so cost
    models built from it plan alike. Link kinds the group could not measure (e.g. ``inter_*`` on
    one node) are absent and stay assumed when applied (:meth:`apply`).

    Attributes:
        links: measured link kinds (keys of :data:`LINK_KINDS`).
        samples: per measured kind, ``[bytes per rank, ms]`` pairs the fit used.
        env: where it was measured (ranks, nodes, backend, device, torch, date).
    """

    links: Dict[str, Link]
    samples: Dict[str, List[List[float]]] = field(default_factory=dict)
    env: Dict[str, object] = field(default_factory=dict)

    def __post_init__(self):
        bad = sorted(set(self.links) - set(LINK_KINDS))
        if bad:
            raise ValueError(f"calibration link kinds {bad} are unknown; expected some of {list(LINK_KINDS)}.")
        if not self.links:
            raise ValueError("a calibration needs at least one measured link kind.")

    def apply(self, links: Links) -> Links:
        """``links`` with the measured kinds replaced by this calibration's."""
        desc = ", ".join(f"{k}={v}" for k, v in self.env.items() if k in ("world_size", "nodes", "backend", "device"))
        return dataclasses.replace(
            links, **{k: dataclasses.replace(v, measured=True) for k, v in self.links.items()},
            source=f"calibration ({desc})" if desc else "calibration",
        )

    def to_dict(self) -> Dict:
        return {
            "format": CALIBRATION_FORMAT,
            "links": {k: {"gbps": v.gbps, "latency_ms": v.latency_ms} for k, v in self.links.items()},
            "samples": {k: [list(map(float, s)) for s in v] for k, v in self.samples.items()},
            "env": dict(self.env),
        }

    @classmethod
    def from_dict(cls, data: Dict) -> "Calibration":
        if data.get("format") != CALIBRATION_FORMAT:
            raise ValueError(
                f"not a calibration (format {data.get('format')!r}, expected {CALIBRATION_FORMAT!r}); write one with "
                "`torchrun --nproc-per-node N -m megatron_dsv.tools.calibrate_cp --out cal.json`."
            )
        return cls(
            links={k: Link(float(v["gbps"]), float(v["latency_ms"]), measured=True) for k, v in data["links"].items()},
            samples={k: [list(map(float, s)) for s in v] for k, v in data.get("samples", {}).items()},
            env=dict(data.get("env", {})),
        )

    def save(self, path) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")

    @classmethod
    def load(cls, path) -> "Calibration":
        return cls.from_dict(json.loads(Path(path).read_text()))


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


def _read_json(path) -> Dict:
    """JSON from a file path or a package resource (``importlib.resources`` Traversable)."""
    return json.loads((Path(path) if isinstance(path, str) else path).read_text())


@dataclass(frozen=True)
class CostModel:
    """Attention time of a layer under a CP plan: kernel fits + links (module docstring).

    Build it with :meth:`from_benchmark` (the shipped fits by default) and a :class:`Calibration`.

    Attributes:
        fits: kernel fits, one per measured head dim, ascending.
        links: bandwidth and latency per link kind, measured or assumed (:class:`Links`).
        union_factor: key-block union over a rank's query groups relative to one group's density,
            ``u = min(1, union_factor * density)`` (assumption; measured unions replace it).
        ring_compute_factor: time of a dense ring step relative to cuDNN dense attention on the
            same chunk pair. The ring needs each step's log-sum-exp, which the public SDPA does not
            return; on GPU its steps run PyTorch's cuDNN op that does (0.97x SDPA, measured on an
            H100, ``benchmarks/results/cp_chunk_h100_20261124_privops.json``, shipped in the fits;
            our Triton all-blocks fallback is 1.43-1.53x).
        source: the benchmark file the fits came from; ``env``: its hardware line;
            ``provenance``: the fits' sources, GPU and commits in one line.
    """

    fits: Tuple[KernelFit, ...]
    links: Links = Links.assumed()
    union_factor: float = 2.0
    ring_compute_factor: float = 1.0
    source: str = ""
    env: Tuple[Tuple[str, object], ...] = ()
    provenance: str = ""

    def __post_init__(self):
        if not self.fits:
            raise ValueError("CostModel needs at least one KernelFit.")
        object.__setattr__(self, "fits", tuple(sorted(self.fits, key=lambda f: f.head_dim)))
        if not isinstance(self.links, Links):
            raise TypeError(f"CostModel.links must be a Links, got {type(self.links).__name__}.")
        if self.ring_compute_factor <= 0:
            raise ValueError(f"CostModel.ring_compute_factor must be > 0, got {self.ring_compute_factor}.")
        if self.union_factor < 1:
            raise ValueError(
                f"CostModel.union_factor must be >= 1 (a union covers each group), got {self.union_factor}."
            )

    @classmethod
    def from_benchmark(
        cls,
        path=None,
        ring_path=None,
        *,
        links: Optional[Links] = None,
        calibration=None,
        intra_node_gbps: Optional[float] = None,
        inter_node_gbps: Optional[float] = None,
        latency_ms: Optional[float] = None,
        **kwargs,
    ) -> "CostModel":
        """A cost model from kernel timings and links.

        Args:
            path: None for the shipped fits (:data:`DEFAULT_FITS`); a fits JSON in that format; or a
                ``benchmarks/attention.py`` JSON (``env``, ``args``, ``rows``), fitted here.
            ring_path: a ``benchmarks/cp_chunk.py`` JSON for the ring step factor; None: the factor
                of the fits file (of the shipped fits when ``path`` is a raw benchmark).
            links: the links (default :meth:`Links.assumed`).
            calibration: a :class:`Calibration` or its JSON file; its measured link kinds replace
                those of ``links``.
            intra_node_gbps, inter_node_gbps, latency_ms: assumed links instead of ``links``
                (:meth:`Links.assumed`), for callers without a calibration.
            kwargs: ``union_factor``, ``ring_compute_factor``.
        """
        legacy = {k: v for k, v in (("intra_node_gbps", intra_node_gbps), ("inter_node_gbps", inter_node_gbps),
                                    ("latency_ms", latency_ms)) if v is not None}
        if legacy and links is not None:
            raise ValueError(f"pass either links= or the assumed {sorted(legacy)}, not both.")
        links = Links.assumed(**legacy) if links is None else links
        if calibration is not None:
            cal = calibration if isinstance(calibration, Calibration) else Calibration.load(calibration)
            links = cal.apply(links)
        data = _read_json(DEFAULT_FITS if path is None else path)
        if data.get("format") == FITS_FORMAT:
            fits = tuple(KernelFit(**f) for f in data["fits"])
            ring = data["ring_compute_factor"]
            source, env = data["source"], data.get("env", {})
            prov = data.get("provenance", {})
            k, r = prov.get("kernels", {}), prov.get("ring_step", {})
            provenance = (f"kernels {k.get('file')} ({k.get('gpu')}, commit {k.get('commit')}); ring step "
                          f"{r.get('file')} ({r.get('gpu')}, commit {r.get('commit')}); fitted at commit "
                          f"{prov.get('fitted_at_commit')}")
        elif "rows" in data:
            args = data.get("args", {})
            fits = fit_kernel_rows(data["rows"], heads=int(args.get("heads", 16)), batch=int(args.get("batch", 1)))
            ring = _read_json(DEFAULT_FITS)["ring_compute_factor"]
            source, env, provenance = str(path), data.get("env", {}), f"kernels fitted from {path}"
        else:
            raise ValueError(
                f"{path}: neither a kernel-fits JSON (format {FITS_FORMAT!r}) nor a benchmarks/attention.py JSON "
                "with 'rows'."
            )
        if ring_path is not None:
            ring = ring_factor_from_rows(_read_json(ring_path)["rows"])
            provenance += f"; ring step from {ring_path}"
        kwargs.setdefault("ring_compute_factor", ring)
        env_t = tuple((str(k), v if isinstance(v, (str, int, float, bool, type(None))) else str(v))
                      for k, v in env.items())
        return cls(fits=fits, links=links, source=source, env=env_t, provenance=provenance, **kwargs)

    def with_calibration(self, calibration: Calibration) -> "CostModel":
        """This model with the calibration's measured links."""
        return dataclasses.replace(self, links=calibration.apply(self.links))

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
            return KernelFit(
                head_dim, *(getattr(a, k) + t * (getattr(b, k) - getattr(a, k)) for k in (
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
            "provenance": self.provenance,
            "links": self.links.to_dict(),
            "union_factor": self.union_factor,
            "ring_compute_factor": self.ring_compute_factor,
            "fits": [dataclasses.asdict(f) for f in self.fits],
            "fit_units": "ms per head per sample: dense = dense_ms_per_gpair * Sq*Skv/1e9; sparse = "
                         "sparse_ms_per_mquery * Sq/1e6 + sparse_ms_per_gpair * Sq*Skv*density/1e9; "
                         "select = select_ms_per_gpair * Sq*Skv/1e9 (fwd+bwd); links: ms = latency_ms + "
                         "bytes / (gbps * 1e6)",
        }

    def _concurrent_ms(self, pattern: str, intra_bytes: float, inter_bytes: float,
                       intra_peers: bool, inter_peers: bool) -> float:
        """One collective of a rank with peers in its node and/or other nodes: both link classes
        run concurrently, the slower one sets the time."""
        t = 0.0
        if intra_peers:
            t = max(t, self.links.get(False, pattern).ms(intra_bytes))
        if inter_peers:
            t = max(t, self.links.get(True, pattern).ms(inter_bytes))
        return t

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
                DSV stage 1); under ``shape.mask`` the fraction of the allowed keys a query reads
                (the profiler's masked sparsity).
            gpus_per_node: GPUs per node; CP rank r is on node ``r // gpus_per_node``.
            union_density: measured per key/value head union density of remote key blocks ``[H_kv]``
                (replaces ``union_factor``); sparse layers only.

        Returns:
            :class:`PlanCost` with ``plan.predicted_ms`` = all-to-all + the slowest slot.

        Under ``shape.mask`` a slot's attention work is its heads' work on its most loaded
        sequence shard (:meth:`AttentionShape.pair_fractions`, the last shard of a causal
        sequence): the shards wait for each other at the head all-to-all that follows. The
        ring's exposed transfer stays that of a rank that computes every step (the most loaded
        one does). Every head's work scales by the same mask fraction, so head balancing (LPT
        over ``density``) is unchanged by it.
        """
        density = check_density(shape, density)
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
        # the most loaded sequence shard's share of its pairs that the mask allows (1 without one)
        load = max(shape.pair_fractions(g_s))
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
                work = float(len(heads)) * load
                compute = b * len(heads) * fit.dense_ms(sq, s) * load * (self.ring_compute_factor if g_s > 1 else 1.0)
                if g_s == 1:
                    seq_comm = exposed = 0.0
                    kv_bytes = 4 * s * len(kvs) * tok_bytes
                else:
                    # ring: step compute on one chunk pair; transfer of one K,V chunk (fwd) or
                    # K,V,dK,dV (bwd) over the slowest hop
                    ring_inter = any(nodes[i] != nodes[(i + 1) % g_s] for i in range(g_s))
                    link = self.links.get(ring_inter, "p2p")
                    step = b * len(heads) * fit.dense_ms(sq, sq) * self.ring_compute_factor
                    cf, cb = step * fit.dense_fwd_fraction, step * (1.0 - fit.dense_fwd_fraction)
                    chunk = 2 * sq * len(kvs) * tok_bytes
                    tf, tb = link.ms(chunk), link.ms(2 * chunk)
                    seq_comm = (g_s - 1) * (tf + tb)
                    exposed = (g_s - 1) * (max(0.0, tf - cf) + max(0.0, tb - cb))
                    kv_bytes = int(8 * sq * len(kvs) * tok_bytes)
            else:
                work = float(sum(density[h] for h in heads)) * load
                compute = b * sum(fit.sparse_ms(sq, s, density[h] * load) + fit.select_ms(sq, s) for h in heads)
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
                        t = sum(self._concurrent_ms("a2a", intra * per_peer, inter * per_peer, intra > 0, inter > 0)
                                for per_peer in (lowrank, fetch, fetch))
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
                peers = [False, False]
                for p in range(g_h):
                    if p == j:
                        continue
                    c = 0 if nodes[p] == nodes[j] else 1
                    peers[c] = True
                    sq_[c] += shard * qkv[p]
                    rq[c] += shard * qkv[j]
                    so[c] += shard * h[j]
                    ro[c] += shard * h[p]
                t_in = self._concurrent_ms("a2a", max(sq_[0], rq[0]), max(sq_[1], rq[1]), *peers)
                t_out = self._concurrent_ms("a2a", max(so[0], ro[0]), max(so[1], ro[1]), *peers)
                worst_in, worst_out = max(worst_in, t_in), max(worst_out, t_out)
        return 2 * (worst_in + worst_out), ("inter" if inter_any else "intra")


def check_density(shape: AttentionShape, density: Density) -> Optional[Tuple[float, ...]]:
    """``density`` as a tuple after checking it has one value in [0, 1] per query head (None stays)."""
    if density is None:
        return None
    d = tuple(float(x) for x in density)
    if len(d) != shape.num_heads or not all(0.0 <= x <= 1.0 for x in d):
        raise ValueError(
            f"density needs {shape.num_heads} values in [0, 1] (1 - sparsity per query head), got {list(d)}."
        )
    return d


__all__ = [
    "AttentionShape", "KernelFit", "Link", "Links", "Calibration", "CostModel", "SlotTime", "PlanCost",
    "DEFAULT_FITS", "LINK_KINDS", "fit_kernel_rows", "ring_factor_from_rows", "fit_document", "fit_link",
    "check_density",
]
