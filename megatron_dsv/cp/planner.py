"""Per-layer context-parallel planning: the split, the head assignment, re-planning, agreement.

A CP group of ``N`` ranks is split ``head_size x seq_size`` (``g_h x g_s``, layout in
:mod:`megatron_dsv.cp.plan`). For every layer the planner enumerates the feasible splits, gives
each head slot a set of heads balanced by per-head work (LPT, :func:`balance_heads`), predicts the
layer's attention time (forward + backward) with a :class:`~megatron_dsv.cp.cost_model.CostModel`
and keeps the fastest (:func:`plan_layer`, :func:`compare_plans`). :class:`ReplanPolicy` re-plans a
layer when the profiler's sparsity moved, at a bounded cadence; :func:`check_plans_agree` proves
every rank holds the same plans, and :func:`synced_union_densities` makes measured key unions the
same on every rank before they are planned with. The simulator for clusters we do not have is
``python -m megatron_dsv.tools.simulate_cp``.
"""

from __future__ import annotations

import collections
import hashlib
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from megatron_dsv.cp.cost_model import (
    AttentionShape,
    CostModel,
    Density,
    PlanCost,
    check_density,
)
from megatron_dsv.cp.groups import collective_device
from megatron_dsv.cp.plan import LayerPlan, balance_heads, even_slots, head_unit

def _unit(shape: AttentionShape, head_size: int) -> int:
    return head_unit(shape.num_heads, shape.num_kv_heads, head_size)


