"""Triton sparse attention over a SparseIndex: forward (out + LSE) and backward (dq, dk, dv).

Layout: q ``[B, H, S_q, D]``, k/v ``[B, H_kv, S_kv, D]`` (GQA when ``H_kv < H``). Query group g of
head h owns rows ``[g*G, (g+1)*G)`` and attends to the ``kv_count[b, h] * kv_block`` key tokens
listed (as key units) in ``kv_idx[b, h, g]``. Position p of a group's flattened token list maps to
token ``kv_idx[p // kv_block] * kv_block + p % kv_block``, so one loop serves token and block
granularity; for ``kv_block >= BLOCK_N`` every tile is one contiguous run of keys.

Forward: one program per (b, h, query tile of a group), FlashAttention-style online softmax in
base 2 over tiles of BLOCK_N keys: gathered per token, or, when ``kv_block % BLOCK_N == 0``, one
contiguous mask-free run per tile (8.94 ms vs 9.34 gathered, H100, S=64k, D=128, 90%). With G=64
every 64x64 pair block reloads 32 KB of K/V, 64 FLOP per byte. The H100 profile read the forward
as bound by L2 bandwidth (ncu: L2 throughput 72%, hit rate 91%, SM 41%); the H200 one (733493e: L2
69%, SM 47%, two programs of 4 warps per SM, 0.49 eligible warps per scheduler) shows L2 latency
left uncovered by too few tile buffers, which the forward's 5 stages at D=128 address (_forward).

Backward:
- ``delta = rowsum(dO * O) - dLSE`` (a small kernel, one pass over O and dO).
- dq: query-major, the forward's loop again (recompute P from the saved LSE).
- dk/dv, block granularity (``kv_block`` a multiple of 16): key-major. The index is transposed
  once per backward into per-key-unit lists of (query head, query group) entries (a stable sort
  of the ``[B, H_kv, H/H_kv * Gq * Kmax]`` unit ids), and one program per (b, h_kv, key tile)
  accumulates dk/dv in registers over its list: no atomics, deterministic. Key tiles narrower than
  64 keys with 64-row query tiles accumulate dK^T and dV^T instead (``TRANS``, see
  :func:`_dkdv_config`), so the key tile is never the row count of a matmul.
- dk/dv, token granularity (and small blocks): a key tile holds keys of unrelated groups, so no
  common query set exists to make a dense key-major tile; the dq program instead scatters its
  ``P^T dO`` and ``dS^T Q`` partial tiles with fp32 atomics into fp32 buffers (cast at the end).
  The same atomic path can be forced for blocks (``KernelOptions.force_atomic_dkdv``) to compare
  the two.

Causal masks (``index.mask``, ``ops/mask.py``): key ``j`` is allowed for query ``i`` iff
``j <= limit(i)`` (causal ``i``, chunk-causal ``(i // T + 1) * T - 1``), with ``limit``
non-decreasing. A masked index compiles a separate specialisation (``MASK`` constexpr 1 or 2); the
unmasked one (``MASK=0``) is the code above, unchanged. A group's key list ascends, so for one
query tile it splits into three runs: keys at or below the tile's first row's limit (every pair
allowed), keys up to its last row's limit (token-wise mask), and keys past it (filler units that a
group with fewer allowed units than K lists; never read). Two binary searches over the group's
units find the boundaries, then the query-major kernels run one mask-free loop and one masked
loop, as FlashAttention's causal kernels do, so fully allowed units pay nothing per tile. The
key-major dk/dv kernel does the same per key tile over its (head, group) list: groups whose last
row's limit is below the tile read none of it, groups whose first row's limit covers the tile
read all of it, each found by a binary search per query head sharing the key head.

Kernel variants (atomic paths, tiles, tensor-descriptor (TMA) loads, poisoned outputs for tests)
are chosen by a :class:`~megatron_dsv.ops.options.KernelOptions` passed down from the public
functions. With ``tma``, the launchers pass host-side ``TensorDescriptor`` s over the
``[rows, D]`` view of K/V (forward, dq) or Q/dO (dk/dv) in place of the pointers, under the same
parameter names, and a TMA constexpr picks the load; descriptors built on the host need no
``triton.set_allocator``, which in-kernel ones would (a process-wide setting).
"""


import math
import os
from typing import Tuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from megatron_dsv.ops.options import DEFAULT_OPTIONS, KernelOptions
from megatron_dsv.ops.sparse_index import SparseIndex

# Base-2 softmax: exp(x) = exp2(x * log2(e)); the LSE is stored in natural log (times ln 2).
# constexpr so kernels can read them (Triton admits only constexpr globals).
_LOG2E = tl.constexpr(1.4426950408889634)
_LN2 = tl.constexpr(0.6931471805599453)

# Block granularity: dq and dk/dv programs interleaved in one launch were tried and removed:
# 28.5 ms vs 24.5 ms for the two launches (H100, S=64k, D=128, 90%; 15.9 vs 13.3 ms at D=64).

# Under the CPU interpreter (numpy >= 2) a loaded scalar cannot bound a ``range`` loop, so loops
# whose trip count is read from memory run as ``while`` loops there; compiled code keeps ``for``
# loops, which Triton software-pipelines.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _new(shape, like: torch.Tensor, options: KernelOptions, dtype=None) -> torch.Tensor:
    t = torch.empty(shape, device=like.device, dtype=dtype or like.dtype)
    return t.fill_(float("nan")) if options.poison_outputs else t


