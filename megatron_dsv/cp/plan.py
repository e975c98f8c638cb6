"""The per-layer context-parallel plan shared by the planner and the attention layer.

A CP group of N ranks is split as ``head_size x seq_size``. CP rank ``r`` holds the ``r``-th
contiguous token shard; ranks ``i*head_size .. i*head_size + head_size - 1`` (adjacent shards)
form head group ``i`` and exchange heads with an all-to-all, after which head slot
``j = r % head_size`` holds heads ``slots[j]`` on the token chunk ``i`` (``seq_size`` chunks of
``S / seq_size`` tokens); ranks with the same slot ``j`` form a sequence group that shares keys
and values. This is Megatron's hierarchical CP layout for ``--hierarchical-context-parallel-sizes
head_size seq_size`` (level 0 = consecutive ranks, level 1 = stride ``head_size``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

import math


@dataclass(frozen=True)
class LayerPlan:
    """How one layer's attention is split over the CP group.

    Attributes:
        head_size: ranks that split heads (all-to-all), ``g_h``.
        seq_size: ranks that split queries and share keys/values, ``g_s``;
            ``head_size * seq_size`` is the CP size.
        slots: query heads (indices among this TP rank's heads) of each head slot, ascending,
            ``len(slots) == head_size``; every head in exactly one slot.
        predicted_ms: the cost model's attention time (fwd+bwd) for this plan, NaN if not modelled.
    """

    head_size: int
    seq_size: int
    slots: Tuple[Tuple[int, ...], ...]
    predicted_ms: float = math.nan

    def __post_init__(self):
        if self.head_size < 1 or self.seq_size < 1:
            raise ValueError(f"head_size ({self.head_size}) and seq_size ({self.seq_size}) must be >= 1.")
        if len(self.slots) != self.head_size:
            raise ValueError(f"a plan with head_size={self.head_size} needs {self.head_size} head slots, got {len(self.slots)}.")
        heads = sorted(h for s in self.slots for h in s)
        if heads != list(range(len(heads))) or any(len(s) == 0 for s in self.slots):
            raise ValueError(f"head slots {self.slots} must partition heads 0..H-1 with no empty slot.")
        if any(list(s) != sorted(s) for s in self.slots):
            raise ValueError(f"heads within a slot must be ascending, got {self.slots}.")

    @property
    def cp_size(self) -> int:
        return self.head_size * self.seq_size

    @property
    def num_heads(self) -> int:
        return sum(len(s) for s in self.slots)

    def key(self) -> Tuple:
        """A hashable, float-free identity (ranks compare plans with it)."""
        return (self.head_size, self.seq_size, self.slots)


def balance_heads(work: Sequence[float], num_slots: int, unit: int = 1) -> Tuple[Tuple[int, ...], ...]:
    """Longest-processing-time greedy head assignment (the DSV paper's choice).

    Heads are taken in units of ``unit`` consecutive heads (grouped-query attention: the query
    heads of one key/value head stay together so their keys are sent once). Units are sorted by
    work (descending, index breaks ties) and each goes to the slot with the least summed work
    (then fewest heads, then lowest index), so the result is deterministic on every rank.
    LPT is within 4/3 of the optimal makespan.

    Args:
        work: per-head cost, e.g. ``1 - sparsity`` (density); ``len(work) % unit == 0``.
        num_slots: head-parallel ranks; at most the number of units.

    Returns:
        ``num_slots`` ascending tuples of head indices.
    """
    h = len(work)
    if unit < 1 or h % unit:
        raise ValueError(f"{h} heads cannot be grouped in units of {unit} (query heads per key/value head).")
    n_units = h // unit
    if not 1 <= num_slots <= n_units:
        raise ValueError(
            f"cannot split {n_units} head units ({h} heads, {unit} per key/value head) over "
            f"{num_slots} head-parallel ranks: choose a head-parallel size <= {n_units}."
        )
    unit_work = [float(sum(work[u * unit : (u + 1) * unit])) for u in range(n_units)]
    order = sorted(range(n_units), key=lambda u: (-unit_work[u], u))
    load = [0.0] * num_slots
    members = [[] for _ in range(num_slots)]
    for u in order:
        j = min(range(num_slots), key=lambda s: (load[s], len(members[s]), s))
        load[j] += unit_work[u]
        members[j].extend(range(u * unit, (u + 1) * unit))
    return tuple(tuple(sorted(m)) for m in members)


def even_slots(num_heads: int, num_slots: int, unit: int = 1) -> Tuple[Tuple[int, ...], ...]:
    """Equal-work assignment (dense layers, no statistics yet): LPT on unit work."""
    return balance_heads([1.0] * num_heads, num_slots, unit)


def head_unit(num_heads: int, num_kv_heads: int, head_size: int) -> int:
    """Heads moved together: a key/value head's query heads when there are enough key/value
    heads to give every head slot one (keys sent once), else single query heads."""
    rep = num_heads // num_kv_heads
    return rep if num_kv_heads >= head_size else 1


def fixed_plan(
    split, cp_size: int, num_heads: int, num_kv_heads: int, work: Optional[Sequence[float]] = None
) -> LayerPlan:
    """The plan for ``--dsv-cp-split head | seq | (H, S)`` with an LPT head assignment on
    ``work`` (per-head density; default equal). ``head`` takes the largest head-parallel size
    that divides the CP size and does not exceed the heads."""
    if split == "seq":
        head_size = 1
    elif split in ("head", "auto"):
        head_size = max(d for d in range(1, cp_size + 1) if cp_size % d == 0 and d <= num_heads)
    else:
        head_size, seq_size = split
        if head_size * seq_size != cp_size:
            raise ValueError(
                f"--dsv-cp-split {head_size}x{seq_size} needs --context-parallel-size "
                f"{head_size * seq_size}, got {cp_size}."
            )
        if head_size > num_heads:
            raise ValueError(
                f"--dsv-cp-split {head_size}x{seq_size}: {head_size} head-parallel ranks but only "
                f"{num_heads} heads per tensor-parallel rank; use at most {num_heads}."
            )
    work = [1.0] * num_heads if work is None else list(work)
    slots = balance_heads(work, head_size, head_unit(num_heads, num_kv_heads, head_size))
    return LayerPlan(head_size, cp_size // head_size, slots)


__all__ = ["LayerPlan", "balance_heads", "even_slots", "fixed_plan", "head_unit"]
