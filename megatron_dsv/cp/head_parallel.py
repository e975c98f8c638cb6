"""Head-parallel context parallelism: all-to-all with uneven, per-rank head lists.

Every rank of a head group holds all heads of its token shard ``[s, b, H, D]``. The forward
all-to-all sends to peer ``p`` the heads in ``send_heads[p]`` and receives the peers' shards of
its own heads, concatenated along the sequence (peers hold adjacent shards, in rank order):
``[g*s, b, len(send_heads[me]), D]``. Head lists may differ in length (sparsity-balanced
assignment, ``megatron_dsv/cp/plan.py``) and may repeat a head (a key/value head needed by two
ranks under grouped-query attention); the backward sums the repeats. The inverse all-to-all
brings the attention output back to ``[s, b, H, D]``. Both are autograd functions and each is the
other's backward. Communication is ``all_to_all_single`` with split sizes (NCCL and gloo).
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

Heads = Sequence[Sequence[int]]


def _exchange(chunks, recv_shapes, group, like: Tensor):
    """all_to_all_single of per-peer tensors; returns the received tensors, one per peer."""
    send = torch.cat([c.reshape(-1) for c in chunks]) if chunks else like.new_empty(0)
    recv_numel = [int(torch.Size(s).numel()) for s in recv_shapes]
    recv = like.new_empty(sum(recv_numel))
    dist.all_to_all_single(recv, send, recv_numel, [c.numel() for c in chunks], group=group)
    return [t.view(s) for t, s in zip(recv.split(recv_numel), recv_shapes)]


def scatter_heads_raw(x: Tensor, send_heads: Heads, group) -> Tensor:
    """``x [s, b, H, D]`` -> ``[g*s, b, len(send_heads[me]), D]`` (no autograd)."""
    me = dist.get_rank(group)
    s, b, _, d = x.shape
    index = [torch.as_tensor(list(h), dtype=torch.long, device=x.device) for h in send_heads]
    chunks = [x.index_select(2, i) for i in index]
    mine = len(send_heads[me])
    parts = _exchange(chunks, [(s, b, mine, d)] * len(send_heads), group, x)
    return torch.cat(parts, dim=0)


def gather_heads_raw(y: Tensor, send_heads: Heads, num_heads: int, group) -> Tensor:
    """Inverse of :func:`scatter_heads_raw`: ``[g*s, b, n_me, D]`` -> ``[s, b, num_heads, D]``;
    a head listed for several peers receives the sum of their parts."""
    g = len(send_heads)
    s, b, _, d = y.shape
    s //= g
    parts = _exchange(list(y.chunk(g, dim=0)), [(s, b, len(h), d) for h in send_heads], group, y)
    flat = torch.tensor([h for heads in send_heads for h in heads], dtype=torch.long, device=y.device)
    out = y.new_zeros(s, b, num_heads, d)
    return out.index_add_(2, flat, torch.cat(parts, dim=2))


class _ScatterHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, send_heads, group):
        ctx.send_heads, ctx.group, ctx.num_heads = send_heads, group, x.shape[2]
        return scatter_heads_raw(x.contiguous(), send_heads, group)

    @staticmethod
    def backward(ctx, grad):
        return gather_heads_raw(grad.contiguous(), ctx.send_heads, ctx.num_heads, ctx.group), None, None


class _GatherHeads(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, slots, num_heads, group):
        ctx.slots, ctx.group = slots, group
        return gather_heads_raw(y.contiguous(), slots, num_heads, group)

    @staticmethod
    def backward(ctx, grad):
        return scatter_heads_raw(grad.contiguous(), ctx.slots, ctx.group), None, None, None


def scatter_heads(x: Tensor, send_heads: Heads, group: Optional[object]) -> Tensor:
    """Head all-to-all (differentiable): ``x [s, b, H, D]`` on each of ``g`` ranks holding
    adjacent token shards -> ``[g*s, b, len(send_heads[rank]), D]``: this rank's heads on the
    head group's ``g*s`` tokens. ``group=None`` means a group of one (returns ``x[:, :, heads]``)."""
    if group is None:
        return x[:, :, list(send_heads[0])]
    return _ScatterHeads.apply(x, _freeze(send_heads), group)


def gather_heads(y: Tensor, slots: Heads, num_heads: int, group: Optional[object]) -> Tensor:
    """Inverse head all-to-all (differentiable): ``[g*s, b, len(slots[rank]), D]`` ->
    ``[s, b, num_heads, D]``; ``slots`` must partition the heads."""
    if group is None:
        out = y.new_zeros(*y.shape[:2], num_heads, y.shape[3])
        out[:, :, list(slots[0])] = y
        return out
    return _GatherHeads.apply(y, _freeze(slots), num_heads, group)


def kv_send_heads(slots: Heads, queries_per_kv: int) -> Tuple[Tuple[int, ...], ...]:
    """Key/value heads each slot needs: the key/value head of every query head it holds.

    When a slot's query heads are whole key/value groups (``balance_heads(..., unit=rep)``) each
    key/value head is sent once and the slot keeps the ratio ``rep``; otherwise it gets one
    key/value head per query head (repeats allowed), i.e. ratio 1.
    """
    rep = queries_per_kv
    out = []
    for heads in slots:
        kv = [h // rep for h in heads]
        whole = len(heads) % rep == 0 and all(
            list(heads[i : i + rep]) == list(range(heads[i], heads[i] + rep)) and heads[i] % rep == 0
            for i in range(0, len(heads), rep)
        )
        out.append(tuple(sorted(set(kv))) if whole else tuple(kv))
    return tuple(out)


def _freeze(heads: Heads) -> Tuple[Tuple[int, ...], ...]:
    return tuple(tuple(int(h) for h in hs) for hs in heads)


__all__ = ["scatter_heads", "gather_heads", "scatter_heads_raw", "gather_heads_raw", "kv_send_heads"]
