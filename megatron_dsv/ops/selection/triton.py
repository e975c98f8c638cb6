"""Triton top-K selection of critical key units from low-rank projections.

Scores ``s[g, j] = proxy_g . unit_j`` (proxy: mean low-rank query of group g; unit: mean low-rank
key of key unit j, see ``naive.py``) are never written to memory. One program owns BLOCK_G query
groups of one (b, h) and streams over the key units several times, recomputing each score tile
(r = 16: 32 FLOPs per score, cheaper than storing it):

1. min/max pass: the bracket ``lo = min_j s``, ``hi > max_j s``, so ``#{s >= lo} >= K > #{s >= hi}``.
2. search passes: count ``#{s >= t}`` for T thresholds spread over ``(lo, hi)`` at once and shrink
   the bracket to the neighbouring thresholds that keep the invariant. A group is done when
   ``#{s >= lo} == K`` (the K-th largest score is then the only one left in the bracket); on
   tie-free inputs this takes about ``log_{T+1}(N)`` passes, and MAX_PASSES bounds it for ties.
3. select pass: keep every unit with ``s >= hi`` and, in memory order, the first
   ``K - #{s >= hi}`` units with ``lo <= s < hi`` (ties and a bracket that could not shrink are
   broken by position), writing positions with a running prefix sum: ascending indices, no sort.

The result equals the reference (``torch.topk`` on the same fp32 scores) up to ties.
"""


import os

import torch
import triton
import triton.language as tl

from megatron_dsv.ops.selection.naive import group_proxies, pool_keys
from megatron_dsv.ops.sparse_index import SparseIndex

# Under the CPU interpreter (numpy >= 2) a runtime scalar cannot bound a ``range`` loop, so loop
# bounds there come from a constexpr copy (N_STATIC) written inline in the ``range`` call; compiled
# code keeps the runtime N so one binary serves every sequence length.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# Tests set this to fill fresh outputs with a sentinel, so an unwritten element fails.
_POISON_OUTPUTS = False


@triton.jit
def _score_tile(p_units, b_p, start, N, R, o_r, m_r, BLOCK_N: tl.constexpr):
    """fp32 scores ``[BLOCK_G, BLOCK_N]`` of units ``[start, start + BLOCK_N)``; -inf past N."""
    o_n = start + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_u = tl.load(p_units + o_n[:, None] * R + o_r[None, :], mask=m_n[:, None] & m_r[None, :], other=0.0)
    b_s = tl.dot(b_p, tl.trans(b_u), input_precision="ieee")
    return tl.where(m_n[None, :], b_s, float("-inf")), o_n


