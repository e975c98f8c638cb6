"""One layer's attention under a context-parallel plan: head all-to-all, then the sequence part.

:class:`CPAttention` is what ``DSVCoreAttention`` (and the CP tests) use. With a plan
``head_size x seq_size`` and this rank's slot ``j`` and chunk ``i`` (``megatron_dsv/cp/plan.py``):

1. ``to_heads``: q/k/v shards ``[s, b, H, D]`` -> ``[b, H_j, S/seq_size, D]`` (head all-to-all
   inside the head group; key/value heads follow the query heads, ``kv_send_heads``);
2. selection and the predictor run on those heads for the chunk (their low-rank keys are
   all-gathered over the sequence group: ``r`` values per token, no K/V traffic);
3. ``dense`` (local SDPA when ``seq_size == 1``, else the ring) or ``sparse`` (local sparse
   attention, else the selective key/value exchange);
4. ``from_heads``: the inverse all-to-all back to ``[s, b, H, D]``.

Without context parallelism (:meth:`CPAttention.local`) the same calls are the size-1 case:
``to_heads``/``from_heads`` are permuted views (no copy), ``gather_keys`` is the identity, and
``dense``/``sparse`` run the local kernels, so a layer has one pipeline for both.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

from torch import Tensor

from megatron_dsv.cp.groups import CPGroups, slot_and_chunk
from megatron_dsv.cp.head_parallel import gather_heads, kv_send_heads, scatter_heads
from megatron_dsv.cp.plan import LayerPlan
from megatron_dsv.cp.seq_parallel import ExchangeStats, gather_sequence, ring_attention, selective_sparse_attention
from megatron_dsv.ops.mask import CausalMask
from megatron_dsv.ops.sparse_attention import sparse_attention
from megatron_dsv.ops.sparse_index import SparseIndex


class CPAttention:
    """Attention of one layer call under ``plan`` (built per forward; cheap)."""

    def __init__(self, plan: LayerPlan, groups: Optional[CPGroups], num_heads: int, num_kv_heads: int):
        if groups is None:  # the size-1 case: see local()
            self.plan, self.num_heads, self.num_kv_heads = plan, num_heads, num_kv_heads
            self.head_group = self.seq_group = None
            self.slot = self.chunk = 0
            self.heads = plan.slots[0]
            self.kv_slots = (tuple(range(num_kv_heads)),)
            self.exchange = None
            self.cp_size = 1
            return
        if plan.cp_size != groups.size:
            raise ValueError(f"plan {plan.head_size}x{plan.seq_size} does not match the CP size {groups.size}.")
        if plan.num_heads != num_heads:
            raise ValueError(f"plan covers {plan.num_heads} heads, the layer has {num_heads} on this rank.")
        self.plan, self.num_heads, self.num_kv_heads = plan, num_heads, num_kv_heads
        self.head_group, self.seq_group = groups.get(plan.head_size)
        self.slot, self.chunk = slot_and_chunk(groups.rank, plan.head_size)
        self.heads = plan.slots[self.slot]
        self.kv_slots = kv_send_heads(plan.slots, num_heads // num_kv_heads)
        self.exchange: Optional[ExchangeStats] = None
        self.cp_size = groups.size

    @classmethod
    def local(cls, num_heads: int, num_kv_heads: int) -> "CPAttention":
        """No context parallelism: every head, the whole sequence, no communication."""
        return cls(LayerPlan(1, 1, (tuple(range(num_heads)),)), None, num_heads, num_kv_heads)

    @property
    def is_local(self) -> bool:
        return self.head_group is None and self.seq_group is None

    @property
    def seq_size(self) -> int:
        return self.plan.seq_size

    def to_heads(self, query: Tensor, key: Tensor, value: Tensor):
        """``[s, b, H, D]``, ``[s, b, Hkv, D]`` shards -> ``[b, H_j, s_c, D]``, ``[b, Hkv_j, s_c, D]``."""
        if self.is_local:
            return tuple(t.permute(1, 2, 0, 3) for t in (query, key, value))
        q = scatter_heads(query, self.plan.slots, self.head_group)
        k = scatter_heads(key, self.kv_slots, self.head_group)
        v = scatter_heads(value, self.kv_slots, self.head_group)
        return tuple(t.permute(1, 2, 0, 3) for t in (q, k, v))

    def from_heads(self, out: Tensor) -> Tensor:
        """``[b, H_j, s_c, D]`` -> ``[s, b, H, D]``."""
        if self.is_local:
            return out.permute(2, 0, 1, 3)
        return gather_heads(out.permute(2, 0, 1, 3), self.plan.slots, self.num_heads, self.head_group)

    def chunk_range(self, s_chunk: int):
        """Token range of this rank's chunk in the full sequence."""
        return self.chunk * s_chunk, (self.chunk + 1) * s_chunk

    def gather_keys(self, k: Tensor) -> Tensor:
        """``[b, h, s_c, r]`` (e.g. low-rank keys) -> the whole sequence's ``[b, h, S, r]``."""
        return k if self.seq_group is None else gather_sequence(k, self.seq_group)

    def dense(self, q, k, v, scale: float, group_size: int, kv_block: int, backend: str,
              local: Optional[Callable[[Tensor, Tensor, Tensor], Tensor]] = None,
              mask: Optional[CausalMask] = None) -> Tensor:
        """Dense attention of the chunk's queries over the whole sequence's keys, under ``mask``
        (over the whole sequence) when given; ``local`` (without a sequence split) must apply
        the same mask."""
        if self.seq_group is None and local is not None:
            return local(q, k, v)
        out, _ = ring_attention(q, k, v, scale, self.seq_group, group_size, kv_block, backend, mask)
        return out

    def query_offset(self, s_chunk: int, mask: Optional[CausalMask]) -> int:
        """``q_offset`` for a masked selection of this chunk's queries over the gathered keys."""
        return 0 if mask is None else self.chunk_range(s_chunk)[0]

    def sparse(self, q, k, v, index: SparseIndex, scale: float, backend: str) -> Tensor:
        """Sparse attention with ``index`` over the whole sequence's key blocks.

        Locally the output is written in ``[s, b, H, D]`` memory (returned as its ``[b, H, s, D]``
        view), so :meth:`from_heads` and the layer's final reshape copy nothing."""
        if self.seq_group is None:
            layout = "sbhd" if self.is_local else "bhsd"
            out, _ = sparse_attention(q, k, v, index, scale, backend=backend, out_layout=layout)
            return out
        out, _, stats = selective_sparse_attention(q, k, v, index, scale, self.seq_group, backend)
        self.exchange = dataclasses.replace(stats, kv_heads=tuple(self.kv_slots[self.slot]))
        return out


__all__ = ["CPAttention"]
