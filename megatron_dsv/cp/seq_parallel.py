"""Sequence-parallel attention across the ranks of a sequence group.

Each of the ``g`` ranks holds the queries, keys and values of one contiguous token chunk
(``[B, H, s, D]``, chunk ``i`` = tokens ``i*s .. (i+1)*s``) and keeps its queries.

* Dense (stage 1, dense layers): :func:`ring_attention` passes key/value chunks around the ring
  (``g - 1`` hops, each overlapped with the attention of the chunk in hand) and merges the partial
  outputs with their log-sum-exp; the backward passes key/value chunks again with their dK/dV
  accumulators, which arrive home after ``g`` hops. No rank ever holds more than two chunks.
* Sparse: :func:`selective_sparse_attention`: the low-rank keys (``r`` values per token and head)
  are all-gathered, each query group selects its critical key blocks over the whole sequence,
  and every rank fetches from each owner only the union of the remote blocks its groups selected
  (per key/value head), computes sparse attention over its compact key set and, in the backward,
  returns dK/dV for the fetched blocks to their owners.

Every function is exact: equal to single-process attention on the gathered sequence up to
floating-point summation order (tests/cp/).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_dsv.ops._utils import log_once
from megatron_dsv.ops.sparse_attention import sparse_attention, sparse_attention_bwd, sparse_attention_fwd
from megatron_dsv.ops.mask import CausalMask
from megatron_dsv.ops.sparse_index import PAD, SparseIndex, _mark_valid


def full_index(
    b: int, h: int, s_q: int, s_kv: int, group_size: int, kv_block: int, device, mask: Optional[CausalMask] = None,
) -> SparseIndex:
    """A SparseIndex selecting every key block: dense attention through the sparse kernels (under
    ``mask`` when given: the units past a group's limit are fillers the mask drops)."""
    units = s_kv // kv_block
    idx = torch.arange(units, dtype=torch.int32, device=device).expand(b, h, s_q // group_size, units)
    cnt = torch.full((b, h), units, dtype=torch.int32, device=device)
    return _mark_valid(SparseIndex(idx.contiguous(), cnt, group_size, kv_block, s_q, s_kv, mask))


def dense_block(s_kv: int, kv_block: int) -> int:
    """Key block for a dense ring step: the DSV key block when it divides the chunk, else 1."""
    return kv_block if s_kv % kv_block == 0 else 1


class _CudnnChunk:
    """A dense ring step on PyTorch's cuDNN attention op, which returns the log-sum-exp and whose
    backward accepts the *merged* output and LSE (the public SDPA returns no LSE). Measured on an
    H100 (``benchmarks/results/cp_chunk_h100_20261124_privops.json``, 16 heads of 128): 13.5 ms
    fwd+bwd at 16k-token chunks vs 20.0 ms for our Triton kernels with an all-blocks index and
    13.9 ms for cuDNN SDPA itself. The op is private to torch (pinned to 2.11); its
    auxiliary outputs (RNG state, sequence offsets) are kept per chunk for the backward.
    """

    @staticmethod
    def available(q: Tensor) -> bool:
        return (
            q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and q.shape[-1] % 8 == 0
            and hasattr(torch.ops.aten, "_scaled_dot_product_cudnn_attention_backward")
            and torch.backends.cudnn.is_available()
        )

    @staticmethod
    def forward(q, k, v, scale):
        out, lse, cq, ck, mq, mk, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
            q, k, v, None, True, 0.0, False, False, scale=scale
        )
        aux = (lse.shape, lse.dtype, cq, ck, mq, mk, seed, offset)  # what the backward needs
        return out, lse.reshape(q.shape[:3]).float(), aux

    @staticmethod
    def backward(q, k, v, out, lse, dout, scale, aux):
        lse_shape, lse_dtype, cq, ck, mq, mk, seed, offset = aux
        dq, dk, dv = torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
            dout, q, k, v, out, lse.to(lse_dtype).reshape(lse_shape).contiguous(), seed, offset, None,
            cq, ck, mq, mk, 0.0, False, scale=scale,
        )
        return dq, dk, dv