@triton.jit
def _select_kernel(
    proxy, units, kv_count, kv_idx,
    NUM_GROUPS, N, R, K_MAX,
    N_STATIC: tl.constexpr, INTERPRET: tl.constexpr, T: tl.constexpr, MAX_PASSES: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    i_gt = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    o_g = i_gt * BLOCK_G + tl.arange(0, BLOCK_G)
    m_g = o_g < NUM_GROUPS
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    b_p = tl.load(
        proxy + (i_bh * NUM_GROUPS + o_g[:, None]) * R + o_r[None, :],
        mask=m_g[:, None] & m_r[None, :], other=0.0,
    )
    p_units = units + i_bh * N * R
    k_sel = tl.load(kv_count + i_bh)

    # 1. bracket
    b_min = tl.full([BLOCK_G], float("inf"), dtype=tl.float32)
    b_max = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    for start in range(0, N_STATIC if INTERPRET else N, BLOCK_N):
        b_s, o_n = _score_tile(p_units, b_p, start, N, R, o_r, m_r, BLOCK_N)
        b_max = tl.maximum(b_max, tl.max(b_s, axis=1))
        b_min = tl.minimum(b_min, tl.min(tl.where(b_s == float("-inf"), float("inf"), b_s), axis=1))
    b_lo = b_min
    b_hi = b_max + (b_max - b_min) * 1e-3 + tl.abs(b_max) * 1e-6 + 1e-30
    c_lo = tl.zeros([BLOCK_G], dtype=tl.int32) + N
    c_hi = tl.zeros([BLOCK_G], dtype=tl.int32)

    # 2. search
    o_t = tl.arange(0, T)
    frac = (o_t + 1).to(tl.float32) / (T + 1)
    n_todo = tl.sum((m_g & (c_lo != k_sel)).to(tl.int32), axis=0)
    i_pass = tl.full([], 0, dtype=tl.int32)
    while (n_todo > 0) & (i_pass < MAX_PASSES):
        b_thr = b_lo[:, None] + (b_hi - b_lo)[:, None] * frac[None, :]
        b_cnt = tl.zeros([BLOCK_G, T], dtype=tl.int32)
        for start in range(0, N_STATIC if INTERPRET else N, BLOCK_N):
            b_s, o_n = _score_tile(p_units, b_p, start, N, R, o_r, m_r, BLOCK_N)
            b_cnt += tl.sum((b_s[:, None, :] >= b_thr[:, :, None]).to(tl.int32), axis=2)
        m_in = b_cnt >= k_sel
        todo = c_lo != k_sel
        new_lo = tl.max(tl.where(m_in, b_thr, float("-inf")), axis=1)
        new_c_lo = tl.min(tl.where(m_in, b_cnt, N + 1), axis=1)
        upd_lo = todo & (new_lo > b_lo)
        b_lo = tl.where(upd_lo, new_lo, b_lo)
        c_lo = tl.where(upd_lo, new_c_lo, c_lo)
        new_hi = tl.min(tl.where(m_in, float("inf"), b_thr), axis=1)
        new_c_hi = tl.max(tl.where(m_in, -1, b_cnt), axis=1)
        upd_hi = todo & (new_hi < b_hi)
        b_hi = tl.where(upd_hi, new_hi, b_hi)
        c_hi = tl.where(upd_hi, new_c_hi, c_hi)
        n_todo = tl.sum((m_g & (c_lo != k_sel)).to(tl.int32), axis=0)
        i_pass += 1

    # 3. select, in memory order
    need = k_sel - c_hi
    n_sel = tl.zeros([BLOCK_G], dtype=tl.int32)
    n_mid = tl.zeros([BLOCK_G], dtype=tl.int32)
    p_out = kv_idx + (i_bh * NUM_GROUPS + o_g) * K_MAX
    for start in range(0, N_STATIC if INTERPRET else N, BLOCK_N):
        b_s, o_n = _score_tile(p_units, b_p, start, N, R, o_r, m_r, BLOCK_N)
        m_hi = b_s >= b_hi[:, None]
        m_mid = (b_s >= b_lo[:, None]) & (b_s < b_hi[:, None])
        mid_rank = n_mid[:, None] + tl.cumsum(m_mid.to(tl.int32), axis=1) - 1
        m_sel = m_hi | (m_mid & (mid_rank < need[:, None]))
        pos = n_sel[:, None] + tl.cumsum(m_sel.to(tl.int32), axis=1) - 1
        tl.store(p_out[:, None] + pos, o_n[None, :].to(tl.int32), mask=m_sel & m_g[:, None])
        n_sel += tl.sum(m_sel.to(tl.int32), axis=1)
        n_mid += tl.sum(m_mid.to(tl.int32), axis=1)
    if INTERPRET:
        start = k_sel
        while start < K_MAX:
            o_k = start + tl.arange(0, BLOCK_N)
            tl.store(p_out[:, None] + o_k[None, :], -1, mask=m_g[:, None] & (o_k < K_MAX)[None, :])
            start += BLOCK_N
    else:
        for start in range(k_sel, K_MAX, BLOCK_N):
            o_k = start + tl.arange(0, BLOCK_N)
            tl.store(p_out[:, None] + o_k[None, :], -1, mask=m_g[:, None] & (o_k < K_MAX)[None, :])


def _select_config(num_groups: int, interpret: bool):
    if interpret:
        return 16, 16, 4, 4
    # BLOCK_G groups share each loaded unit tile; T thresholds per pass: T=4 needs ~log5(N)
    # passes at 2T ops per score and pass, fewer ops in total than T=16.
    block_g = 64 if num_groups >= 64 else 16
    return block_g, 32, 4, 8


def select_topk_triton(
    q_lr: torch.Tensor,
    k_lr: torch.Tensor,
    group_size: int,
    kv_count: torch.Tensor,
    kv_block: int = 1,
    max_passes: int = 24,
) -> SparseIndex:
    """Top-``kv_count[b, h]`` key units per query group with Triton.

    Args:
        q_lr: ``[B, H, S_q, r]`` low-rank queries; k_lr: ``[B, H, S_kv, r]`` low-rank keys.
        group_size: queries per group G (``S_q % G == 0``).
        kv_count: int32 ``[B, H]`` units to keep per head, in ``[1, S_kv / kv_block]``.
        kv_block: tokens per key unit.
        max_passes: bound on search passes (only reached with many tied scores).

    Returns:
        :class:`SparseIndex` with ``kv_idx int32 [B, H, S_q/G, max K]`` ascending, ``-1`` padded.
    """
    b, h, s_q, r = q_lr.shape
    s_kv = k_lr.shape[2]
    proxy = group_proxies(q_lr, group_size).contiguous()
    units = pool_keys(k_lr, kv_block).contiguous()
    gq, n_units = proxy.shape[2], units.shape[2]
    kv_count = kv_count.to(device=q_lr.device, dtype=torch.int32).contiguous()
    k_max = int(kv_count.max())
    kv_idx = torch.empty(b, h, gq, k_max, device=q_lr.device, dtype=torch.int32)
    if _POISON_OUTPUTS:
        kv_idx.fill_(-7)
    block_g, block_n, t, num_warps = _select_config(gq, _INTERPRET)
    grid = (triton.cdiv(gq, block_g), b * h)
    _select_kernel[grid](
        proxy, units, kv_count, kv_idx, gq, n_units, r, k_max,
        N_STATIC=n_units if _INTERPRET else 0, INTERPRET=_INTERPRET, T=t, MAX_PASSES=max_passes,
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(r)),
        num_warps=num_warps,
    )
    return SparseIndex(kv_idx, kv_count, group_size, kv_block, s_q, s_kv)


__all__ = ["select_topk_triton"]