def feasible_head_sizes(shape: AttentionShape, cp_size: int, head_sizes: Optional[Sequence[int]] = None) -> List[int]:
    """Head-parallel sizes ``g_h`` dividing ``cp_size`` with at least ``g_h`` head units, ascending
    (optionally only those in ``head_sizes``, e.g. the process groups that were built); under a
    chunk-causal ``shape.mask`` only those whose sequence shards hold whole chunks or lie inside
    one (:meth:`CausalMask.check_shards`, which the layer enforces)."""
    out = []
    for g in range(1, cp_size + 1):
        if cp_size % g or (head_sizes is not None and g not in head_sizes):
            continue
        if g > shape.num_heads // _unit(shape, g):
            continue
        if not shards_fit(shape, cp_size // g):
            continue
        out.append(g)
    return out


def shards_fit(shape: AttentionShape, seq_size: int) -> bool:
    """Whether ``seq_size`` contiguous sequence shards keep ``shape.mask`` runnable: always without
    a mask or a sequence split; else :meth:`CausalMask.check_shards` (the layer refuses the rest)."""
    if shape.mask is None or seq_size == 1:
        return True  # no sequence split: the mask holds on the whole sequence
    if shape.seq_len % seq_size:
        return False
    try:
        shape.mask.check_shards(shape.seq_len, shape.seq_len // seq_size)
    except ValueError:
        return False
    return True


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
    density = check_density(shape, density)
    sizes = feasible_head_sizes(shape, cp_size, head_sizes)
    if not sizes:
        raise ValueError(
            f"no head-parallel size in {sorted(head_sizes or range(1, cp_size + 1))} divides cp_size={cp_size} "
            f"with enough heads ({shape.num_heads} query heads, {shape.num_kv_heads} key/value heads)"
            + (f" and sequence shards that keep the {shape.mask.kind} mask's chunks whole" if shape.mask else "")
            + f"; feasible sizes: {feasible_head_sizes(shape, cp_size)}. Allow one of them or change the CP size."
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
        choose: ``choose(layer_index, comparison) -> LayerPlan`` picks among the planner's ranked
            candidates (:func:`compare_plans`), e.g. by measuring them
            (:class:`megatron_dsv.cp.autotune.Autotuner`; then a collective, called alike on every
            rank because :meth:`due` is); None: the cost model's best.
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
        choose: Optional[Callable[[int, PlanComparison], LayerPlan]] = None,
    ):
        if threshold < 0 or min_interval < 0:
            raise ValueError(f"threshold ({threshold}) and min_interval ({min_interval}) must be >= 0.")
        self.cost, self.shapes = cost, list(shapes)
        self.kw = dict(cp_size=cp_size, gpus_per_node=gpus_per_node, granule=granule, head_sizes=head_sizes,
                       memory_budget_gib=memory_budget_gib)
        self.threshold, self.min_interval = float(threshold), int(min_interval)
        self.choose = choose
        n = len(self.shapes)
        self.plans: List[Optional[LayerPlan]] = [None] * n
        self.planned_density: List[Optional[Tuple[float, ...]]] = [None] * n
        self.last_replan: List[Optional[int]] = [None] * n
        self.replans = 0

    @staticmethod
    def _density(sparsity: Optional[Sequence[float]], sparse: Optional[bool]) -> Optional[Tuple[float, ...]]:
        if sparsity is None or (sparse is not None and not sparse):
            return None
        return tuple(1.0 - float(x) for x in sparsity)

    def due(
        self,
        iteration: int,
        sparsity: Sequence[Optional[Sequence[float]]],
        sparse: Optional[Sequence[bool]] = None,
    ) -> List[int]:
        """Indices of the layers :meth:`maybe_replan` would plan now with these arguments (never
        planned, switched between dense and sparse, or density moved past ``threshold`` after
        ``min_interval``), ascending. Pure: lets a caller gather the measured inputs of a re-plan
        (a collective) only when one happens, identically on every rank."""
        n = len(self.shapes)
        if len(sparsity) != n or (sparse is not None and len(sparse) != n):
            raise ValueError(f"maybe_replan needs one sparsity entry and sparse flag per layer ({n}).")
        out = []
        for i in range(n):
            dens = self._density(sparsity[i], None if sparse is None else sparse[i])
            if self.plans[i] is not None:
                was = self.planned_density[i]
                if (was is None) == (dens is None):
                    if dens is None:
                        continue
                    if len(was) != len(dens):
                        raise ValueError(f"layer {i}: {len(dens)} heads now, {len(was)} when planned.")
                    moved = max(abs(a - b) for a, b in zip(dens, was))
                    if moved <= self.threshold or iteration - self.last_replan[i] < self.min_interval:
                        continue
            out.append(i)
        return out

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
            union_density: per layer the measured union density of remote key blocks ``[H_kv]``
                (synchronised: :func:`synced_union_densities`), or None for the cost model's
                assumption.

        Returns:
            Indices of layers whose plan (``LayerPlan.key()``) changed, ascending.
        """
        n = len(self.shapes)
        if union_density is not None and len(union_density) != n:
            raise ValueError(f"maybe_replan needs one union_density entry (or None) per layer ({n}).")
        changed = []
        for i in self.due(iteration, sparsity, sparse):
            dens = self._density(sparsity[i], None if sparse is None else sparse[i])
            old = self.plans[i]
            ud = union_density[i] if union_density is not None else None
            comparison = compare_plans(self.cost, self.shapes[i], dens, union_density=ud, **self.kw)
            plan = comparison.best.plan if self.choose is None else self.choose(i, comparison)
            if plan.key() not in {c.plan.key() for c in comparison.candidates}:
                raise ValueError(
                    f"layer {i}: the chooser returned {plan.head_size}x{plan.seq_size} {plan.slots}, not one of "
                    "the planner's candidates; return a plan of the comparison it was given."
                )
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


def _check_distributed(what: str) -> None:
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(f"{what} needs an initialised torch.distributed process group.")


def _remote_union(stats) -> List[float]:
    """The per key/value head union of remote blocks of an ``ExchangeStats``, or the values given."""
    values = getattr(stats, "remote_union_density", stats)
    u = [float(x) for x in values]
    if not u or not all(0.0 <= x <= 1.0 for x in u):
        raise ValueError(f"union_density needs one value in [0, 1] per key/value head, got {u}.")
    return u


def synced_union_density(union_density, group) -> List[float]:
    """A measured key-block union made identical on every rank of ``group``, for the planner.

    The union of remote key blocks a rank's selective exchange fetched
    (``ExchangeStats.remote_union_density`` of :mod:`megatron_dsv.cp.seq_parallel`, per key/value
    head, ``[H_kv]``) is rank-local: plans made from it would differ across ranks. This
    all-reduces the per-head **maximum** over ``group`` (the fetch lasts as long as the rank
    fetching most), in float64 so every rank gets the same bits. Collective: every rank of
    ``group`` calls it with the same number of heads, in the same head order (a sequence-only
    split; for several layers or hybrid splits see :func:`synced_union_densities`).

    Args:
        union_density: an ``ExchangeStats`` or a sequence of per key/value head unions in [0, 1].
        group: the process group to agree over (the CP group); None: the default group.

    Returns:
        Per key/value head union density, the same list on every rank; pass it per layer as
        ``ReplanPolicy.maybe_replan(..., union_density=...)`` or ``plan_layer(..., union_density=...)``.
    """
    u = _remote_union(union_density)
    _check_distributed("synced_union_density")
    device = collective_device(group)
    n = torch.tensor([len(u)], dtype=torch.int64, device=device)
    lo, hi = n.clone(), n.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN, group=group)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX, group=group)
    if int(lo) != int(hi):
        raise ValueError(
            f"ranks hold {int(lo)} to {int(hi)} key/value heads' unions: every rank must pass the same layer's "
            "per key/value head union (ExchangeStats.remote_union_density of the same layer and step)."
        )
    t = torch.tensor(u, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return t.cpu().tolist()


def synced_union_densities(exchanges: Sequence, num_kv_heads: Sequence[int], group) -> List[Optional[List[float]]]:
    """Every layer's measured remote key-block union, identical on every rank of ``group``, in one
    collective.

    Each rank's ``ExchangeStats`` covers the key/value heads of its head slot
    (``ExchangeStats.kv_heads``; a hybrid split gives slots different heads, and a GQA group split
    over slots repeats a key/value head). Entries are placed at their layer's key/value head, and
    the per-head **maximum** over ``group`` (the fetch lasts as long as the rank fetching most) is
    all-reduced in float64 beside a mask of the heads some rank covered, so every rank gets the same bits.
    A layer for which some rank has no statistics (``None``: it ran no selective exchange), or
    whose heads no rank covered, gets None: plan it with the cost model's assumption. Collective:
    every rank of ``group`` calls it with the same layers.

    Args:
        exchanges: per layer an ``ExchangeStats`` (its last selective exchange on this rank) or None.
        num_kv_heads: per layer its key/value heads ``H_kv`` (the same on every rank).
        group: the CP group; None: the default group.

    Returns:
        Per layer ``[H_kv]`` union densities or None; pass as ``ReplanPolicy.maybe_replan(...,
        union_density=...)``.
    """
    if len(exchanges) != len(num_kv_heads):
        raise ValueError(f"one num_kv_heads per layer: {len(exchanges)} exchanges, {len(num_kv_heads)} head counts.")
    _check_distributed("synced_union_densities")
    layers = len(exchanges)
    total = sum(int(h) for h in num_kv_heads)
    missing = torch.zeros(layers, dtype=torch.float64)
    covered = torch.zeros(total, dtype=torch.float64)
    values = torch.zeros(total, dtype=torch.float64)
    offset = 0
    for i, (ex, hkv) in enumerate(zip(exchanges, num_kv_heads)):
        hkv = int(hkv)
        if ex is None:
            missing[i] = 1.0
        else:
            u = _remote_union(ex)
            heads = tuple(getattr(ex, "kv_heads", ())) or tuple(range(len(u)))
            if len(heads) != len(u) or not all(0 <= h < hkv for h in heads):
                raise ValueError(
                    f"layer {i}: {len(u)} union entries for key/value heads {list(heads)} of a layer with {hkv}: "
                    "pass the layer's own ExchangeStats (its kv_heads name the layer's key/value heads)."
                )
            for h, x in zip(heads, u):
                values[offset + h] = max(float(values[offset + h]), x)
                covered[offset + h] = 1.0
        offset += hkv
    packed = torch.cat([missing, covered, values]).to(collective_device(group))
    dist.all_reduce(packed, op=dist.ReduceOp.MAX, group=group)
    packed = packed.cpu()
    missing, covered, values = packed[:layers], packed[layers:layers + total], packed[layers + total:]
    out: List[Optional[List[float]]] = []
    offset = 0
    for i, hkv in enumerate(num_kv_heads):
        hkv = int(hkv)
        whole = bool(missing[i] == 0) and bool((covered[offset:offset + hkv] > 0).all())
        out.append(values[offset:offset + hkv].tolist() if whole else None)
        offset += hkv
    return out


__all__ = [
    "AttentionShape", "CostModel", "PlanCost", "PlanComparison",
    "feasible_head_sizes", "shards_fit", "check_tokens", "compare_plans", "plan_layer", "ReplanPolicy",
    "plans_digest", "check_plans_agree", "synced_union_density", "synced_union_densities",
]
