"""Process groups for every head x sequence split of the context-parallel group, built once.

For a CP group of N ranks and each divisor ``g_h`` of N, head groups are runs of ``g_h``
consecutive CP ranks (adjacent token shards) and sequence groups are the ranks ``g_h`` apart
(see ``megatron_dsv/cp/plan.py``). ``torch.distributed.new_group`` is collective over the whole
world, so every process builds the groups for every CP group, in one fixed order: call
:func:`build_cp_groups` once, from code every rank runs at start-up, hold the :class:`CPGroups` it
returns and hand that one object to every layer (each call creates new process groups).
When Megatron was started with ``--cp-comm-type a2a+p2p --hierarchical-context-parallel-sizes U R``
its two levels are exactly our ``U x R`` split and are reused instead of creating new ones.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist


def divisors(n: int) -> List[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def split_ranks(ranks: Sequence[int], head_size: int) -> Tuple[List[List[int]], List[List[int]]]:
    """Head groups (consecutive) and sequence groups (stride ``head_size``) of one CP group's ranks."""
    n = len(ranks)
    if head_size < 1 or n % head_size:
        raise ValueError(f"head-parallel size {head_size} does not divide the context-parallel size {n}.")
    heads = [list(ranks[i : i + head_size]) for i in range(0, n, head_size)]
    seqs = [list(ranks[j::head_size]) for j in range(head_size)]
    return heads, seqs


def slot_and_chunk(cp_rank: int, head_size: int) -> Tuple[int, int]:
    """(head slot, token chunk) of a CP rank under a ``head_size x seq_size`` split."""
    return cp_rank % head_size, cp_rank // head_size


class CPGroups:
    """This rank's head and sequence groups for every split of its CP group.

    ``get(head_size) -> (head_group, seq_group)``; a group of one rank is ``None``.
    """

    def __init__(self, cp_group, splits: Dict[int, Tuple[Optional[object], Optional[object]]]):
        self.cp_group = cp_group
        self.size = dist.get_world_size(cp_group)
        self.rank = dist.get_rank(cp_group)
        self._splits = splits

    def get(self, head_size: int):
        if head_size not in self._splits:
            raise ValueError(
                f"no process groups for head-parallel size {head_size}; the CP size {self.size} "
                f"allows {sorted(self._splits)}."
            )
        return self._splits[head_size]


def build_cp_groups(cp_group, hierarchical_groups: Optional[Sequence] = None) -> CPGroups:
    """Build the head/sequence groups of every split of ``cp_group``. Collective over the world.

    Every process calls it at the same point (``new_group`` is collective over the whole world);
    the caller keeps the result and reuses it: each call creates new process groups.

    Args:
        cp_group: Megatron's context-parallel group (``pg_collection.cp``).
        hierarchical_groups: Megatron's two hierarchical CP groups (``pg_collection.hcp``) when it
            was started with two ``--hierarchical-context-parallel-sizes``; reused for that split.
    """
    mine = tuple(dist.get_process_group_ranks(cp_group))
    n = len(mine)
    all_cp: List = [None] * dist.get_world_size()
    dist.all_gather_object(all_cp, mine)
    cp_groups = sorted(set(tuple(r) for r in all_cp))
    reuse = None
    if hierarchical_groups is not None and len(hierarchical_groups) == 2:
        reuse = dist.get_world_size(hierarchical_groups[0])
    me = dist.get_rank()
    splits: Dict[int, Tuple[Optional[object], Optional[object]]] = {}
    for head_size in divisors(n):
        if head_size == 1:
            splits[1] = (None, cp_group)
            continue
        if head_size == n:
            splits[n] = (cp_group, None)
            continue
        if head_size == reuse:
            splits[head_size] = tuple(hierarchical_groups)
            continue
        head_g = seq_g = None
        for ranks in cp_groups:
            heads, seqs = split_ranks(ranks, head_size)
            for sub in heads:
                grp = dist.new_group(sub)
                head_g = grp if me in sub else head_g
            for sub in seqs:
                grp = dist.new_group(sub)
                seq_g = grp if me in sub else seq_g
        splits[head_size] = (head_g, seq_g)
    return CPGroups(cp_group, splits)


def collective_device(group) -> torch.device:
    """Where a tensor for a collective on ``group`` must live: the current GPU under NCCL, the CPU
    otherwise (gloo)."""
    if "nccl" in str(dist.get_backend(group)):
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


__all__ = ["CPGroups", "build_cp_groups", "collective_device", "split_ranks", "slot_and_chunk", "divisors"]