def _ring_pass(tensors: List[Tensor], group) -> List[Tensor]:
    """Send each tensor to the next rank of ``group`` and receive the previous rank's (async)."""
    g, me = dist.get_world_size(group), dist.get_rank(group)
    nxt = dist.get_global_rank(group, (me + 1) % g)
    prv = dist.get_global_rank(group, (me - 1) % g)
    recv = [torch.empty_like(t) for t in tensors]
    ops = [dist.P2POp(dist.isend, t, nxt, group) for t in tensors]
    ops += [dist.P2POp(dist.irecv, r, prv, group) for r in recv]
    return dist.batch_isend_irecv(ops), recv


def _merge(out: Optional[Tensor], lse: Optional[Tensor], o: Tensor, l: Tensor):
    acc = torch.promote_types(o.dtype, torch.float32)
    o, l = o.to(acc), l.to(acc)
    if out is None:
        return o, l
    new = torch.logaddexp(lse, l)
    out = out * torch.exp(lse - new).unsqueeze(-1) + o * torch.exp(l - new).unsqueeze(-1)
    return out, new


def _use_cudnn(q: Tensor, k: Tensor, backend: str) -> bool:
    """Whether the dense ring's steps run on PyTorch's cuDNN op; the choice is logged once per reason."""
    if backend == "reference":
        return False
    if not _CudnnChunk.available(q) or k.shape[1] != q.shape[1]:
        why = "grouped-query attention" if k.shape[1] != q.shape[1] else "PyTorch's cuDNN attention op is unavailable here"
        if q.is_cuda:
            log_once(logging.INFO, f"context-parallel dense ring: steps on the Triton kernels ({why}; "
                                   "cuDNN steps are 1.5x faster where they apply, H100 16k-token chunks)")
        return False
    log_once(logging.INFO, "context-parallel dense ring: steps on PyTorch's cuDNN attention op")
    return True


def ring_steps(mask: Optional[CausalMask], me: int, g: int, s: int) -> List[Optional[str]]:
    """What each ring step computes for chunk ``me`` of ``g`` chunks of ``s`` tokens: at step ``t``
    the rank holds chunk ``(me - t) % g``; ``"full"`` (every pair allowed), ``"masked"`` (its own
    chunk under the mask's local view, :meth:`CausalMask.local`) or None (no pair allowed: no
    compute, no LSE contribution; the chunk is still passed on). Pure; shards must pass
    :meth:`CausalMask.check_shards`, so only the own chunk can be partly masked."""
    if mask is None:
        return ["full"] * g
    mask.check_shards(g * s, s)
    steps: List[Optional[str]] = []
    for t in range(g):
        p = (me - t) % g
        rel = mask.relation(me * s, (me + 1) * s, p * s, (p + 1) * s)
        if rel == "partial":
            rel = "full" if mask.local(me * s, s) is None else "masked"
        steps.append(None if rel == "none" else rel)
    return steps


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, scale, group, group_size, kv_block, backend, mask):
        g, me = dist.get_world_size(group), dist.get_rank(group)
        b, h, s, _ = q.shape
        kvb = dense_block(k.shape[2], kv_block)
        steps = ring_steps(mask, me, g, s)
        cudnn = _use_cudnn(q, k, backend)
        full = None if cudnn else full_index(b, h, s, k.shape[2], group_size, kvb, q.device)
        # the own chunk is step 0; under a mask it runs on the sparse kernels with the mask's local view
        own = None
        if steps[0] == "masked":
            own = full_index(b, h, s, k.shape[2], group_size, kvb, q.device, mask.local(me * s, s))
        q = q.contiguous()
        k_cur, v_cur = k.contiguous(), v.contiguous()
        out = lse = None
        aux: List[object] = []
        for step in range(g):
            reqs, nxt = _ring_pass([k_cur, v_cur], group) if step < g - 1 else ([], None)
            a = None
            if steps[step] == "masked":
                o, l = sparse_attention_fwd(q, k_cur, v_cur, own, scale, backend)
            elif steps[step] == "full" and cudnn:
                o, l, a = _CudnnChunk.forward(q, k_cur, v_cur, scale)
            elif steps[step] == "full":
                o, l = sparse_attention_fwd(q, k_cur, v_cur, full, scale, backend)
            aux.append(a)
            if steps[step] is not None:
                out, lse = _merge(out, lse, o, l)
            for r in reqs:
                r.wait()
            if nxt is not None:
                k_cur, v_cur = nxt
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.cfg = (scale, group, full, own, steps, backend, aux)
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        if dlse is not None:
            raise RuntimeError("ring_attention: gradients through the log-sum-exp are not supported.")
        q, k, v, out, lse = ctx.saved_tensors
        scale, group, full, own, steps, backend, aux = ctx.cfg
        if dout is None:
            dout = torch.zeros_like(out)
        g = dist.get_world_size(group)
        dout = dout.contiguous()
        acc = torch.promote_types(q.dtype, torch.float32)
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        k_cur, v_cur = k.contiguous(), v.contiguous()
        dk = torch.zeros(k.shape, dtype=acc, device=k.device)
        dv = torch.zeros_like(dk)
        for step in range(g):
            # the chunk held at backward step t is the one of forward step t (same ring order)
            grads = None
            if aux[step] is not None:
                grads = _CudnnChunk.backward(q, k_cur, v_cur, out, lse, dout, scale, aux[step])
            elif steps[step] is not None:
                index = own if steps[step] == "masked" else full
                grads = sparse_attention_bwd(q, k_cur, v_cur, out, lse, dout, index, scale, backend)
            if grads is not None:
                dq += grads[0]
                dk += grads[1]
                dv += grads[2]
            # dK/dV travel with the chunk they belong to and reach its owner after g hops.
            send = [dk, dv] + ([k_cur, v_cur] if step < g - 1 else [])
            reqs, recv = _ring_pass(send, group)
            for r in reqs:
                r.wait()
            dk, dv = recv[0], recv[1]
            if step < g - 1:
                k_cur, v_cur = recv[2], recv[3]
        return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype), None, None, None, None, None, None