@triton.jit
def _limit(pos, MASK: tl.constexpr, CHUNK, QOFF):
    """Last key token query row ``pos`` may read: MASK 1 causal, 2 chunk-causal (the last token
    of its chunk of ``CHUNK`` tokens); ``CausalMask.limit`` of key position ``pos + QOFF``
    (``SparseIndex.q_offset``)."""
    pos = pos + QOFF
    if MASK == 1:
        lim = pos
    else:
        lim = (pos // CHUNK + 1) * CHUNK - 1
    return lim


@triton.jit
def _first_reader(key, MASK: tl.constexpr, CHUNK, QOFF):
    """First query row whose limit reaches key token ``key`` (``limit`` is non-decreasing), at
    least 0: with a query offset a key below it is read by every row."""
    if MASK == 1:
        pos = key
    else:
        pos = key // CHUNK * CHUNK
    return tl.maximum(pos - QOFF, 0)


@triton.jit
def _lower_bound(p, lo, hi, target):
    """First position in ``[lo, hi)`` of the ascending array ``p`` whose value is ``>= target``
    (``hi`` if none); ``lo``/``hi`` int64 scalars."""
    while lo < hi:
        mid = (lo + hi) // 2
        below = tl.load(p + mid).to(tl.int64) < target
        lo = tl.where(below, mid + 1, lo)
        hi = tl.where(below, hi, mid)
    return lo


@triton.jit
def _mask_split(p_idx_row, n_units, o_first, o_last, MASK: tl.constexpr, CHUNK, QOFF, KVB: tl.constexpr, BLOCK_N: tl.constexpr):
    """List positions of query rows ``[o_first, o_last]`` under a mask: ``(n_free, n_end)``.

    Positions below ``n_free`` (whole BLOCK_N tiles) hold keys every row may read; positions from
    ``n_end`` on hold units past the last row's limit (read by no row); between them the
    token-wise mask applies. The group's units ascend, so each boundary is a binary search.
    """
    zero = n_units * 0
    u_free = _lower_bound(p_idx_row, zero, n_units, (_limit(o_first, MASK, CHUNK, QOFF) + 1) // KVB)
    u_end = _lower_bound(p_idx_row, u_free, n_units, _limit(o_last, MASK, CHUNK, QOFF) // KVB + 1)
    return u_free * KVB // BLOCK_N * BLOCK_N, u_end * KVB


@triton.jit
def _gather_tokens(p_idx_row, start, n_tok, KVB: tl.constexpr, BLOCK_N: tl.constexpr):
    """Token ids (int64) and validity of list positions ``[start, start + BLOCK_N)``."""
    o_p = start + tl.arange(0, BLOCK_N)
    m_p = o_p < n_tok
    if KVB == 1:
        o_tok = tl.load(p_idx_row + o_p, mask=m_p, other=0).to(tl.int64)
    else:
        b_unit = tl.load(p_idx_row + o_p // KVB, mask=m_p, other=0).to(tl.int64)
        o_tok = b_unit * KVB + (o_p % KVB)
    return o_tok, m_p


@triton.jit
def _kv_rows(p_idx_row, start, n_tok, KVB: tl.constexpr, BLOCK_N: tl.constexpr, CONTIG: tl.constexpr):
    """Token ids (int64) of list positions ``[start, start + BLOCK_N)`` and their validity.

    CONTIG (``KVB % BLOCK_N == 0``): the tile lies inside one key unit, so one scalar index load
    gives ``BLOCK_N`` consecutive rows the compiler knows are contiguous, and ``n_tok`` is a
    multiple of BLOCK_N, so every tile is full (callers skip the masks).
    """
    if CONTIG:
        b_unit = tl.load(p_idx_row + start // KVB).to(tl.int64)
        o_tok = b_unit * KVB + start % KVB + tl.arange(0, BLOCK_N)
        m_p = o_tok >= 0
    else:
        o_tok, m_p = _gather_tokens(p_idx_row, start, n_tok, KVB, BLOCK_N)
    return o_tok, m_p


@triton.jit
def _load_rows(x, o_rows, m_rows, o_d, m_d, D, FULL: tl.constexpr):
    """``x[o_rows, :D]`` as a ``[rows, BLOCK_D]`` tile; FULL: every row valid and BLOCK_D == D."""
    p = x + o_rows[:, None] * D + o_d[None, :]
    if FULL:
        b = tl.load(p)
    else:
        b = tl.load(p, mask=m_rows[:, None] & m_d[None, :], other=0.0)
    return b


@triton.jit
def _kv_tile(
    k, v, p_idx_row, start, n_tok, kv_base, o_d, m_d, D,
    KVB: tl.constexpr, BLOCK_N: tl.constexpr, CONTIG: tl.constexpr, EVEN_D: tl.constexpr, TMA: tl.constexpr,
):
    """K and V tiles of list positions ``[start, start + BLOCK_N)``, their token ids and validity.

    TMA (the launcher sets it only with CONTIG and EVEN_D): ``k``/``v`` are tensor descriptors
    over the ``[B * H_kv * S_kv, D]`` rows with ``[BLOCK_N, D]`` blocks, read at the tile's first
    row; descriptor coordinates are int32 (the launcher checks that the rows fit).
    """
    if TMA:
        t_first = tl.load(p_idx_row + start // KVB).to(tl.int64) * KVB + start % KVB
        o_tok = t_first + tl.arange(0, BLOCK_N)
        m_p = o_tok >= 0
        row = (kv_base + t_first).to(tl.int32)
        b_k = k.load([row, 0])
        b_v = v.load([row, 0])
    else:
        o_tok, m_p = _kv_rows(p_idx_row, start, n_tok, KVB, BLOCK_N, CONTIG)
        b_k = _load_rows(k, kv_base + o_tok, m_p, o_d, m_d, D, CONTIG and EVEN_D)
        b_v = _load_rows(v, kv_base + o_tok, m_p, o_d, m_d, D, CONTIG and EVEN_D)
    return b_k, b_v, o_tok, m_p


@triton.jit
def _fwd_tile(
    k, v, b_q, b_m, b_l, b_acc, p_idx_row, start, n_tok, kv_base, o_d, m_d, D, scale_log2, b_lim,
    KVB: tl.constexpr, BLOCK_N: tl.constexpr, CONTIG: tl.constexpr, EVEN_D: tl.constexpr, MASKED: tl.constexpr,
    TMA: tl.constexpr,
):
    """One online-softmax step over list positions ``[start, start + BLOCK_N)``; MASKED: keep
    key ``j`` for row ``i`` only if ``j <= b_lim[i]``. Every row keeps a key in the first tile it
    sees (the group's lowest unit, validated), so its running max is finite after it."""
    b_k, b_v, o_tok, m_p = _kv_tile(k, v, p_idx_row, start, n_tok, kv_base, o_d, m_d, D, KVB, BLOCK_N, CONTIG, EVEN_D, TMA)
    b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2
    if MASKED:
        b_s = tl.where(m_p[None, :] & (o_tok[None, :] <= b_lim[:, None]), b_s, float("-inf"))
    elif not CONTIG:
        b_s = tl.where(m_p[None, :], b_s, float("-inf"))
    b_m_new = tl.maximum(b_m, tl.max(b_s, axis=1))
    b_alpha = tl.exp2(b_m - b_m_new)
    b_p = tl.exp2(b_s - b_m_new[:, None])
    b_l = b_l * b_alpha + tl.sum(b_p, axis=1)
    b_acc = b_acc * b_alpha[:, None] + tl.dot(b_p.to(b_v.dtype), b_v)
    b_m = b_m_new
    return b_m, b_l, b_acc


@triton.jit
def _fwd_loop(
    k, v, b_q, b_m, b_l, b_acc, p_idx_row, lo, hi, n_tok, kv_base, o_d, m_d, D, scale_log2, b_lim,
    INTERPRET: tl.constexpr, KVB: tl.constexpr, BLOCK_N: tl.constexpr, CONTIG: tl.constexpr,
    EVEN_D: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
):
    """Online softmax over list positions ``[lo, hi)`` (``lo`` a multiple of BLOCK_N)."""
    if INTERPRET:
        start = lo
        while start < hi:
            b_m, b_l, b_acc = _fwd_tile(
                k, v, b_q, b_m, b_l, b_acc, p_idx_row, start, n_tok, kv_base, o_d, m_d, D, scale_log2, b_lim,
                KVB, BLOCK_N, CONTIG, EVEN_D, MASKED, TMA,
            )
            start += BLOCK_N
    else:
        # The token-masked tiles (a query tile's diagonal under causal, none inside a frame chunk)
        # are one or two per tile: not pipelined, so they add no buffers of their own. Pipelined,
        # the masked kernel held 147 KB of shared memory at 4 stages (one program per SM) against
        # 82 KB unmasked (ttgir for sm_90, D=128); now 82 KB too. Chunk-causal (chunks of 8192),
        # S=64k, D=128, H200: forward 41.6 ms against 66.7 at 90% of the allowed blocks, fwd+bwd
        # x6.15 cuDNN causal dense against x5.15 at 10% (455320b vs 9df742e). The dq kernel's
        # masked loop likewise (131 -> 98 KB); the dk/dv kernel's stays pipelined (99 KB at its 2
        # stages either way; unpipelined at key blocks of 32, where it accumulates dK^T/dV^T, a
        # masked GPU test hit an illegal memory access at 455320b, as that kernel did at 1 stage).
        for start in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASKED else None):
            b_m, b_l, b_acc = _fwd_tile(
                k, v, b_q, b_m, b_l, b_acc, p_idx_row, start, n_tok, kv_base, o_d, m_d, D, scale_log2, b_lim,
                KVB, BLOCK_N, CONTIG, EVEN_D, MASKED, TMA,
            )
    return b_m, b_l, b_acc


@triton.jit
def _fwd_kernel(
    q, k, v, o, lse, kv_idx, kv_count,
    scale_log2,
    H, HKV, S_Q, S_KV, NUM_GROUPS, K_MAX, D, STRIDE_OB, STRIDE_OH, STRIDE_OS, CHUNK, QOFF,
    G: tl.constexpr, INTERPRET: tl.constexpr, KVB: tl.constexpr, CONTIG: tl.constexpr, EVEN_D: tl.constexpr,
    MASK: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Out and LSE of query tile ``i_gm`` of ``(b, h)``; with TMA, ``k``/``v`` are the
    descriptors of :func:`_row_desc` (see :func:`_kv_tile`)."""
    i_gm = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    i_b = i_bh // H
    i_h = i_bh % H
    i_hkv = i_h // (H // HKV)
    n_mt: tl.constexpr = G // BLOCK_M
    i_g = i_gm // n_mt
    i_mt = i_gm % n_mt

    o_m = i_g * G + i_mt * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    p_q = q + (i_bh * S_Q + o_m[:, None]) * D + o_d[None, :]
    b_q = tl.load(p_q, mask=m_d[None, :], other=0.0)

    n_units = tl.load(kv_count + i_bh).to(tl.int64)
    n_tok = n_units * KVB
    p_idx_row = kv_idx + (i_bh * NUM_GROUPS + i_g) * K_MAX
    kv_base = (i_b * HKV + i_hkv) * S_KV

    b_m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    b_l = tl.zeros([BLOCK_M], dtype=tl.float32)
    b_acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if MASK:
        o_first = i_g * G + i_mt * BLOCK_M
        b_lim = _limit(o_m, MASK, CHUNK, QOFF)
        n_free, n_tok = _mask_split(p_idx_row, n_units, o_first, o_first + BLOCK_M - 1, MASK, CHUNK, QOFF, KVB, BLOCK_N)
        b_m, b_l, b_acc = _fwd_loop(
            k, v, b_q, b_m, b_l, b_acc, p_idx_row, 0, n_free, n_tok, kv_base, o_d, m_d, D, scale_log2, b_lim,
            INTERPRET, KVB, BLOCK_N, CONTIG, EVEN_D, False, TMA,
        )
        b_m, b_l, b_acc = _fwd_loop(
            k, v, b_q, b_m, b_l, b_acc, p_idx_row, n_free, n_tok, n_tok, kv_base, o_d, m_d, D, scale_log2, b_lim,
            INTERPRET, KVB, BLOCK_N, CONTIG, EVEN_D, True, TMA,
        )
    else:
        b_m, b_l, b_acc = _fwd_loop(
            k, v, b_q, b_m, b_l, b_acc, p_idx_row, 0, n_tok, n_tok, kv_base, o_d, m_d, D, scale_log2, o_m,
            INTERPRET, KVB, BLOCK_N, CONTIG, EVEN_D, False, TMA,
        )
    b_acc = b_acc / b_l[:, None]
    p_o = o + i_b * STRIDE_OB + i_h * STRIDE_OH + o_m[:, None] * STRIDE_OS + o_d[None, :]
    tl.store(p_o, b_acc.to(o.dtype.element_ty), mask=m_d[None, :])
    tl.store(lse + i_bh * S_Q + o_m, (b_m + tl.log2(b_l)) * _LN2)


@triton.jit
def _bwd_delta_kernel(
    o, do, dlse, delta, N_ROWS, D,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``delta = rowsum(O * dO) - dLSE`` in fp32 without fp32 copies of O and dO."""
    i_m = tl.program_id(0).to(tl.int64)
    o_m = i_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_m = o_m < N_ROWS
    o_d = tl.arange(0, BLOCK_D)
    m = m_m[:, None] & (o_d < D)[None, :]
    o_md = o_m[:, None] * D + o_d[None, :]
    b_o = tl.load(o + o_md, mask=m, other=0.0).to(tl.float32)
    b_do = tl.load(do + o_md, mask=m, other=0.0).to(tl.float32)
    b_delta = tl.sum(b_o * b_do, axis=1)
    if HAS_DLSE:
        b_delta -= tl.load(dlse + o_m, mask=m_m, other=0.0).to(tl.float32)
    tl.store(delta + o_m, b_delta, mask=m_m)


@triton.jit
def _bwd_dq_tile(
    k, v, dk32, dv32, b_q, b_do, b_lse2, b_delta, b_dq, p_idx_row, start, n_tok, kv_base,
    o_d, m_d, D, scale, scale_log2, b_lim,
    KVB: tl.constexpr, ATOMIC_KV: tl.constexpr, CONTIG: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_N: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
):
    """dq over list positions ``[start, start + BLOCK_N)``; optionally scatter dk/dv partials.
    MASKED: pairs with key ``j > b_lim[i]`` get ``P = 0`` (so ``dS = 0``)."""
    b_k, b_v, o_tok, m_p = _kv_tile(k, v, p_idx_row, start, n_tok, kv_base, o_d, m_d, D, KVB, BLOCK_N, CONTIG, EVEN_D, TMA)
    b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2
    b_p = tl.exp2(b_s - b_lse2[:, None])
    if MASKED:
        b_p = tl.where(m_p[None, :] & (o_tok[None, :] <= b_lim[:, None]), b_p, 0.0)
    elif not CONTIG:
        b_p = tl.where(m_p[None, :], b_p, 0.0)
    b_dp = tl.dot(b_do, tl.trans(b_v))
    b_ds = b_p * (b_dp - b_delta[:, None])
    b_dq += tl.dot(b_ds.to(b_k.dtype), b_k)
    if ATOMIC_KV:
        o_kv = (kv_base + o_tok[:, None]) * D + o_d[None, :]
        m_kv = m_p[:, None] & m_d[None, :]
        b_dv = tl.dot(tl.trans(b_p.to(b_do.dtype)), b_do)
        b_dk = tl.dot(tl.trans(b_ds.to(b_q.dtype)), b_q) * scale
        tl.atomic_add(dv32 + o_kv, b_dv, mask=m_kv, sem="relaxed")
        tl.atomic_add(dk32 + o_kv, b_dk, mask=m_kv, sem="relaxed")
    return b_dq


@triton.jit
def _bwd_dq_loop(
    k, v, dk32, dv32, b_q, b_do, b_lse2, b_delta, b_dq, p_idx_row, lo, hi, n_tok, kv_base,
    o_d, m_d, D, scale, scale_log2, b_lim,
    INTERPRET: tl.constexpr, KVB: tl.constexpr, ATOMIC_KV: tl.constexpr, CONTIG: tl.constexpr,
    EVEN_D: tl.constexpr, BLOCK_N: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
):
    """dq over list positions ``[lo, hi)`` (``lo`` a multiple of BLOCK_N)."""
    if INTERPRET:
        start = lo
        while start < hi:
            b_dq = _bwd_dq_tile(
                k, v, dk32, dv32, b_q, b_do, b_lse2, b_delta, b_dq, p_idx_row, start, n_tok, kv_base,
                o_d, m_d, D, scale, scale_log2, b_lim, KVB, ATOMIC_KV, CONTIG, EVEN_D, BLOCK_N, MASKED, TMA,
            )
            start += BLOCK_N
    else:  # the masked loop is not pipelined: see _fwd_loop
        for start in tl.range(lo, hi, BLOCK_N, num_stages=1 if MASKED else None):
            b_dq = _bwd_dq_tile(
                k, v, dk32, dv32, b_q, b_do, b_lse2, b_delta, b_dq, p_idx_row, start, n_tok, kv_base,
                o_d, m_d, D, scale, scale_log2, b_lim, KVB, ATOMIC_KV, CONTIG, EVEN_D, BLOCK_N, MASKED, TMA,
            )
    return b_dq


@triton.jit
def _bwd_dq_kernel(
    q, k, v, do, lse, delta, dq, dk32, dv32, kv_idx, kv_count,
    scale, scale_log2,
    H, HKV, S_Q, S_KV, NUM_GROUPS, K_MAX, D, CHUNK, QOFF,
    G: tl.constexpr, INTERPRET: tl.constexpr, KVB: tl.constexpr, ATOMIC_KV: tl.constexpr,
    CONTIG: tl.constexpr, EVEN_D: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _bwd_dq_program(
        tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64),
        q, k, v, do, lse, delta, dq, dk32, dv32, kv_idx, kv_count, scale, scale_log2,
        H, HKV, S_Q, S_KV, NUM_GROUPS, K_MAX, D, CHUNK, QOFF,
        G, INTERPRET, KVB, ATOMIC_KV, CONTIG, EVEN_D, MASK, TMA, BLOCK_M, BLOCK_N, BLOCK_D,
    )


@triton.jit
def _bwd_dq_program(
    i_gm, i_bh,
    q, k, v, do, lse, delta, dq, dk32, dv32, kv_idx, kv_count,
    scale, scale_log2,
    H, HKV, S_Q, S_KV, NUM_GROUPS, K_MAX, D, CHUNK, QOFF,
    G: tl.constexpr, INTERPRET: tl.constexpr, KVB: tl.constexpr, ATOMIC_KV: tl.constexpr,
    CONTIG: tl.constexpr, EVEN_D: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dq of query tile ``i_gm`` (of G / BLOCK_M per group) of ``(b, h) = i_bh``; with TMA,
    ``k``/``v`` are the descriptors of :func:`_row_desc` (see :func:`_kv_tile`)."""
    i_b = i_bh // H
    i_h = i_bh % H
    i_hkv = i_h // (H // HKV)
    n_mt: tl.constexpr = G // BLOCK_M
    i_g = i_gm // n_mt
    i_mt = i_gm % n_mt

    o_m = i_g * G + i_mt * BLOCK_M + tl.arange(0, BLOCK_M)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_qd = (i_bh * S_Q + o_m[:, None]) * D + o_d[None, :]
    b_q = tl.load(q + o_qd, mask=m_d[None, :], other=0.0)
    b_do = tl.load(do + o_qd, mask=m_d[None, :], other=0.0)
    b_lse2 = tl.load(lse + i_bh * S_Q + o_m) * _LOG2E
    b_delta = tl.load(delta + i_bh * S_Q + o_m)

    n_units = tl.load(kv_count + i_bh).to(tl.int64)
    n_tok = n_units * KVB
    p_idx_row = kv_idx + (i_bh * NUM_GROUPS + i_g) * K_MAX
    kv_base = (i_b * HKV + i_hkv) * S_KV

    b_dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    if MASK:
        o_first = i_g * G + i_mt * BLOCK_M
        b_lim = _limit(o_m, MASK, CHUNK, QOFF)
        n_free, n_tok = _mask_split(p_idx_row, n_units, o_first, o_first + BLOCK_M - 1, MASK, CHUNK, QOFF, KVB, BLOCK_N)
        b_dq = _bwd_dq_loop(
            k, v, dk32, dv32, b_q, b_do, b_lse2, b_delta, b_dq, p_idx_row, 0, n_free, n_tok, kv_base,
            o_d, m_d, D, scale, scale_log2, b_lim, INTERPRET, KVB, ATOMIC_KV, CONTIG, EVEN_D, BLOCK_N, False, TMA,
        )
        b_dq = _bwd_dq_loop(
            k, v, dk32, dv32, b_q, b_do, b_lse2, b_delta, b_dq, p_idx_row, n_free, n_tok, n_tok, kv_base,
            o_d, m_d, D, scale, scale_log2, b_lim, INTERPRET, KVB, ATOMIC_KV, CONTIG, EVEN_D, BLOCK_N, True, TMA,
        )
    else:
        b_dq = _bwd_dq_loop(
            k, v, dk32, dv32, b_q, b_do, b_lse2, b_delta, b_dq, p_idx_row, 0, n_tok, n_tok, kv_base,
            o_d, m_d, D, scale, scale_log2, o_m, INTERPRET, KVB, ATOMIC_KV, CONTIG, EVEN_D, BLOCK_N, False, TMA,
        )
    tl.store(dq + o_qd, (b_dq * scale).to(dq.dtype.element_ty), mask=m_d[None, :])


@triton.jit
def _bwd_dkdv_step(
    q, do, lse, delta, dq32, b_k, b_v, b_dk, b_dv, p_entry, it, i_b, i_hkv, H, HKV, S_Q,
    NUM_GROUPS, o_d, m_d, D, scale, scale_log2, o_n, CHUNK, QOFF,
    G: tl.constexpr, DQ_ATOMIC: tl.constexpr, EVEN_D: tl.constexpr, BLOCK_M: tl.constexpr,
    MASK: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr, TRANS: tl.constexpr,
):
    """Accumulate query tile ``it % (G / BLOCK_M)`` of list entry ``it // (G / BLOCK_M)`` into dk/dv.

    An entry is one (query head, query group) that selected this key tile (keys ``o_n``).
    MASKED: pairs with key ``j > limit(i)`` get ``P = 0`` (so ``dS = 0``). TMA (with EVEN_D):
    ``q``/``do`` are descriptors over the ``[B * H * S_q, D]`` rows with ``[BLOCK_M, D]`` blocks.
    TRANS: ``b_dk``/``b_dv`` are ``[BLOCK_D, BLOCK_N]`` (dK^T, dV^T) and the scores ``[BLOCK_M,
    BLOCK_N]``, so no matmul has the key tile as its row count (see :func:`_dkdv_config`).
    """
    n_mt: tl.constexpr = G // BLOCK_M
    rep = H // HKV
    entry = tl.load(p_entry + it // n_mt).to(tl.int64)
    i_h = i_hkv * rep + entry // NUM_GROUPS
    i_g = entry % NUM_GROUPS
    i_bh = i_b * H + i_h
    o_m = i_g * G + (it % n_mt) * BLOCK_M + tl.arange(0, BLOCK_M)
    o_qd = (i_bh * S_Q + o_m[:, None]) * D + o_d[None, :]
    if TMA:
        row = (i_bh * S_Q + i_g * G + (it % n_mt) * BLOCK_M).to(tl.int32)
        b_q = q.load([row, 0])
        b_do = do.load([row, 0])
    elif EVEN_D:
        b_q = tl.load(q + o_qd)
        b_do = tl.load(do + o_qd)
    else:
        b_q = tl.load(q + o_qd, mask=m_d[None, :], other=0.0)
        b_do = tl.load(do + o_qd, mask=m_d[None, :], other=0.0)
    b_lse2 = tl.load(lse + i_bh * S_Q + o_m) * _LOG2E
    b_delta = tl.load(delta + i_bh * S_Q + o_m)
    if TRANS:
        b_s = tl.dot(b_q, tl.trans(b_k)) * scale_log2
        b_p = tl.exp2(b_s - b_lse2[:, None])
        if MASKED:
            b_p = tl.where(o_n[None, :] <= _limit(o_m, MASK, CHUNK, QOFF)[:, None], b_p, 0.0)
        b_dv += tl.dot(tl.trans(b_do), b_p.to(b_do.dtype))
        b_dp = tl.dot(b_do, tl.trans(b_v))
        b_ds = b_p * (b_dp - b_delta[:, None])
        b_dk += tl.dot(tl.trans(b_q), b_ds.to(b_q.dtype))
        if DQ_ATOMIC:
            b_dq = tl.dot(b_ds.to(b_k.dtype), b_k) * scale
            tl.atomic_add(dq32 + o_qd, b_dq, mask=m_d[None, :], sem="relaxed")
    else:
        b_st = tl.dot(b_k, tl.trans(b_q)) * scale_log2
        b_pt = tl.exp2(b_st - b_lse2[None, :])
        if MASKED:
            b_pt = tl.where(o_n[:, None] <= _limit(o_m, MASK, CHUNK, QOFF)[None, :], b_pt, 0.0)
        b_dv += tl.dot(b_pt.to(b_do.dtype), b_do)
        b_dpt = tl.dot(b_v, tl.trans(b_do))
        b_dst = b_pt * (b_dpt - b_delta[None, :])
        b_dk += tl.dot(b_dst.to(b_q.dtype), b_q)
        if DQ_ATOMIC:
            b_dq = tl.dot(tl.trans(b_dst.to(b_k.dtype)), b_k) * scale
            tl.atomic_add(dq32 + o_qd, b_dq, mask=m_d[None, :], sem="relaxed")
    return b_dk, b_dv


@triton.jit
def _bwd_dkdv_loop(
    q, do, lse, delta, dq32, b_k, b_v, b_dk, b_dv, p_entry, lo, hi, i_b, i_hkv, H, HKV, S_Q,
    NUM_GROUPS, o_d, m_d, D, scale, scale_log2, o_n, CHUNK, QOFF,
    G: tl.constexpr, INTERPRET: tl.constexpr, DQ_ATOMIC: tl.constexpr, EVEN_D: tl.constexpr,
    BLOCK_M: tl.constexpr, MASK: tl.constexpr, MASKED: tl.constexpr, TMA: tl.constexpr,
    TRANS: tl.constexpr,
):
    """Steps ``[lo, hi)`` of the flat (entry, query tile) loop.

    One flat loop: Triton software-pipelines only innermost loops, and with BLOCK_M == G a nested
    per-entry loop has one trip, so the q/dO loads of the next entry would not overlap this
    entry's matmuls.
    """
    if INTERPRET:
        it = lo
        while it < hi:
            b_dk, b_dv = _bwd_dkdv_step(
                q, do, lse, delta, dq32, b_k, b_v, b_dk, b_dv, p_entry, it, i_b, i_hkv, H, HKV, S_Q,
                NUM_GROUPS, o_d, m_d, D, scale, scale_log2, o_n, CHUNK, QOFF, G, DQ_ATOMIC, EVEN_D, BLOCK_M, MASK, MASKED, TMA,
                TRANS,
            )
            it += 1
    else:
        for it in range(lo, hi):
            b_dk, b_dv = _bwd_dkdv_step(
                q, do, lse, delta, dq32, b_k, b_v, b_dk, b_dv, p_entry, it, i_b, i_hkv, H, HKV, S_Q,
                NUM_GROUPS, o_d, m_d, D, scale, scale_log2, o_n, CHUNK, QOFF, G, DQ_ATOMIC, EVEN_D, BLOCK_M, MASK, MASKED, TMA,
                TRANS,
            )
    return b_dk, b_dv


@triton.jit
def _bwd_dkdv_kernel(
    q, k, v, do, lse, delta, dq32, dk, dv, kt_off, kt_entry,
    scale, scale_log2,
    H, HKV, S_Q, S_KV, NUM_GROUPS, NUM_UNITS, N_ENTRY, D, CHUNK, QOFF,
    G: tl.constexpr, INTERPRET: tl.constexpr, KVB: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    EVEN_D: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr, TRANS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    _bwd_dkdv_program(
        tl.program_id(0).to(tl.int64), tl.program_id(1).to(tl.int64),
        q, k, v, do, lse, delta, dq32, dk, dv, kt_off, kt_entry, scale, scale_log2,
        H, HKV, S_Q, S_KV, NUM_GROUPS, NUM_UNITS, N_ENTRY, D, CHUNK, QOFF,
        G, INTERPRET, KVB, DQ_ATOMIC, EVEN_D, MASK, TMA, TRANS, BLOCK_M, BLOCK_N, BLOCK_D,
    )


@triton.jit
def _bwd_dkdv_program(
    i_un, i_bhkv,
    q, k, v, do, lse, delta, dq32, dk, dv, kt_off, kt_entry,
    scale, scale_log2,
    H, HKV, S_Q, S_KV, NUM_GROUPS, NUM_UNITS, N_ENTRY, D, CHUNK, QOFF,
    G: tl.constexpr, INTERPRET: tl.constexpr, KVB: tl.constexpr, DQ_ATOMIC: tl.constexpr,
    EVEN_D: tl.constexpr, MASK: tl.constexpr, TMA: tl.constexpr, TRANS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """dk/dv of key tile ``i_un`` (of KVB / BLOCK_N per unit) of ``(b, h_kv) = i_bhkv``; with TMA,
    ``q``/``do`` are the descriptors of :func:`_row_desc` (see :func:`_bwd_dkdv_step`)."""
    i_b = i_bhkv // HKV
    i_hkv = i_bhkv % HKV
    n_sub: tl.constexpr = KVB // BLOCK_N
    n_mt: tl.constexpr = G // BLOCK_M
    i_u = i_un // n_sub
    i_sub = i_un % n_sub

    o_n = i_u * KVB + i_sub * BLOCK_N + tl.arange(0, BLOCK_N)
    o_d = tl.arange(0, BLOCK_D)
    m_d = o_d < D
    o_kv = (i_bhkv * S_KV + o_n[:, None]) * D + o_d[None, :]
    b_k = tl.load(k + o_kv, mask=m_d[None, :], other=0.0)
    b_v = tl.load(v + o_kv, mask=m_d[None, :], other=0.0)

    p_off = kt_off + i_bhkv * (NUM_UNITS + 1) + i_u
    e_start = tl.load(p_off).to(tl.int64)
    e_end = tl.load(p_off + 1).to(tl.int64)
    p_entry = kt_entry + i_bhkv * N_ENTRY

    if TRANS:
        b_dk = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
        b_dv = tl.zeros([BLOCK_D, BLOCK_N], dtype=tl.float32)
    else:
        b_dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        b_dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if MASK:
        # Entries ascend by (query head, group), and within a head the groups' limits ascend:
        # per head, groups below g_read read none of this tile (filler units), groups from
        # g_free on read all of it, those between need the token-wise mask.
        g_read = _first_reader(i_u * KVB + i_sub * BLOCK_N, MASK, CHUNK, QOFF) // G
        g_free = (_first_reader(i_u * KVB + i_sub * BLOCK_N + BLOCK_N - 1, MASK, CHUNK, QOFF) + G - 1) // G
        e_head = e_start
        i_rep = e_start * 0  # a while loop: the interpreter cannot bound ``range`` by H // HKV
        while i_rep < H // HKV:
            e_read = _lower_bound(p_entry, e_head, e_end, i_rep * NUM_GROUPS + g_read)
            e_free = _lower_bound(p_entry, e_read, e_end, i_rep * NUM_GROUPS + g_free)
            e_head = _lower_bound(p_entry, e_free, e_end, (i_rep + 1) * NUM_GROUPS)
            b_dk, b_dv = _bwd_dkdv_loop(
                q, do, lse, delta, dq32, b_k, b_v, b_dk, b_dv, p_entry, e_read * n_mt, e_free * n_mt,
                i_b, i_hkv, H, HKV, S_Q, NUM_GROUPS, o_d, m_d, D, scale, scale_log2, o_n, CHUNK, QOFF,
                G, INTERPRET, DQ_ATOMIC, EVEN_D, BLOCK_M, MASK, True, TMA, TRANS,
            )
            b_dk, b_dv = _bwd_dkdv_loop(
                q, do, lse, delta, dq32, b_k, b_v, b_dk, b_dv, p_entry, e_free * n_mt, e_head * n_mt,
                i_b, i_hkv, H, HKV, S_Q, NUM_GROUPS, o_d, m_d, D, scale, scale_log2, o_n, CHUNK, QOFF,
                G, INTERPRET, DQ_ATOMIC, EVEN_D, BLOCK_M, MASK, False, TMA, TRANS,
            )
            i_rep += 1
    else:
        b_dk, b_dv = _bwd_dkdv_loop(
            q, do, lse, delta, dq32, b_k, b_v, b_dk, b_dv, p_entry, e_start * n_mt, e_end * n_mt,
            i_b, i_hkv, H, HKV, S_Q, NUM_GROUPS, o_d, m_d, D, scale, scale_log2, o_n, CHUNK, QOFF,
            G, INTERPRET, DQ_ATOMIC, EVEN_D, BLOCK_M, MASK, False, TMA, TRANS,
        )
    if TRANS:
        tl.store(dk + o_kv, tl.trans(b_dk * scale).to(dk.dtype.element_ty), mask=m_d[None, :])
        tl.store(dv + o_kv, tl.trans(b_dv).to(dv.dtype.element_ty), mask=m_d[None, :])
    else:
        tl.store(dk + o_kv, (b_dk * scale).to(dk.dtype.element_ty), mask=m_d[None, :])
        tl.store(dv + o_kv, b_dv.to(dv.dtype.element_ty), mask=m_d[None, :])


def _pow2_tile(n: int, cap: int) -> int:
    """Largest power of two <= cap that divides n (n a multiple of 16 gives >= 16)."""
    t = cap
    while t > 1 and n % t:
        t //= 2
    return t


def _tuned(kind: str, cfg: dict, options: KernelOptions) -> dict:
    cfg.update(options.tiles(kind))
    return cfg


def _fwd_config(g: int, d: int, dtype: torch.dtype, kvb: int, options: KernelOptions, masked: bool = False):
    block_m = _pow2_tile(g, 128 if d <= 64 else 64)
    block_n = 64 if d <= 128 else 32
    if dtype == torch.float32 or (kvb % block_n and kvb % 32 == 0 and (block_m >= 64 or masked)):
        # Key units of 32 (or 96, ...): 32-key tiles, each one contiguous run, instead of 64-key
        # tiles gathered per token, where the query tile has 64 rows. H200, S=64k, D=128, 90%,
        # kv_block 32: forward 8.55 ms at G=64 (c21a846, tma on) against 10.04 gathered (f8d3904),
        # but 24.08 against 20.90 at G=32, whose 32x32 score tiles are too small: G=32 keeps the
        # gathered tiles unless the index is masked (gathered tiles over partial units are refused,
        # masked_tile_problem).
        block_n = 32
    num_warps = 4 if block_m <= 64 else 8
    # Contiguous key blocks: 4 stages 8.81 ms vs 3 stages 8.94 ms (H100, S=64k, D=128, 90%); the
    # kernel is bound by L2 bandwidth (ncu: L2 72%, SM 41%), so deeper prefetch is what helps.
    num_stages = 4 if kvb % block_n == 0 and dtype != torch.float32 else 3
    return _tuned("fwd", dict(BLOCK_M=block_m, BLOCK_N=block_n, num_warps=num_warps, num_stages=num_stages), options)


def _dq_config(g: int, d: int, dtype: torch.dtype, kvb: int, options: KernelOptions) -> dict:
    # D=128: 32-key tiles for token gathers (57.5 ms bwd vs 81.0 with 64, S=64k, 90%), 64-key
    # tiles for contiguous key blocks (bwd 24.2 ms vs 24.7 with 32).
    block_n = 64 if d <= 64 or kvb % 64 == 0 else 32
    if dtype == torch.float32 or (kvb % block_n and kvb % 32 == 0):
        block_n = 32  # contiguous 32-key tiles for key units of 32 (see _fwd_config)
    return _tuned("dq", dict(BLOCK_M=_pow2_tile(g, 64), BLOCK_N=block_n, num_warps=4, num_stages=2), options)


def masked_tile_problem(index: SparseIndex, head_dim: int, dtype: torch.dtype, options: KernelOptions = DEFAULT_OPTIONS):
    """Why these kernels refuse a masked ``index``, or ``None`` if they run it.

    A masked index with ``1 < kv_block < BLOCK_N`` of the forward or the dq kernel (a key tile
    gathers several partial units) computes wrong values on an H200, while the CPU interpreter
    with the same tiles matches the reference (1.3e-6, S=2048): the forward at causal, kv_block
    16, G=32, D=64, bf16, BLOCK_N 64 (max error 4.1 vs 1.5e-2 for a bf16 PyTorch run); dq at
    token-causal, kv_block 16, G=32, D=32, fp32, BLOCK_N 32 (relative error 0.49-0.54 where the
    tolerance is 5e-3; the same test with a chunk-causal mask passed). Until the cause is found
    such cases are refused; kv_block 1 and kv_block >= both key tiles passed the same GPU tests.
    """
    if index.mask is None or index.kv_block == 1:
        return None
    tiles = {"forward": _fwd_config(index.group_size, head_dim, dtype, index.kv_block, options, masked=True)["BLOCK_N"],
             "dq": _dq_config(index.group_size, head_dim, dtype, index.kv_block, options)["BLOCK_N"]}
    small = {kernel: n for kernel, n in tiles.items() if index.kv_block < n}
    if not small:
        return None
    kernel, block_n = max(small.items(), key=lambda kv: kv[1])
    return (
        f"the Triton sparse attention does not run a {index.mask.kind} mask with kv_block "
        f"{index.kv_block} < its {kernel} key tile {block_n} (head dim {head_dim}, {dtype}): that case "
        f"gave wrong outputs on a GPU. Use a multiple of {block_n} (--dsv-kv-block), "
        f"kv_block 1 (Python API), or backend='reference'"
    )


def _check_masked_tiles(index: SparseIndex, q: torch.Tensor, options: KernelOptions) -> None:
    why = masked_tile_problem(index, q.shape[-1], q.dtype, options)
    if why is not None:
        raise ValueError(why + ".")


def _contig(kvb: int, block_n: int, options: KernelOptions) -> bool:
    return options.contig_loads and kvb % block_n == 0


def _kv_major_ok(index: SparseIndex, options: KernelOptions) -> bool:
    return index.kv_block % 16 == 0 and not options.force_atomic_dkdv


@triton.jit
def _kt_mark_kernel(
    kv_idx, mark, NUM_UNITS, N_ROWS, K_MAX,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``mark[bhkv, u, e] = 1`` for every unit u listed in row e (= h_rep * Gq + g) of ``kv_idx``.

    One ``[BLOCK_R, BLOCK_K >= K_MAX]`` tile per program: no loop, so the interpreter (which
    cannot bound ``range`` by a runtime argument) runs the same code.
    """
    i_r = tl.program_id(0).to(tl.int64)
    i_bhkv = tl.program_id(1).to(tl.int64)
    o_r = i_r * BLOCK_R + tl.arange(0, BLOCK_R)
    o_k = tl.arange(0, BLOCK_K)
    m = (o_r < N_ROWS)[:, None] & (o_k < K_MAX)[None, :]
    b_u = tl.load(kv_idx + (i_bhkv * N_ROWS + o_r[:, None]) * K_MAX + o_k[None, :], mask=m, other=-1).to(tl.int64)
    p = mark + (i_bhkv * NUM_UNITS + b_u) * N_ROWS + o_r[:, None]
    tl.store(p, tl.full([BLOCK_R, BLOCK_K], 1, dtype=tl.int8), mask=m & (b_u >= 0))


@triton.jit
def _kt_list_kernel(
    mark, offsets, entries, NUM_UNITS, N_ROWS, N_ENTRY,
    BLOCK_E: tl.constexpr,
):
    """Compact row ``mark[bhkv, u, :]`` into ``entries[bhkv, offsets[u]:]``, ascending."""
    i_u = tl.program_id(0).to(tl.int64)
    i_bhkv = tl.program_id(1).to(tl.int64)
    n = tl.load(offsets + i_bhkv * (NUM_UNITS + 1) + i_u)
    o_e = tl.arange(0, BLOCK_E)
    b_m = tl.load(mark + (i_bhkv * NUM_UNITS + i_u) * N_ROWS + o_e, mask=o_e < N_ROWS, other=0).to(tl.int32)
    pos = n + tl.cumsum(b_m, axis=0) - 1
    tl.store(entries + i_bhkv * N_ENTRY + pos, o_e.to(tl.int32), mask=b_m > 0)


def transpose_index(
    index: SparseIndex, num_kv_heads: int, options: KernelOptions = DEFAULT_OPTIONS
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Key-major lists: for each (b, h_kv, key unit) the (query head, query group) entries.

    Returns ``offsets int32 [B, H_kv, N_units + 1]`` and ``entries int32 [B, H_kv, E]`` with
    ``E = (H / H_kv) * Gq * Kmax``; entry ``e`` encodes ``h_rep * Gq + g``, and the entries of unit
    u are ``entries[..., offsets[u]:offsets[u + 1]]`` in ascending (head, group) order.

    A byte map ``[B, H_kv, N_units, rows]`` marked by one kernel and compacted row by row by
    another replaces a stable sort of the ``[B, H_kv, E]`` unit ids with its int64 permutation:
    the sort path took 0.29 ms per backward at H=16, S=64k, G=64, 90% (H100); the order of the
    lists, and so of the dk/dv sums, is the same. Above ``options.transpose_mark_max_bytes`` of
    byte map the sort path runs.
    """
    b, h, gq, kmax = index.kv_idx.shape
    rep = h // num_kv_heads
    n_units = index.num_kv_units
    n_rows = rep * gq
    dev = index.kv_idx.device
    block_e = triton.next_power_of_2(n_rows)
    block_k = triton.next_power_of_2(kmax)
    if b * num_kv_heads * n_units * n_rows > options.transpose_mark_max_bytes or block_e > 16384 or block_k > 4096:
        return _transpose_index_sort(index, num_kv_heads)
    kv_idx = index.kv_idx.contiguous()
    mark = torch.zeros((b * num_kv_heads, n_units, n_rows), device=dev, dtype=torch.int8)
    block_r = max(1, 4096 // block_k)
    _kt_mark_kernel[(triton.cdiv(n_rows, block_r), b * num_kv_heads)](
        kv_idx, mark, n_units, n_rows, kmax, BLOCK_R=block_r, BLOCK_K=block_k,
    )
    offsets = torch.zeros((b, num_kv_heads, n_units + 1), device=dev, dtype=torch.int32)
    offsets[..., 1:] = mark.sum(-1, dtype=torch.int32).view(b, num_kv_heads, n_units).cumsum(-1, dtype=torch.int32)
    n_entry = n_rows * kmax
    entries = torch.empty((b, num_kv_heads, n_entry), device=dev, dtype=torch.int32)
    _kt_list_kernel[(n_units, b * num_kv_heads)](
        mark, offsets, entries, n_units, n_rows, n_entry, BLOCK_E=block_e, num_warps=4 if block_e <= 2048 else 8,
    )
    return offsets, entries


def _transpose_index_sort(index: SparseIndex, num_kv_heads: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`transpose_index` by a stable sort (no byte map; for very long sequences)."""
    b, h, gq, kmax = index.kv_idx.shape
    rep = h // num_kv_heads
    n_units = index.num_kv_units
    units = index.kv_idx.reshape(b, num_kv_heads, rep * gq * kmax)
    key = torch.where(units >= 0, units, torch.full_like(units, n_units))
    sorted_key, perm = torch.sort(key, dim=-1, stable=True)
    entries = (perm // kmax).to(torch.int32)
    bounds = torch.arange(n_units + 1, device=units.device, dtype=sorted_key.dtype)
    bounds = bounds.view(1, 1, -1).expand(b, num_kv_heads, -1).contiguous()
    offsets = torch.searchsorted(sorted_key.contiguous(), bounds).to(torch.int32)
    return offsets.contiguous(), entries.contiguous()


def _mask_args(index: SparseIndex) -> Tuple[int, int, int]:
    """``(MASK, CHUNK, QOFF)`` kernel arguments: 0 unmasked, 1 causal, 2 chunk-causal of CHUNK
    tokens; QOFF the key position of query row 0 (``index.q_offset``)."""
    if index.mask is None:
        return 0, 1, 0
    if index.mask.kind == "causal":
        return 1, 1, index.q_offset
    return 2, index.mask.chunk_tokens, index.q_offset


def _tma_head_dim(d: int) -> bool:
    """Head dims the descriptor loads serve: a power of two (a tile is whole rows) of at most 256
    (the largest TMA box dimension)."""
    return triton.next_power_of_2(d) == d and d <= 256


def _desc_problem(x: torch.Tensor, name: str):
    """Why a row descriptor cannot address contiguous ``x [..., D]`` seen as ``[rows, D]``, or None:
    descriptor coordinates are int32, and TMA needs a 16-byte aligned base and row stride."""
    d = x.shape[-1]
    rows = x.numel() // d
    if rows >= 2**31:
        return (f"{name} has {rows} rows of {d}, more than the 2^31 - 1 that int32 descriptor coordinates "
                f"address; use tma=False.")
    if x.data_ptr() % 16 or (d * x.element_size()) % 16:
        return (f"{name} must start at a 16-byte aligned address with rows of a multiple of 16 bytes "
                f"(address % 16 = {x.data_ptr() % 16}, row {d * x.element_size()} bytes); pass a fresh "
                f"tensor (.clone()) or use tma=False.")
    return None


def _row_desc(x: torch.Tensor, block_rows: int, name: str) -> TensorDescriptor:
    """Tensor descriptor over the rows of contiguous ``x [..., D]`` seen as ``[rows, D]``, with
    ``[block_rows, D]`` blocks (``KernelOptions.tma``); raises where :func:`_desc_problem` says why
    it cannot."""
    why = _desc_problem(x, name)
    if why is not None:
        raise ValueError(f"KernelOptions(tma=True): {why}")
    d = x.shape[-1]
    return TensorDescriptor(x, [x.numel() // d, d], [d, 1], [block_rows, d])


def _tma_wanted(options: KernelOptions, *xs: torch.Tensor) -> bool:
    """``KernelOptions.tma`` for these tensors: as given when set; ``None`` (auto): compiled
    kernels on a GPU of compute capability >= 9.0 (TMA hardware) where every tensor passes
    :func:`_desc_problem`, so auto never meets the refusal of :func:`_row_desc`."""
    if options.tma is not None:
        return options.tma
    x = xs[0]
    if _INTERPRET or not x.is_cuda or torch.cuda.get_device_capability(x.device)[0] < 9:
        return False
    return all(_desc_problem(t, "") is None for t in xs)


def _tma_pair(a: torch.Tensor, b: torch.Tensor, names: str, block_rows: int, on: bool):
    """``(a, b)`` as row descriptors when ``on``, else as they are (the kernels' pointer path)."""
    if not on:
        return a, b
    name_a, name_b = names.split("/")
    return _row_desc(a, block_rows, name_a), _row_desc(b, block_rows, name_b)


def _forward(q, k, v, index: SparseIndex, scale, options: KernelOptions, out_sbhd: bool = False):
    b, h, s_q, d = q.shape
    hkv, s_kv = k.shape[1], k.shape[2]
    kv_idx, kv_count = index.kv_idx.contiguous(), index.kv_count.contiguous()
    g, kvb = index.group_size, index.kv_block
    gq, kmax = kv_idx.shape[2], kv_idx.shape[3]
    mask, chunk, q_off = _mask_args(index)
    cfg = _fwd_config(g, d, q.dtype, kvb, options, masked=index.mask is not None)
    contig = _contig(kvb, cfg["BLOCK_N"], options)
    tma = contig and _tma_head_dim(d) and _tma_wanted(options, k, v)
    if tma and d == 128 and cfg["BLOCK_N"] == 64 and "num_stages" not in options.tiles("fwd"):
        # Triton 3.6 gives the descriptor loads two buffers at 2-4 stages and issues a tile's load
        # after the previous tile's last dot, so the L2 latency shows every iteration (ncu, H200,
        # 733493e: SM 47%, 0.49 eligible warps per scheduler); 5 stages give three buffers, the
        # next-but-one tile in flight, 115 KB of shared memory, still two programs per SM.
        # S=64k, 64x64 blocks, H200: 7.37 ms vs 8.44 at 90% (abcb795); chunk-causal (chunks of
        # 8192) 37.4 vs 42.0 ms at 90% of the allowed blocks, 4.51 vs 4.97 at 10% (1bf8843; the
        # masked loop is not pipelined, see _fwd_loop). At D=64 (4.48 vs 4.45 ms) four programs
        # per SM already hide the latency.
        cfg["num_stages"] = 5
    k_in, v_in = _tma_pair(k, v, "k/v", cfg["BLOCK_N"], tma)
    # out_sbhd: write [S, B, H, D] memory (returned as its [B, H, S, D] view) so Megatron's
    # [s, b, h*d] output is a free view: the layer then keeps one copy of the output, not two
    # (256 MiB per layer at 64k tokens x 16 heads x 128, bf16).
    out = _new((s_q, b, h, d), q, options).permute(1, 2, 0, 3) if out_sbhd else _new(q.shape, q, options)
    lse = _new((b, h, s_q), q, options, torch.float32)
    grid = (gq * (g // cfg["BLOCK_M"]), b * h)
    _fwd_kernel[grid](
        q, k_in, v_in, out, lse, kv_idx, kv_count, scale * _LOG2E.value,
        h, hkv, s_q, s_kv, gq, kmax, d, out.stride(0), out.stride(1), out.stride(2), chunk, q_off,
        G=g, INTERPRET=_INTERPRET, KVB=kvb, CONTIG=contig,
        EVEN_D=triton.next_power_of_2(d) == d, MASK=mask, TMA=tma, BLOCK_D=triton.next_power_of_2(d), **cfg,
    )
    return out, lse


def _backward(q, k, v, out, lse, do, dlse, index: SparseIndex, scale, options: KernelOptions):
    b, h, s_q, d = q.shape
    hkv, s_kv = k.shape[1], k.shape[2]
    g, kvb = index.group_size, index.kv_block
    kv_major = _kv_major_ok(index, options)
    fused = kv_major and options.fused_dq_atomic
    cfg = _dq_config(g, d, q.dtype, kvb, options)
    contig = _contig(kvb, cfg["BLOCK_N"], options)
    dq_tma = contig and _tma_head_dim(d) and not fused and _tma_wanted(options, k, v)
    if dq_tma and "num_stages" not in options.tiles("dq"):
        # descriptor loads prefetch deeper: dq 8.64 ms at 3 stages vs 9.21 at 2 (H200, S=64k,
        # D=128, 90%, 64x64 blocks, 283790d; 8.77 vs 9.13 in the sweep of 487e6f3); D=64 4.01 vs
        # 4.05. Pointer loads gain nothing from it (10.05 vs 9.97 ms).
        cfg["num_stages"] = 3
    # descriptors before any kernel runs, so an input they refuse fails first
    k_in, v_in = _tma_pair(k, v, "k/v", cfg["BLOCK_N"], dq_tma)
    dkdv_cfg = _dkdv_config(g, kvb, options) if kv_major else None
    q_in, do_in = (_tma_pair(q, do, "q/do", dkdv_cfg["BLOCK_M"], _tma_head_dim(d) and _tma_wanted(options, q, do))
                   if kv_major else (q, do))
    # d lse_i / d s_ij = p_ij, so an LSE gradient (context-parallel merges) only shifts delta.
    n_rows = out.numel() // out.shape[-1]
    delta = torch.empty(out.shape[:-1], device=out.device, dtype=torch.float32)
    block_m = 64
    _bwd_delta_kernel[(triton.cdiv(n_rows, block_m),)](
        out, do, dlse.contiguous() if dlse is not None else delta, delta, n_rows, out.shape[-1],
        HAS_DLSE=dlse is not None, BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(out.shape[-1]),
    )
    if fused:
        dq32 = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
        dq32, dk, dv = _backward_kv_major(
            q, k, v, do, lse, delta, dq32, index, scale, options, True, q_in, do_in, dkdv_cfg,
        )
        return dq32.to(q.dtype), dk, dv
    kv_idx, kv_count = index.kv_idx.contiguous(), index.kv_count.contiguous()
    gq, kmax = kv_idx.shape[2], kv_idx.shape[3]
    dq = _new(q.shape, q, options)
    if kv_major:
        dk32 = dv32 = dq  # unused placeholders
    else:
        dk32 = torch.zeros(k.shape, device=k.device, dtype=torch.float32)
        dv32 = torch.zeros(v.shape, device=v.device, dtype=torch.float32)
    grid = (gq * (g // cfg["BLOCK_M"]), b * h)
    mask, chunk, q_off = _mask_args(index)
    _bwd_dq_kernel[grid](
        q, k_in, v_in, do, lse, delta, dq, dk32, dv32, kv_idx, kv_count, scale, scale * _LOG2E.value,
        h, hkv, s_q, s_kv, gq, kmax, d, chunk, q_off,
        G=g, INTERPRET=_INTERPRET, KVB=kvb, ATOMIC_KV=not kv_major, CONTIG=contig,
        EVEN_D=triton.next_power_of_2(d) == d, MASK=mask, TMA=dq_tma, BLOCK_D=triton.next_power_of_2(d), **cfg,
    )
    if not kv_major:
        return dq, dk32.to(k.dtype), dv32.to(v.dtype)
    return _backward_kv_major(q, k, v, do, lse, delta, dq, index, scale, options, False, q_in, do_in, dkdv_cfg)


def _backward_kv_major(
    q, k, v, do, lse, delta, dq, index: SparseIndex, scale, options: KernelOptions, dq_atomic: bool, q_in, do_in,
    cfg: dict,
):
    """dk/dv key-major; with ``dq_atomic`` also adds dq into the fp32 ``dq`` with atomics.
    ``q_in``/``do_in``: q and do, or their row descriptors (``KernelOptions.tma``); ``cfg``: the
    launch configuration of :func:`_dkdv_config`."""
    b, h, s_q, d = q.shape
    hkv, s_kv = k.shape[1], k.shape[2]
    g, kvb, gq = index.group_size, index.kv_block, index.num_groups
    offsets, entries = transpose_index(index, hkv, options)
    dk = _new(k.shape, k, options)
    dv = _new(v.shape, v, options)
    n_units = index.num_kv_units
    grid = (n_units * (kvb // cfg["BLOCK_N"]), b * hkv)
    mask, chunk, q_off = _mask_args(index)
    _bwd_dkdv_kernel[grid](
        q_in, k, v, do_in, lse, delta, dq, dk, dv, offsets, entries, scale, scale * _LOG2E.value,
        h, hkv, s_q, s_kv, gq, n_units, entries.shape[-1], d, chunk, q_off,
        G=g, INTERPRET=_INTERPRET, KVB=kvb, DQ_ATOMIC=dq_atomic, EVEN_D=triton.next_power_of_2(d) == d,
        MASK=mask, TMA=isinstance(q_in, TensorDescriptor),
        BLOCK_D=triton.next_power_of_2(d), **cfg,
    )
    return dq, dk, dv


def _dkdv_config(g: int, kvb: int, options: KernelOptions) -> dict:
    cfg = _tuned(
        "dkdv", dict(BLOCK_M=_pow2_tile(g, 64), BLOCK_N=_pow2_tile(kvb, 64), num_warps=4, num_stages=2), options
    )
    # Key tiles narrower than 64 (key units of 16 or 32): with the key tile as the row count of
    # S^T, dP^T, dK and dV, Hopper's warp-group MMA (64 rows per warp group of 4 warps) does not
    # apply and Triton lowers the four matmuls to mma.sync; transposed, their rows are the query
    # tile and the head dim, which pays where the query tile has 64 rows. H200, S=64k, D=128, 90%
    # (c21a846): dk/dv 22.7 ms transposed vs 29.7 at kv_block 32, G=64; the backward 41.1 vs 51.6
    # ms at kv_block 16, G=64; but at G=32 (32-row query tiles) 73.4 vs 59.8 (kv_block 32) and 89.9
    # vs 72.0 ms (kv_block 16), so those keep the keys as rows.
    trans = options.dkdv_transposed
    cfg["TRANS"] = (cfg["BLOCK_N"] < 64 <= cfg["BLOCK_M"]) if trans is None else trans
    return cfg


def _check_dkdv_tiles(index: SparseIndex, options: KernelOptions) -> None:
    """Refuse, before any kernel runs, a dk/dv tuning that crashed: where the key-major dk/dv kernel
    runs (:func:`_kv_major_ok`) transposed at one pipeline stage."""
    if not _kv_major_ok(index, options):
        return
    cfg = _dkdv_config(index.group_size, index.kv_block, options)
    if cfg["TRANS"] and cfg["num_stages"] < 2:
        raise ValueError(
            f"KernelOptions: the transposed dk/dv kernel (dkdv_transposed, on for key tiles of "
            f"{cfg['BLOCK_N']} with query tiles of {cfg['BLOCK_M']}) at num_stages "
            f"{cfg['num_stages']} hit an illegal memory access on an H200 (kv_block 32, G=64, "
            f"D=128, c21a846); tune dkdv num_stages >= 2 or set dkdv_transposed=False."
        )


class _SparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index: SparseIndex, scale: float, out_sbhd: bool, options: KernelOptions):
        q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
        out, lse = _forward(q, k, v, index, scale, options, out_sbhd)
        ctx.save_for_backward(q, k, v, out, lse)
        # Unused outputs (usually lse) get None instead of a zero-filled gradient: no [B, H, S]
        # fp32 fill and no dLSE read in the delta kernel.
        ctx.set_materialize_grads(False)
        ctx.index = index
        ctx.scale = scale
        ctx.options = options
        return out, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(out)
        # the delta kernel reads O row-major: a transient copy when O was written [S, B, H, D]
        dq, dk, dv = _backward(q, k, v, out.contiguous(), lse, do.contiguous(), dlse, ctx.index, ctx.scale, ctx.options)
        return dq, dk, dv, None, None, None, None


def sparse_attention_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, scale: float, out_sbhd: bool = False,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Triton sparse attention; shapes as :func:`megatron_dsv.ops.sparse_attention.sparse_attention`.

    ``q [B, H, S_q, D]``, ``k, v [B, H_kv, S_kv, D]`` -> ``out [B, H, S_q, D]`` (q's dtype),
    ``lse [B, H, S_q]`` fp32. Gradients flow from ``out`` and ``lse`` (context-parallel merges
    use it) to q, k and v.
    """
    _check_group(index)
    _check_masked_tiles(index, q, options)
    _check_dkdv_tiles(index, options)
    if scale is None:
        scale = 1.0 / math.sqrt(q.shape[-1])
    return _SparseAttention.apply(q, k, v, index, float(scale), bool(out_sbhd), options)


def _check_group(index: SparseIndex) -> None:
    if index.group_size % 16 != 0:
        raise ValueError(
            f"the Triton sparse attention needs a query group size that is a multiple of 16, got "
            f"{index.group_size}; use --dsv-query-group with 16, 32, 64, ... queries or the reference backend."
        )


def sparse_attention_triton_fwd(
    q, k, v, index: SparseIndex, scale: float, options: KernelOptions = DEFAULT_OPTIONS
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward without autograd: ``out`` (q's dtype), fp32 ``lse``."""
    _check_group(index)
    _check_masked_tiles(index, q, options)
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    return _forward(q, k, v, index, float(scale), options)


def sparse_attention_triton_bwd(q, k, v, out, lse, do, index: SparseIndex, scale: float, options: KernelOptions = DEFAULT_OPTIONS):
    """dq (fp32), dk, dv (k's dtype) of the pairs in ``index`` given the final ``out``/``lse``."""
    _check_group(index)
    _check_masked_tiles(index, q, options)
    _check_dkdv_tiles(index, options)
    q, k, v, out, do = (t.contiguous() for t in (q, k, v, out, do))
    dq, dk, dv = _backward(q, k, v, out, lse.contiguous(), do, None, index, float(scale), options)
    return dq.float(), dk, dv


__all__ = ["masked_tile_problem", "sparse_attention_triton", "sparse_attention_triton_fwd", "sparse_attention_triton_bwd", "transpose_index"]
