"""Plain-PyTorch reference for low-rank critical-key selection (the definition of correct).

For query group g of head h the proxy is the mean of the group's low-rank queries; the score of
key unit j is ``proxy . k_unit_j`` where ``k_unit_j`` is the mean of the low-rank keys in unit j
(a single key when ``kv_block == 1``). Mean pooling is exact for a linear score: the unit's score
is the mean of its tokens' scores against the proxy. The top ``K_h`` units per group are kept.
Non-finite scores (NaN, +-Inf) rank below every finite score; a group with fewer than ``K_h``
finite scores keeps them all and fills up with the non-finite units of lowest position.
Scores are computed in chunks of groups, so memory is ``chunk x S`` per head, never ``S x S``.

With a causal mask (``ops/mask.py``) a group ranks, best first: its forced units (partial units
and those holding its own queries), its other allowed units by score (finite first, as above),
then disallowed units by ascending position, which fill up a group with fewer allowed units than
``K_h`` and which attention drops entirely (the index contract stays one count per head).
"""

from __future__ import annotations

from typing import Optional

import torch

from megatron_dsv.ops.mask import CausalMask
from megatron_dsv.ops.sparse_index import PAD, SparseIndex

# Budget for one chunk of fp32 scores, in elements (64 Mi elements = 256 MiB).
_CHUNK_ELEMS = 1 << 26


def group_proxies(q_lr: torch.Tensor, group_size: int) -> torch.Tensor:
    """Mean low-rank query per group: ``[B, H, S, r] -> [B, H, S/G, r]`` in fp32."""
    b, h, s, r = q_lr.shape
    return q_lr.float().view(b, h, s // group_size, group_size, r).mean(dim=3)


def pool_keys(k_lr: torch.Tensor, kv_block: int) -> torch.Tensor:
    """Mean low-rank key per key unit: ``[B, H, S, r] -> [B, H, S/kv_block, r]`` in fp32."""
    b, h, s, r = k_lr.shape
    return k_lr.float().view(b, h, s // kv_block, kv_block, r).mean(dim=3)


def select_topk_reference(
    q_lr: torch.Tensor,
    k_lr: torch.Tensor,
    group_size: int,
    kv_count: torch.Tensor,
    kv_block: int = 1,
    mask: Optional[CausalMask] = None,
    q_offset: int = 0,
    k_max: Optional[int] = None,
) -> SparseIndex:
    """Top-``kv_count[b, h]`` key units per query group; see :func:`select_topk` for shapes.
    ``k_max``: ``kv_count.max()`` when the caller knows it on the host (else read from it)."""
    b, h, s_q, _ = q_lr.shape
    s_kv = k_lr.shape[2]
    proxy = group_proxies(q_lr, group_size)
    units = pool_keys(k_lr, kv_block)
    n_units = units.shape[2]
    k_max = int(kv_count.max()) if k_max is None else k_max
    gq = proxy.shape[2]
    chunk = max(1, _CHUNK_ELEMS // max(1, b * h * n_units))
    kv_idx = torch.empty(b, h, gq, k_max, dtype=torch.int32, device=q_lr.device)
    pos = torch.arange(k_max, device=q_lr.device)
    past = pos.view(1, 1, 1, -1) >= kv_count.to(q_lr.device).long().view(b, h, 1, 1)
    for g0 in range(0, gq, chunk):
        scores = torch.einsum("bhgr,bhnr->bhgn", proxy[:, :, g0 : g0 + chunk], units)
        finite = torch.isfinite(scores)
        if mask is not None:
            groups = torch.arange(g0, min(g0 + chunk, gq), device=q_lr.device)
            allowed, forced = mask.unit_classes(groups, group_size, kv_block, n_units, q_offset)
            top = _topk_masked(scores, finite, allowed, forced, k_max, kv_count)
        elif bool(finite.all()):
            top = torch.topk(scores, k_max, dim=-1, sorted=True).indices
        else:
            top = _topk_nonfinite_last(scores, finite, k_max, kv_count)
        # Keep each head's best K_h, then list them in memory order with padding last.
        top = top.masked_fill(past, n_units).sort(dim=-1).values
        kv_idx[:, :, g0 : g0 + chunk] = top.masked_fill(top == n_units, PAD).to(torch.int32)
    return SparseIndex(kv_idx, kv_count.to(q_lr.device, torch.int32), group_size, kv_block, s_q, s_kv, mask, q_offset)


def _topk_masked(
    scores: torch.Tensor, finite: torch.Tensor, allowed: torch.Tensor, forced: torch.Tensor, k_max: int,
    kv_count: torch.Tensor,
) -> torch.Tensor:
    """``topk`` indices under a mask (``allowed``, ``forced``: bool ``[c, U]``), in the order of
    the module docstring. The caller guarantees ``K_h >= `` every group's forced units."""
    n = scores.shape[-1]
    ok = finite & allowed & ~forced
    best = torch.topk(
        torch.where(forced, float("inf"), scores.masked_fill(~ok, float("-inf"))), k_max, dim=-1, sorted=True
    ).indices
    pos = torch.arange(n, device=scores.device)
    # forced > finite allowed > non-finite allowed (by position) > disallowed (by position)
    rank = torch.where(
        forced, torch.full_like(pos, 3 * n),
        torch.where(ok, torch.full_like(pos, 2 * n), torch.where(allowed, 2 * n - 1 - pos, n - 1 - pos)),
    )
    fill = torch.topk(rank.expand_as(scores), k_max, dim=-1, sorted=True).indices
    short = (forced | ok).sum(-1, keepdim=True) < kv_count.to(scores.device).long().view(*kv_count.shape, 1, 1)
    return torch.where(short, fill, best)


def _topk_nonfinite_last(scores: torch.Tensor, finite: torch.Tensor, k_max: int, kv_count: torch.Tensor) -> torch.Tensor:
    """``topk`` indices, best first, with non-finite scores ranked last by position.

    torch.topk ranks NaN above every number; here a group with at least ``K_h`` finite scores
    takes its top ``K_h`` finite units, and a group with fewer takes all finite units, then the
    non-finite ones in ascending position (the Triton kernels' order).
    """
    n = scores.shape[-1]
    best = torch.topk(scores.masked_fill(~finite, float("-inf")), k_max, dim=-1, sorted=True).indices
    pos = torch.arange(n, device=scores.device)
    # every finite unit above every non-finite one; among non-finite ones the lowest position first
    rank = torch.where(finite, torch.full_like(pos, n), n - 1 - pos)
    fill = torch.topk(rank, k_max, dim=-1, sorted=True).indices
    short = finite.sum(-1, keepdim=True) < kv_count.to(scores.device).long().view(*kv_count.shape, 1, 1)
    return torch.where(short, fill, best)