def ring_attention(
    q: Tensor, k: Tensor, v: Tensor, scale: float, group, group_size: int, kv_block: int = 1,
    backend: str = "auto", mask: Optional[CausalMask] = None,
) -> Tuple[Tensor, Tensor]:
    """Dense attention of local queries over the keys of every rank of ``group``.

    Args:
        q: ``[B, H, s, D]`` this rank's queries; k, v: ``[B, H_kv, s, D]`` its keys/values (every
            rank holds ``s`` tokens).
        group_size: query-group size for the kernels (``s % group_size == 0``).
        kv_block: key block of the kernels' dense steps (used when it divides ``s``).
        mask: optional :class:`CausalMask` over the gathered sequence (rank ``i`` holds tokens
            ``[i*s, (i+1)*s)``): steps with no allowed pair are skipped, fully allowed ones run
            unmasked, and the own chunk runs under the mask's local view on the sparse kernels
            (:func:`ring_steps`). Shards that cut chunk-causal chunks are refused
            (:meth:`CausalMask.check_shards`).

    Returns:
        ``out [B, H, s, D]`` (q's dtype) and fp32 ``lse [B, H, s]``; differentiable w.r.t. q, k, v
        through ``out``.
    """
    if group is None or dist.get_world_size(group) == 1:
        kvb = dense_block(k.shape[2], kv_block)
        index = full_index(q.shape[0], q.shape[1], q.shape[2], k.shape[2], group_size, kvb, q.device, mask)
        return sparse_attention(q, k, v, index, scale, backend=backend)
    return _RingAttention.apply(q, k, v, scale, group, group_size, kv_block, backend, mask)


@dataclass
class ExchangeStats:
    """What one selective exchange moved, counted in bytes (forward; the backward mirrors it)."""

    fetched_bytes: int = 0
    allgather_bytes: int = 0  # what an all-gather of the remote keys/values would have received
    union_density: List[float] = field(default_factory=list)  # per key/value head, of all blocks
    remote_union_density: List[float] = field(default_factory=list)
    """Per key/value head, the fraction of the *remote* key blocks (other ranks' chunks) fetched,
    averaged over the batch: the ``u`` of the cost model (:mod:`megatron_dsv.cp.cost_model`)."""
    kv_heads: Tuple[int, ...] = ()
    """The layer's key/value head of each entry (this rank's head slot, ``kv_send_heads`` order);
    empty: entry ``i`` is key/value head ``i`` (a sequence-only exchange over all heads)."""

    @property
    def ratio(self) -> float:
        return self.fetched_bytes / max(1, self.allgather_bytes)


def gather_sequence(x: Tensor, group) -> Tensor:
    """All-gather ``[B, H, s, r]`` chunks along the sequence -> ``[B, H, g*s, r]`` (no autograd)."""
    g = dist.get_world_size(group)
    buf = x.new_empty((g * x.shape[0],) + tuple(x.shape[1:]))
    dist.all_gather_into_tensor(buf, x.contiguous(), group=group)
    return buf.view((g,) + tuple(x.shape)).permute(1, 2, 0, 3, 4).reshape(x.shape[0], x.shape[1], g * x.shape[2], x.shape[3])


class _KVPlan:
    """Who needs which key blocks: built from a SparseIndex over the whole sequence's blocks."""

    def __init__(self, index: SparseIndex, num_kv_heads: int, s_local: int, group):
        self.g, self.me = dist.get_world_size(group), dist.get_rank(group)
        self.group = group
        b, h = index.batch_size, index.num_heads
        self.kvb = index.kv_block
        n_total = index.num_kv_units
        self.n_loc = s_local // self.kvb
        rep = h // num_kv_heads
        dev = index.kv_idx.device
        idx = index.kv_idx.long()
        spare = idx.masked_fill(idx < 0, n_total).flatten(2)  # padding -> spare column
        used = torch.zeros(b, h, n_total + 1, dtype=torch.bool, device=dev)
        used.scatter_(2, spare, True)
        union = used[..., :n_total].view(b, num_kv_heads, rep, n_total).any(2)  # [B, Hkv, N]
        owner = torch.arange(n_total, device=dev) // self.n_loc
        self.mask, self.q_offset = None, 0
        if index.mask is None:
            self.pos = union.long().cumsum(-1) - 1  # compact block position of each used block
            self.units_max = max(1, int(union.sum(-1).max()))
        else:
            union = self._masked_layout(index, union)
        counts = union.sum(-1)
        # (b, kv head, block) triples, grouped by owner in rank order
        trip = union.nonzero()
        own = owner[trip[:, 2]]
        order = torch.argsort(own * (b * num_kv_heads * n_total) + (trip[:, 0] * num_kv_heads + trip[:, 1]) * n_total + trip[:, 2])
        trip, own = trip[order], own[order]
        self.req = [trip[own == p] for p in range(self.g)]  # what I need from each owner
        self.local = _local(self.req[self.me], self.me, self.n_loc)  # my own blocks, owner-local
        # blocks fetched from each peer (my own are read in place, never exchanged)
        self.fetch_count = [0 if p == self.me else int(t.shape[0]) for p, t in enumerate(self.req)]
        cnt = torch.tensor(self.fetch_count, dtype=torch.long, device=dev)
        got = torch.empty_like(cnt)
        dist.all_to_all_single(got, cnt, group=group)
        self.serve_count = got.tolist()  # what each peer needs from me (0 for myself)
        send = torch.cat([t.flatten() for p, t in enumerate(self.req) if p != self.me] + [cnt.new_empty(0)])
        recv = cnt.new_empty(3 * sum(self.serve_count))
        dist.all_to_all_single(recv, send, [3 * c for c in self.serve_count], [3 * c for c in self.fetch_count], group=group)
        serve = recv.view(-1, 3)
        serve[:, 2] -= self.me * self.n_loc  # owner-local block
        self.serve = serve
        # compact index: global block -> compact position (monotone, so order is kept)
        kv_of_head = torch.arange(h, device=dev) // rep
        pos_q = self.pos[:, kv_of_head]  # [B, H, N]
        flat = idx.clamp(min=0).flatten(2)
        cidx = torch.gather(pos_q, 2, flat).view_as(idx).masked_fill(idx < 0, PAD)
        # valid by construction from a valid index: positions are monotone in the global block
        self.index = SparseIndex(
            cidx.to(torch.int32).contiguous(), index.kv_count, index.group_size, self.kvb,
            index.seq_len_q, self.units_max * self.kvb, self.mask, self.q_offset,
        )
        if index.verified:
            _mark_valid(self.index)
        self.union_density = (counts.float().mean(0) / n_total).tolist()
        mine = union[..., self.me * self.n_loc:(self.me + 1) * self.n_loc].sum(-1)
        remote = max(1, n_total - self.n_loc)
        self.remote_union_density = ((counts - mine).double().mean(0) / remote).tolist()

    def _masked_layout(self, index: SparseIndex, union: Tensor) -> Tensor:
        """Compact positions under a causal mask; returns the blocks to fetch.

        With shards that pass :meth:`CausalMask.check_shards`, another rank's chunk is either
        read by every local query or by none, and the local chunk is under the mask's local view
        (:meth:`CausalMask.local`). The compact buffer keeps one section per owner in rank order,
        each as long as its largest (batch, key head) share, the local chunk whole and in place,
        so one mask with one query offset holds for every (batch, head): causal with
        ``q_offset`` = the local section's first compact token; chunk-causal likewise, the local
        section moved to a multiple of the chunk by up to one chunk of zero padding; a local chunk
        inside one chunk reads the allowed sections whole (a chunk-causal mask whose one chunk
        ends with them). Units of a disallowed chunk (fillers of groups with fewer allowed units
        than K) keep a compact slot, zero, which the mask drops: they are never fetched.
        """
        mask, g, me, n_loc, kvb = index.mask, self.g, self.me, self.n_loc, self.kvb
        s = n_loc * kvb
        if index.q_offset != me * s:
            raise ValueError(
                f"the selection's queries start at token {index.q_offset}, but this rank's chunk {me} starts at "
                f"token {me * s}: select with q_offset= the chunk's first token (CPAttention.chunk_range)."
            )
        mask.check_shards(g * s, s)
        read = [p == me or mask.relation(me * s, me * s + s, p * s, p * s + s) == "full" for p in range(g)]
        union = union.clone()
        union[..., me * n_loc:(me + 1) * n_loc] = True  # the local chunk whole: the mask's local view holds
        seg = union.view(*union.shape[:2], g, n_loc)
        rank_in = seg.long().cumsum(-1) - 1
        sizes = seg.sum(-1).amax(dim=(0, 1)).tolist()  # per owner, its largest (batch, head) share
        local = mask.local(me * s, s)
        pad = 0
        if local is not None and local.kind == "chunk_causal":
            start = sum(sizes[:me])
            period = local.chunk_tokens // math.gcd(kvb, local.chunk_tokens)
            pad = -start % period  # local section on a chunk boundary (zero blocks, never listed)
        offs = torch.tensor([sum(sizes[:p]) + (pad if p >= me else 0) for p in range(g)], device=union.device)
        self.pos = (offs.view(g, 1) + rank_in).view_as(union)
        self.units_max = max(1, sum(sizes) + pad)
        start = int(offs[me]) * kvb
        if local is None:
            end = next((int(offs[p]) for p in range(g) if not read[p]), self.units_max) * kvb
            self.mask = None if end == self.units_max * kvb else CausalMask("chunk_causal", end)
        else:
            self.mask, self.q_offset = local, start
        return union & torch.tensor(read, device=union.device).repeat_interleave(n_loc)

    def _rows(self, x: Tensor, trip: Tensor) -> Tensor:
        """Blocks ``trip`` (b, head, owner-local block) of ``x [B, Hkv, s, D]`` -> ``[n, kvb, D]``."""
        b, hkv, s, d = x.shape
        return x.view(b, hkv, s // self.kvb, self.kvb, d)[trip[:, 0], trip[:, 1], trip[:, 2]]

    def _place(self, dst: Tensor, trip: Tensor, rows: Tensor) -> None:
        """Write rows of global blocks ``trip`` into the compact ``dst [B, Hkv, U*kvb, D]``."""
        b, hkv, _, d = dst.shape
        p = self.pos[trip[:, 0], trip[:, 1], trip[:, 2]]
        dst.view(b, hkv, self.units_max, self.kvb, d)[trip[:, 0], trip[:, 1], p] = rows

    def forward(self, kv: Tensor) -> Tensor:
        """``kv [B, Hkv, s, 2D]`` (keys and values side by side) -> compact ``[B, Hkv, U*kvb, 2D]``."""
        b, hkv, s, d2 = kv.shape
        out = kv.new_zeros(b, hkv, self.units_max * self.kvb, d2)
        serve = [self._rows(kv, t) for t in self.serve.split(self.serve_count)]
        got = _exchange_rows(serve, self.fetch_count, (self.kvb, d2), self.group, kv)
        for p, rows in enumerate(got):
            if rows.shape[0]:
                self._place(out, self.req[p], rows)
        self._place(out, self.req[self.me], self._rows(kv, self.local))
        return out

    def backward(self, dkv_c: Tensor, shape) -> Tensor:
        """Compact gradient -> gradient of this rank's ``kv`` (blocks fetched by peers come back)."""
        b, hkv, s, d2 = shape
        me = self.me
        dkv = torch.zeros(shape, dtype=dkv_c.dtype, device=dkv_c.device)
        view_c = dkv_c.view(b, hkv, self.units_max, self.kvb, d2)

        def compact_rows(trip):
            p = self.pos[trip[:, 0], trip[:, 1], trip[:, 2]]
            return view_c[trip[:, 0], trip[:, 1], p]

        send = [compact_rows(t) if p != me else dkv_c.new_empty(0, self.kvb, d2) for p, t in enumerate(self.req)]
        got = _exchange_rows(send, self.serve_count, (self.kvb, d2), self.group, dkv_c)
        blocks = dkv.view(b, hkv, s // self.kvb, self.kvb, d2)
        local = self.local
        blocks.index_put_((local[:, 0], local[:, 1], local[:, 2]), compact_rows(self.req[me]), accumulate=True)
        for t, rows in zip(self.serve.split(self.serve_count), got):
            if rows.shape[0]:
                blocks.index_put_((t[:, 0], t[:, 1], t[:, 2]), rows, accumulate=True)
        return dkv

    def stats(self, k: Tensor) -> ExchangeStats:
        elem = 2 * k.element_size() * self.kvb * k.shape[-1]  # one block of K and of V
        fetched = sum(self.fetch_count) * elem
        b, hkv, s, _ = k.shape
        allgather = (self.g - 1) * b * hkv * (s // self.kvb) * elem
        return ExchangeStats(fetched, allgather, self.union_density, self.remote_union_density)


def _local(trip: Tensor, me: int, n_loc: int) -> Tensor:
    t = trip.clone()
    t[:, 2] -= me * n_loc
    return t


def _exchange_rows(send: List[Tensor], recv_counts: List[int], row_shape, group, like: Tensor) -> List[Tensor]:
    row = int(torch.Size(row_shape).numel())
    flat = torch.cat([t.reshape(-1) for t in send]) if send else like.new_empty(0)
    recv = like.new_empty(sum(recv_counts) * row)
    dist.all_to_all_single(recv, flat.contiguous(), [c * row for c in recv_counts], [t.numel() for t in send], group=group)
    return [t.view(-1, *row_shape) for t in recv.split([c * row for c in recv_counts])]


class _SelectiveKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kv, plan: _KVPlan):
        ctx.plan, ctx.shape = plan, kv.shape
        return plan.forward(kv.contiguous())

    @staticmethod
    def backward(ctx, grad):
        return ctx.plan.backward(grad.contiguous(), ctx.shape), None


def selective_sparse_attention(
    q: Tensor, k: Tensor, v: Tensor, index: SparseIndex, scale: float, group, backend: str = "auto",
) -> Tuple[Tensor, Tensor, ExchangeStats]:
    """Sparse attention of local queries over key blocks selected on the whole sequence.

    Args:
        q: ``[B, H, s, D]`` this rank's queries (token chunk ``rank`` of ``group``).
        k, v: ``[B, H_kv, s, D]`` this rank's keys/values.
        index: selection for the local query groups over the *global* key blocks
            (``seq_len_kv = g * s``), e.g. from ``select_topk(q_lr, gather_sequence(k_lr))``.
            A causal ``index.mask`` is over the gathered sequence, with ``index.q_offset`` this
            chunk's first token (``select_topk(..., mask=, q_offset=rank * s)``); the compacted
            keys keep it exact (``_KVPlan._masked_layout``) and chunks of a disallowed rank are
            never fetched.

    Returns:
        ``out [B, H, s, D]``, fp32 ``lse [B, H, s]`` (differentiable w.r.t. q, k, v; dK/dV of
        fetched blocks go back to their owners) and the bytes the exchange moved.
    """
    index.ensure_valid()  # the exchange plan reads the index before any kernel; free if library-built
    g = dist.get_world_size(group)
    if index.seq_len_kv != g * k.shape[2]:
        raise ValueError(
            f"the selection covers {index.seq_len_kv} keys but the sequence group holds "
            f"{g} x {k.shape[2]}; select over the gathered low-rank keys."
        )
    with torch.no_grad():
        plan = _KVPlan(index, k.shape[1], k.shape[2], group)
    d = k.shape[-1]
    kv_c = _SelectiveKV.apply(torch.cat([k, v], dim=-1), plan)
    k_c, v_c = kv_c[..., :d], kv_c[..., d:]
    out, lse = sparse_attention(q, k_c, v_c, plan.index, scale, backend=backend)
    return out, lse, plan.stats(k)


__all__ = [
    "ring_attention", "selective_sparse_attention", "gather_sequence", "full_index", "ExchangeStats",
]
