"""Triton top-K selection of critical key units from low-rank projections.

Scores ``s[g, j] = proxy_g . unit_j`` (proxy: mean low-rank query of group g; unit: mean low-rank
key of key unit j, see ``naive.py``) are never written to memory: every pass recomputes its score
tiles (r = 16: 32 FLOPs per score on tensor cores, cheaper than storing and re-reading 4 bytes).
The key units are split into chunks so that (group tile, chunk, b*h) programs fill the GPU; each
pass writes only small per-chunk counts, reduced and acted on in PyTorch:

1. bracket pass: ``lo = min_j s``, ``hi > max_j s``, so ``#{s >= lo} >= K > #{s >= hi}``.
2. search passes: count ``#{s >= t}`` for T thresholds spread over ``(lo, hi)`` at once and shrink
   the bracket to the neighbouring thresholds that keep the invariant. A group is done when
   ``#{s >= lo} == K`` (the K-th largest score is the only one left in the bracket); on tie-free
   inputs this takes about ``log_{T+1}(N)`` passes; ``max_passes`` bounds it for ties.
3. select: count, per chunk, the units with ``s >= hi`` and with ``lo <= s < hi``; prefix sums over
   chunks give every chunk its output offset, and a last pass keeps every unit with ``s >= hi`` and,
   in memory order, the first ``K - #{s >= hi}`` units with ``lo <= s < hi`` (ties and a bracket
   that could not shrink are broken by position). Indices come out ascending with no sort.

Three drivers run these steps. For N <= ``KernelOptions.select_fused_max_units`` (4096; key
blocks) one program per group tile does every pass with the bracket in registers (no host round
trips): if its ``BLOCK_G x N`` scores fit in registers they are computed once and every pass only
compares (``resident``), otherwise each pass recomputes them while streaming the units
(``stream``). For larger N (token granularity) the split path above fills the GPU at the cost of
a launch and a host sync per pass.

The result equals the reference (``torch.topk`` on fp32 scores) up to ties; the fused path scores in
IEEE fp32, the split path with 3xTF32 dots (fp32-level accuracy), so only near-ties at the K-th
score can differ.

Non-finite scores become ``-inf`` in the score tile, like units past N, so the passes above see
only the F finite scores of a group. A group with F < K keeps all F (``hi = lo`` = its smallest
finite score) plus the first ``K - F`` non-finite units in memory order (the reference's rule, see
``selection/__init__.py``); the extra compares of that fill run only in programs that need them.

Causal masks (``MASK`` constexpr; ``MASK=0`` compiles the unmasked kernels unchanged). Every
allowed unit set of ``ops/mask.py`` is an interval picture per group: allowed units ``[0, A)``, full
units ``[0, F)``, partial ``[F, A)``, own units ``[first // kvb, last // kvb]``, from the group's
first and last query and the chunk length (token-causal = chunks of 1 token); the kernels derive it
per group tile, and per score tile a few integer compares. Forced units (partial or own) are not
ranked at all: they are written unconditionally and the search runs for ``K' = K - #forced`` (>= 0,
``CausalMask.check_k``) among the *ranked* units (allowed, not forced, finite), whose scores are
the only ones left finite; disallowed and forced units score ``-inf``. Forced as ``+inf`` instead
would put ``+inf`` into the bracket (``hi = max + ...``) and into the non-finite counts, so the
count offset reproduces the reference (forced first, then the best allowed) without touching the
non-finite rule. The fill of a group with fewer than ``K'`` ranked units takes the remaining
units that are neither ranked nor forced in memory order: allowed units form the prefix
``[0, A)``, so that order is the reference's (allowed non-finite units by position, then
disallowed ones by position). ``K' = 0`` (K equals the group's forced units) skips the search.
"""

import os
from typing import Optional

import torch
import triton
import triton.language as tl

from megatron_dsv.ops.mask import CausalMask
from megatron_dsv.ops.options import DEFAULT_OPTIONS, KernelOptions
from megatron_dsv.ops.sparse_index import SparseIndex

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _score_tile(
    proxy, units, i_bh, i_gt, i_c, start, NUM_GROUPS, N, R,
    PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """fp32 scores ``[BLOCK_G, BLOCK_N]`` of a group tile vs units ``i_c*CHUNK + start + [0, BLOCK_N)``.

    Every kernel calls this with the same tiles, so a score is bitwise the same in every pass.
    Units past N and non-finite scores (NaN fails every compare) are ``-inf``.
    """
    o_g = i_gt * BLOCK_G + tl.arange(0, BLOCK_G)
    m_g = o_g < NUM_GROUPS
    o_r = tl.arange(0, BLOCK_R)
    m_r = o_r < R
    b_p = tl.load(
        proxy + (i_bh * NUM_GROUPS + o_g[:, None]) * R + o_r[None, :],
        mask=m_g[:, None] & m_r[None, :], other=0.0,
    )
    o_n = i_c * CHUNK + start + tl.arange(0, BLOCK_N)
    m_n = o_n < N
    b_u = tl.load(units + (i_bh * N + o_n[:, None]) * R + o_r[None, :], mask=m_n[:, None] & m_r[None, :], other=0.0)
    b_s = tl.dot(b_p, tl.trans(b_u), input_precision=PRECISION)
    return tl.where(m_n[None, :] & (tl.abs(b_s) < float("inf")), b_s, float("-inf")), o_g, m_g, o_n


@triton.jit
def _mask_bounds(o_g, GROUP, KV_BLOCK, Q_OFFSET, CHUNK_T, N):
    """Unit intervals of groups ``o_g`` under a mask with chunks of ``CHUNK_T`` tokens (1:
    token-causal): full units ``[0, f_end)``, allowed ``[0, a_end)``, own ``[own_lo, own_hi]``
    (``CausalMask.unit_classes`` and ``forced_count`` by interval arithmetic)."""
    first = o_g * GROUP + Q_OFFSET
    last = first + GROUP - 1
    lim_first = (first // CHUNK_T + 1) * CHUNK_T - 1
    lim_last = (last // CHUNK_T + 1) * CHUNK_T - 1
    f_end = tl.minimum((lim_first + 1) // KV_BLOCK, N)
    a_end = tl.minimum(lim_last // KV_BLOCK + 1, N)
    return f_end, a_end, first // KV_BLOCK, last // KV_BLOCK


@triton.jit
def _forced_count(f_end, a_end, own_lo, own_hi):
    """Forced units per group: partial ``[f_end, a_end)`` plus own ``[own_lo, own_hi]``, once."""
    overlap = tl.maximum(tl.minimum(a_end, own_hi + 1) - tl.maximum(f_end, own_lo), 0)
    return ((a_end - f_end) + (own_hi + 1 - own_lo) - overlap).to(tl.int32)


@triton.jit
def _mask_tile(b_s, o_n, f_end, a_end, own_lo, own_hi):
    """``(scores, forced)``: scores of units that are not ranked (disallowed or forced) set to
    ``-inf``, and the bool tile of forced units."""
    u = o_n[None, :]
    m_frc = ((u >= f_end[:, None]) & (u < a_end[:, None])) | ((u >= own_lo[:, None]) & (u <= own_hi[:, None]))
    m_rank = (u < a_end[:, None]) & (~m_frc)
    return tl.where(m_rank, b_s, float("-inf")), m_frc


@triton.jit
def _write_selected(
    b_s, o_n, b_lo, b_hi, need, n_sel, n_mid, p_out, m_g, need_inf, n_inf, N, any_inf, m_frc, MASK: tl.constexpr,
):
    """Write one tile's selected unit ids in ascending order and return the updated counts.

    Selected: every score >= hi, the first ``need`` scores in [lo, hi) in unit order (``n_mid``
    of them seen in earlier tiles), and, when ``any_inf`` (some group of the tile has fewer finite
    scores than K), the first ``need_inf`` non-finite units (``n_inf`` seen earlier); ``n_sel``
    ids are already written for the group. ``MASK``: also every forced unit (``m_frc``), and the
    fill skips them (their score is ``-inf`` too).
    """
    m_hi = b_s >= b_hi[:, None]
    m_mid = (b_s >= b_lo[:, None]) & (b_s < b_hi[:, None])
    mid_rank = n_mid[:, None] + tl.cumsum(m_mid.to(tl.int32), axis=1) - 1
    m_sel = m_hi | (m_mid & (mid_rank < need[:, None]))
    if any_inf:
        m_inf = (b_s == float("-inf")) & (o_n < N)[None, :]
        if MASK:
            m_inf = m_inf & (~m_frc)
        inf_rank = n_inf[:, None] + tl.cumsum(m_inf.to(tl.int32), axis=1) - 1
        m_sel = m_sel | (m_inf & (inf_rank < need_inf[:, None]))
        n_inf = n_inf + tl.sum(m_inf.to(tl.int32), axis=1)
    if MASK:
        m_sel = m_sel | m_frc
    pos = n_sel[:, None] + tl.cumsum(m_sel.to(tl.int32), axis=1) - 1
    tl.store(p_out[:, None] + pos, o_n[None, :].to(tl.int32), mask=m_sel & m_g[:, None])
    return n_sel + tl.sum(m_sel.to(tl.int32), axis=1), n_mid + tl.sum(m_mid.to(tl.int32), axis=1), n_inf


@triton.jit
def _bracket(b_lo, b_max, n_fin, k_sel):
    """Initial bracket ``(lo, hi, #{s >= lo})`` from the smallest and largest finite score.

    A group with fewer than K finite scores is done at once: ``hi = lo`` selects every finite
    score, and its count is set to K so the search skips it.
    """
    # a group without finite scores (b_max = -inf, b_lo = +inf) gets hi = -inf, not NaN: it is
    # short (done at once) or, masked with K' = 0, skipped (_skip_search)
    some = n_fin > 0
    b_hi = b_max + tl.where(some, b_max - b_lo, 0.0) * 1e-3 + tl.where(some, tl.abs(b_max), 0.0) * 1e-6 + 1e-30
    short = n_fin < k_sel
    return tl.where(short, b_lo, b_hi), tl.where(short, k_sel, n_fin)


@triton.jit
def _skip_search(b_hi, c_lo, k_sel):
    """Masked groups whose forced units are all of K (``K' = 0``) rank nothing: ``hi = +inf``
    selects no score (scores are finite or ``-inf``) and the search skips them (else it would
    take log passes to push ``lo`` above the largest score)."""
    none = k_sel <= 0
    return tl.where(none, float("inf"), b_hi), tl.where(none, k_sel, c_lo)


@triton.jit
def _minmax_kernel(
    proxy, units, part_min, part_max, part_fin, part_frc, NUM_GROUPS, N, R, N_SPLIT,
    GROUP, KV_BLOCK, Q_OFFSET, CHUNK_T,
    PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, MASK: tl.constexpr,
):
    """Per chunk: smallest and largest finite score, finite count; ``MASK``: of the ranked units,
    and the forced units' count in ``part_frc``."""
    i_gt = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    o_g = i_gt * BLOCK_G + tl.arange(0, BLOCK_G)
    m_g = o_g < NUM_GROUPS
    b_min = tl.full([BLOCK_G], float("inf"), dtype=tl.float32)
    b_max = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    b_fin = tl.zeros([BLOCK_G], dtype=tl.int32)
    if MASK:
        f_end, a_end, own_lo, own_hi = _mask_bounds(o_g, GROUP, KV_BLOCK, Q_OFFSET, CHUNK_T, N)
        b_frc = tl.zeros([BLOCK_G], dtype=tl.int32)
    for start in range(0, CHUNK, BLOCK_N):
        b_s, _og, _mg, o_n = _score_tile(
            proxy, units, i_bh, i_gt, i_c, start, NUM_GROUPS, N, R, PRECISION, CHUNK, BLOCK_G, BLOCK_N, BLOCK_R
        )
        if MASK:
            b_s, m_frc = _mask_tile(b_s, o_n, f_end, a_end, own_lo, own_hi)
            b_frc += tl.sum(m_frc.to(tl.int32), axis=1)
        b_max = tl.maximum(b_max, tl.max(b_s, axis=1))
        b_min = tl.minimum(b_min, tl.min(tl.where(b_s == float("-inf"), float("inf"), b_s), axis=1))
        b_fin += tl.sum((b_s > float("-inf")).to(tl.int32), axis=1)
    o_out = (i_bh * N_SPLIT + i_c) * NUM_GROUPS + o_g
    tl.store(part_min + o_out, b_min, mask=m_g)
    tl.store(part_max + o_out, b_max, mask=m_g)
    tl.store(part_fin + o_out, b_fin, mask=m_g)
    if MASK:
        tl.store(part_frc + o_out, b_frc, mask=m_g)


@triton.jit
def _count_kernel(
    proxy, units, thr, part_cnt, NUM_GROUPS, N, R, N_SPLIT,
    GROUP, KV_BLOCK, Q_OFFSET, CHUNK_T,
    T: tl.constexpr, PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, MASK: tl.constexpr,
):
    """``part_cnt[bh, chunk, g, t] = #{j in chunk: s[g, j] >= thr[bh, g, t]}`` (``MASK``: ranked j)."""
    i_gt = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    o_g = i_gt * BLOCK_G + tl.arange(0, BLOCK_G)
    m_g = o_g < NUM_GROUPS
    o_t = tl.arange(0, T)
    o_thr = (i_bh * NUM_GROUPS + o_g[:, None]) * T + o_t[None, :]
    b_thr = tl.load(thr + o_thr, mask=m_g[:, None], other=float("inf"))
    b_cnt = tl.zeros([BLOCK_G, T], dtype=tl.int32)
    if MASK:
        f_end, a_end, own_lo, own_hi = _mask_bounds(o_g, GROUP, KV_BLOCK, Q_OFFSET, CHUNK_T, N)
    for start in range(0, CHUNK, BLOCK_N):
        b_s, _og, _mg, o_n = _score_tile(
            proxy, units, i_bh, i_gt, i_c, start, NUM_GROUPS, N, R, PRECISION, CHUNK, BLOCK_G, BLOCK_N, BLOCK_R
        )
        if MASK:
            b_s, _frc = _mask_tile(b_s, o_n, f_end, a_end, own_lo, own_hi)
        b_cnt += tl.sum((b_s[:, None, :] >= b_thr[:, :, None]).to(tl.int32), axis=2)
    o_out = ((i_bh * N_SPLIT + i_c) * NUM_GROUPS + o_g[:, None]) * T + o_t[None, :]
    tl.store(part_cnt + o_out, b_cnt, mask=m_g[:, None])


@triton.jit
def _write_kernel(
    proxy, units, lo, hi, need, need_inf, sel_off, mid_off, inf_off, kv_idx, NUM_GROUPS, N, R, N_SPLIT, K_MAX,
    GROUP, KV_BLOCK, Q_OFFSET, CHUNK_T,
    PRECISION: tl.constexpr, CHUNK: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, MASK: tl.constexpr,
):
    """Write the chunk's selected unit ids at their global, ascending output positions."""
    i_gt = tl.program_id(0).to(tl.int64)
    i_c = tl.program_id(1).to(tl.int64)
    i_bh = tl.program_id(2).to(tl.int64)
    o_g = i_gt * BLOCK_G + tl.arange(0, BLOCK_G)
    m_g = o_g < NUM_GROUPS
    o_bg = i_bh * NUM_GROUPS + o_g
    b_lo = tl.load(lo + o_bg, mask=m_g, other=float("inf"))
    b_hi = tl.load(hi + o_bg, mask=m_g, other=float("inf"))
    b_need = tl.load(need + o_bg, mask=m_g, other=0)
    b_need_inf = tl.load(need_inf + o_bg, mask=m_g, other=0)
    any_inf = tl.max(b_need_inf, axis=0) > 0
    o_part = (i_bh * N_SPLIT + i_c) * NUM_GROUPS + o_g
    n_sel = tl.load(sel_off + o_part, mask=m_g, other=0)
    n_mid = tl.load(mid_off + o_part, mask=m_g, other=0)
    n_inf = tl.load(inf_off + o_part, mask=m_g, other=0)
    p_out = kv_idx + o_bg * K_MAX
    if MASK:
        f_end, a_end, own_lo, own_hi = _mask_bounds(o_g, GROUP, KV_BLOCK, Q_OFFSET, CHUNK_T, N)
    for start in range(0, CHUNK, BLOCK_N):
        b_s, _og, _mg, o_n = _score_tile(
            proxy, units, i_bh, i_gt, i_c, start, NUM_GROUPS, N, R, PRECISION, CHUNK, BLOCK_G, BLOCK_N, BLOCK_R
        )
        m_frc = None
        if MASK:
            b_s, m_frc = _mask_tile(b_s, o_n, f_end, a_end, own_lo, own_hi)
        n_sel, n_mid, n_inf = _write_selected(
            b_s, o_n, b_lo, b_hi, b_need, n_sel, n_mid, p_out, m_g, b_need_inf, n_inf, N, any_inf, m_frc, MASK
        )


@triton.jit
def _fused_select_kernel(
    proxy, units, kv_count, kv_idx, NUM_GROUPS, N, R, K_MAX, MAX_PASSES, GROUP, KV_BLOCK, Q_OFFSET, CHUNK_T,
    N_STATIC: tl.constexpr, INTERPRET: tl.constexpr, T: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, MASK: tl.constexpr,
):
    """Bracket, search and select in one program per (group tile, b*h), streaming all N units.

    No host round trips: the choice when N is small (key blocks), where the split path's per-pass
    launches and syncs cost more than the passes. Loop bounds: under the interpreter a runtime
    scalar cannot bound ``range`` (numpy >= 2), so there the constexpr copy N_STATIC is used.
    """
    i_gt = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    o_g = i_gt * BLOCK_G + tl.arange(0, BLOCK_G)
    m_g = o_g < NUM_GROUPS
    k_sel = tl.load(kv_count + i_bh)
    # the search's K against the [BLOCK_G, T] counts: one per head, or (MASK) one per group
    k_col = k_sel
    if MASK:
        f_end, a_end, own_lo, own_hi = _mask_bounds(o_g, GROUP, KV_BLOCK, Q_OFFSET, CHUNK_T, N)
        k_sel = k_sel - _forced_count(f_end, a_end, own_lo, own_hi)
        k_col = k_sel[:, None]
    b_min = tl.full([BLOCK_G], float("inf"), dtype=tl.float32)
    b_max = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
    n_fin = tl.zeros([BLOCK_G], dtype=tl.int32)
    for start in range(0, N_STATIC if INTERPRET else N, BLOCK_N):
        b_s, _og, _mg, o_n = _score_tile(
            proxy, units, i_bh, i_gt, 0, start, NUM_GROUPS, N, R, PRECISION, 0, BLOCK_G, BLOCK_N, BLOCK_R
        )
        if MASK:
            b_s, _frc = _mask_tile(b_s, o_n, f_end, a_end, own_lo, own_hi)
        b_max = tl.maximum(b_max, tl.max(b_s, axis=1))
        b_min = tl.minimum(b_min, tl.min(tl.where(b_s == float("-inf"), float("inf"), b_s), axis=1))
        n_fin += tl.sum((b_s > float("-inf")).to(tl.int32), axis=1)
    b_lo = b_min
    b_hi, c_lo = _bracket(b_lo, b_max, n_fin, k_sel)
    if MASK:
        b_hi, c_lo = _skip_search(b_hi, c_lo, k_sel)
    c_hi = tl.zeros([BLOCK_G], dtype=tl.int32)
    o_t = tl.arange(0, T)
    frac = (o_t + 1).to(tl.float32) / (T + 1)
    n_todo = tl.sum((m_g & (c_lo != k_sel)).to(tl.int32), axis=0)
    i_pass = tl.full([], 0, dtype=tl.int32)
    while (n_todo > 0) & (i_pass < MAX_PASSES):
        b_thr = b_lo[:, None] + (b_hi - b_lo)[:, None] * frac[None, :]
        b_cnt = tl.zeros([BLOCK_G, T], dtype=tl.int32)
        for start in range(0, N_STATIC if INTERPRET else N, BLOCK_N):
            b_s, _og, _mg, o_n = _score_tile(
                proxy, units, i_bh, i_gt, 0, start, NUM_GROUPS, N, R, PRECISION, 0, BLOCK_G, BLOCK_N, BLOCK_R
            )
            if MASK:
                b_s, _frc = _mask_tile(b_s, o_n, f_end, a_end, own_lo, own_hi)
            b_cnt += tl.sum((b_s[:, None, :] >= b_thr[:, :, None]).to(tl.int32), axis=2)
        m_in = b_cnt >= k_col
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
    need = k_sel - c_hi
    need_inf = tl.where(m_g & (n_fin < k_sel), k_sel - n_fin, 0)
    any_inf = tl.max(need_inf, axis=0) > 0
    n_sel = tl.zeros([BLOCK_G], dtype=tl.int32)
    n_mid = tl.zeros([BLOCK_G], dtype=tl.int32)
    n_inf = tl.zeros([BLOCK_G], dtype=tl.int32)
    p_out = kv_idx + (i_bh * NUM_GROUPS + o_g) * K_MAX
    for start in range(0, N_STATIC if INTERPRET else N, BLOCK_N):
        b_s, _og, _mg, o_n = _score_tile(
            proxy, units, i_bh, i_gt, 0, start, NUM_GROUPS, N, R, PRECISION, 0, BLOCK_G, BLOCK_N, BLOCK_R
        )
        m_frc = None
        if MASK:
            b_s, m_frc = _mask_tile(b_s, o_n, f_end, a_end, own_lo, own_hi)
        n_sel, n_mid, n_inf = _write_selected(
            b_s, o_n, b_lo, b_hi, need, n_sel, n_mid, p_out, m_g, need_inf, n_inf, N, any_inf, m_frc, MASK
        )


@triton.jit
def _resident_select_kernel(
    proxy, units, kv_count, kv_idx, NUM_GROUPS, N, R, K_MAX, MAX_PASSES, GROUP, KV_BLOCK, Q_OFFSET, CHUNK_T,
    T: tl.constexpr, BLOCK_G: tl.constexpr, N_POW2: tl.constexpr, BLOCK_R: tl.constexpr, MASK: tl.constexpr,
):
    """Bracket, search and select with all ``N`` scores of a group tile held in registers.

    The scores are computed once (one ``[BLOCK_G, r] x [r, N]`` dot) instead of once per pass as
    in the streaming kernel, so a search pass is only T compares and row sums over registers.
    """
    i_gt = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    k_sel = tl.load(kv_count + i_bh)
    b_s, o_g, m_g, o_n = _score_tile(
        proxy, units, i_bh, i_gt, 0, 0, NUM_GROUPS, N, R, "ieee", 0, BLOCK_G, N_POW2, BLOCK_R
    )
    m_frc = None
    if MASK:
        f_end, a_end, own_lo, own_hi = _mask_bounds(o_g, GROUP, KV_BLOCK, Q_OFFSET, CHUNK_T, N)
        k_sel = k_sel - _forced_count(f_end, a_end, own_lo, own_hi)
        b_s, m_frc = _mask_tile(b_s, o_n, f_end, a_end, own_lo, own_hi)
    b_max = tl.max(b_s, axis=1)
    b_lo = tl.min(tl.where(b_s == float("-inf"), float("inf"), b_s), axis=1)
    n_fin = tl.sum((b_s > float("-inf")).to(tl.int32), axis=1)
    b_hi, c_lo = _bracket(b_lo, b_max, n_fin, k_sel)
    if MASK:
        b_hi, c_lo = _skip_search(b_hi, c_lo, k_sel)
    c_hi = tl.zeros([BLOCK_G], dtype=tl.int32)
    n_todo = tl.sum((m_g & (c_lo != k_sel)).to(tl.int32), axis=0)
    i_pass = tl.full([], 0, dtype=tl.int32)
    while (n_todo > 0) & (i_pass < MAX_PASSES):
        todo = c_lo != k_sel
        lo0 = b_lo
        width = b_hi - b_lo
        # thresholds ascend with t, so counts descend: the last threshold with count >= K is the
        # new lo and the first with count < K the new hi
        for t in tl.static_range(T):
            thr = lo0 + width * ((t + 1) / (T + 1))
            cnt = tl.sum((b_s >= thr[:, None]).to(tl.int32), axis=1)
            m_in = cnt >= k_sel
            upd_lo = todo & m_in & (thr > b_lo)
            b_lo = tl.where(upd_lo, thr, b_lo)
            c_lo = tl.where(upd_lo, cnt, c_lo)
            upd_hi = todo & (~m_in) & (thr < b_hi)
            b_hi = tl.where(upd_hi, thr, b_hi)
            c_hi = tl.where(upd_hi, cnt, c_hi)
        n_todo = tl.sum((m_g & (c_lo != k_sel)).to(tl.int32), axis=0)
        i_pass += 1
    need = k_sel - c_hi
    need_inf = tl.where(m_g & (n_fin < k_sel), k_sel - n_fin, 0)
    any_inf = tl.max(need_inf, axis=0) > 0
    p_out = kv_idx + (i_bh * NUM_GROUPS + o_g) * K_MAX
    zero = tl.zeros([BLOCK_G], dtype=tl.int32)
    _write_selected(b_s, o_n, b_lo, b_hi, need, zero, zero, p_out, m_g, need_inf, zero, N, any_inf, m_frc, MASK)


@triton.jit
def _pool_kernel(
    x, out, N_OUT, P, R,
    BLOCK_U: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``out[bh, u] = mean(x[bh, u*P:(u+1)*P])`` in fp32: ``[BH, N_OUT*P, R] -> [BH, N_OUT, R]``."""
    i_u = tl.program_id(0).to(tl.int64)
    i_bh = tl.program_id(1).to(tl.int64)
    o_u = i_u * BLOCK_U + tl.arange(0, BLOCK_U)
    o_p = tl.arange(0, BLOCK_P)
    o_r = tl.arange(0, BLOCK_R)
    m_u = o_u < N_OUT
    m_r = o_r < R
    m = m_u[:, None, None] & (o_p < P)[None, :, None] & m_r[None, None, :]
    o_x = ((i_bh * N_OUT + o_u[:, None, None]) * P + o_p[None, :, None]) * R + o_r[None, None, :]
    b_x = tl.load(x + o_x, mask=m, other=0.0).to(tl.float32)
    b_mean = tl.sum(b_x, axis=1) / P
    o_out = (i_bh * N_OUT + o_u[:, None]) * R + o_r[None, :]
    tl.store(out + o_out, b_mean, mask=m_u[:, None] & m_r[None, :])


def _pool(x: torch.Tensor, p: int) -> torch.Tensor:
    """Mean of every ``p`` consecutive rows in fp32, ``[B, H, S, r] -> [B, H, S/p, r]``.

    One pass over the bf16 input replaces ``x.float().view(..).mean()`` (an fp32 copy written and
    read again, two launches): ``group_proxies`` and ``pool_keys`` of ``naive.py`` in one kernel each.
    """
    b, h, s, r = x.shape
    if p == 1:
        return x.float().contiguous()
    x = x.contiguous()
    n_out = s // p
    out = torch.empty((b, h, n_out, r), device=x.device, dtype=torch.float32)
    block_p, block_r = triton.next_power_of_2(p), triton.next_power_of_2(r)
    block_u = max(1, min(triton.next_power_of_2(n_out), 8192 // (block_p * block_r)))
    _pool_kernel[(triton.cdiv(n_out, block_u), b * h)](
        x, out, n_out, p, r, BLOCK_U=block_u, BLOCK_P=block_p, BLOCK_R=block_r,
    )
    return out


def _config(num_units: int):
    """Group tile, unit tile, chunk of units per program, thresholds per pass, warps."""
    if _INTERPRET:
        return 16, 16, 64, 4, 4
    # T=4 thresholds per pass: ~log5(N) passes at 2T compare/adds per score and pass, fewer
    # operations in total than T=16 with its fewer passes.
    block_n = 64
    chunk = max(block_n, min(1024, triton.next_power_of_2(num_units)))
    return 32, block_n, chunk, 4, 4


def select_topk_triton(
    q_lr: torch.Tensor,
    k_lr: torch.Tensor,
    group_size: int,
    kv_count: torch.Tensor,
    kv_block: int = 1,
    max_passes: int = 24,
    options: KernelOptions = DEFAULT_OPTIONS,
    k_max: Optional[int] = None,
    mask: Optional[CausalMask] = None,
    q_offset: int = 0,
) -> SparseIndex:
    """Top-``kv_count[b, h]`` key units per query group with Triton.

    Args:
        q_lr: ``[B, H, S_q, r]`` low-rank queries; k_lr: ``[B, H, S_kv, r]`` low-rank keys.
        group_size: queries per group G (``S_q % G == 0``).
        kv_count: int32 ``[B, H]`` units to keep per head, in ``[1, S_kv / kv_block]``.
        kv_block: tokens per key unit.
        max_passes: bound on search passes (reached only with many tied scores).
        options: which one-program kernel runs and up to how many units (``select_fused_*``).
        k_max: ``kv_count.max()`` when the caller knows it on the host (:func:`select_topk`
            does); None reads it from ``kv_count`` (a host sync for a device tensor).
        mask: optional causal mask, ranked as ``select_topk_reference(..., mask=)`` does (see the
            module docstring); the caller has checked K with ``CausalMask.check_k`` and
            ``q_offset`` (the key token of query row 0; a multiple of ``group_size``).

    Returns:
        :class:`SparseIndex` with ``kv_idx int32 [B, H, S_q/G, max K]`` ascending, ``-1`` padded.
    """
    b, h, s_q, r = q_lr.shape
    s_kv = k_lr.shape[2]
    dev = q_lr.device
    proxy = _pool(q_lr, group_size)
    units = _pool(k_lr, kv_block)
    gq, n = proxy.shape[2], units.shape[2]
    bh = b * h
    kv_count = kv_count.to(device=dev, dtype=torch.int32).contiguous()
    k_max = int(kv_count.max()) if k_max is None else k_max
    k_sel = kv_count.view(bh, 1).long()
    precision = "ieee" if _INTERPRET else "tf32x3"
    n_pow2 = max(16, triton.next_power_of_2(n))
    # chunk-causal with chunks of CHUNK_T tokens; token-causal is chunks of 1 token (limit(i) = i).
    # Unmasked, the (unused) ints are fixed so that they add no specialisations of the kernels.
    if mask is None:
        masked = dict(GROUP=0, KV_BLOCK=0, Q_OFFSET=0, CHUNK_T=0, MASK=False)
    else:
        chunk_t = 1 if mask.kind == "causal" else mask.chunk_tokens
        masked = dict(GROUP=group_size, KV_BLOCK=kv_block, Q_OFFSET=q_offset, CHUNK_T=chunk_t, MASK=True)
    fused = n <= options.select_fused_max_units
    # Which one-program kernel runs, and up to how many units and scores: KernelOptions.select_*.
    max_scores = options.select_resident_max_scores
    if fused and options.select_fused_kind == "resident" and 16 * n_pow2 <= max_scores:
        kv_idx = torch.full((b, h, gq, k_max), -1, device=dev, dtype=torch.int32)
        block_g = max(16, min(64, max_scores // 2 // n_pow2, triton.next_power_of_2(gq)))
        _resident_select_kernel[(triton.cdiv(gq, block_g), bh)](
            proxy, units, kv_count, kv_idx, gq, n, r, k_max, max_passes, **masked,
            T=3, BLOCK_G=block_g, N_POW2=n_pow2, BLOCK_R=max(16, triton.next_power_of_2(r)),
            num_warps=4 if _INTERPRET else (16 if block_g * n_pow2 > 8192 else 8),
        )
        return SparseIndex(kv_idx, kv_count, group_size, kv_block, s_q, s_kv, mask, q_offset)
    if fused:
        kv_idx = torch.full((b, h, gq, k_max), -1, device=dev, dtype=torch.int32)
        block_g = 16 if _INTERPRET else 64
        block_n = 16 if _INTERPRET else 32
        _fused_select_kernel[(triton.cdiv(gq, block_g), bh)](
            proxy, units, kv_count, kv_idx, gq, n, r, k_max, max_passes, **masked,
            N_STATIC=n if _INTERPRET else 0, INTERPRET=_INTERPRET, T=4, PRECISION="ieee",
            BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(r)),
            num_warps=4 if _INTERPRET else 8,
        )
        return SparseIndex(kv_idx, kv_count, group_size, kv_block, s_q, s_kv, mask, q_offset)
    block_g, block_n, chunk, t, num_warps = _config(n)
    n_split = triton.cdiv(n, chunk)
    grid = (triton.cdiv(gq, block_g), n_split, bh)
    common = dict(
        PRECISION=precision, CHUNK=chunk,
        BLOCK_G=block_g, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(r)), num_warps=num_warps,
        **masked,
    )

    def count(thr):
        nt = thr.shape[-1]
        part = torch.empty(bh, n_split, gq, nt, device=dev, dtype=torch.int32)
        _count_kernel[grid](proxy, units, thr.contiguous(), part, gq, n, r, n_split, T=nt, **common)
        return part

    # 1. bracket
    part_min = torch.empty(bh, n_split, gq, device=dev, dtype=torch.float32)
    part_max = torch.empty_like(part_min)
    part_fin = torch.empty(bh, n_split, gq, device=dev, dtype=torch.int32)
    # forced units per chunk, written only under a mask (unmasked, a placeholder the kernel ignores)
    part_frc = part_fin if mask is None else torch.empty_like(part_fin)
    _minmax_kernel[grid](proxy, units, part_min, part_max, part_fin, part_frc, gq, n, r, n_split, **common)
    if mask is not None:
        # K' per group: the forced units are written regardless of score (see the module docstring)
        k_sel = k_sel - part_frc.sum(1, dtype=torch.long)
    lo = part_min.amin(1)
    s_max = part_max.amax(1)
    hi = s_max + (s_max - lo) * 1e-3 + s_max.abs() * 1e-6 + 1e-30
    # fewer finite scores than K: done at once, hi = lo keeps every finite unit (see _bracket)
    n_fin = part_fin.sum(1, dtype=torch.long)
    short = n_fin < k_sel
    hi = torch.where(short, lo, hi)
    c_lo = torch.where(short, k_sel, n_fin)
    if mask is not None:
        # K' = 0: nothing ranked, no search (see _skip_search)
        none = k_sel <= 0
        hi, c_lo = torch.where(none, float("inf"), hi), torch.where(none, k_sel, c_lo)
    c_hi = torch.zeros((bh, gq), device=dev, dtype=torch.long)

    # 2. search
    frac = torch.arange(1, t + 1, device=dev, dtype=torch.float32) / (t + 1)
    for _ in range(max_passes):
        todo = c_lo != k_sel
        if not bool(todo.any()):
            break
        thr = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * frac
        cnt = count(thr).sum(1, dtype=torch.long)
        m_in = cnt >= k_sel.unsqueeze(-1)
        new_lo = torch.where(m_in, thr, float("-inf")).amax(-1)
        new_c_lo = torch.where(m_in, cnt, n + 1).amin(-1)
        upd = todo & (new_lo > lo)
        lo, c_lo = torch.where(upd, new_lo, lo), torch.where(upd, new_c_lo, c_lo)
        new_hi = torch.where(m_in, float("inf"), thr).amin(-1)
        new_c_hi = torch.where(m_in, -1, cnt).amax(-1)
        upd = todo & (new_hi < hi)
        hi, c_hi = torch.where(upd, new_hi, hi), torch.where(upd, new_c_hi, c_hi)

    # 3. select
    part = count(torch.stack([hi, lo], dim=-1)).long()
    n_hi, n_mid = part[..., 0], part[..., 1] - part[..., 0]  # [BH, chunks, Gq]
    need = k_sel - n_hi.sum(1)
    mid_off = n_mid.cumsum(1) - n_mid
    take_mid = torch.minimum(torch.clamp(need.unsqueeze(1) - mid_off, min=0), n_mid)
    # non-finite units per chunk, and the first K - F of them for groups with F < K
    n_valid = torch.clamp(n - torch.arange(n_split, device=dev) * chunk, 0, chunk).view(1, -1, 1)
    n_inf = n_valid - part_fin.long()
    if mask is not None:
        n_inf = n_inf - part_frc.long()
    need_inf = torch.where(short, k_sel - n_fin, 0)
    inf_off = n_inf.cumsum(1) - n_inf
    take_inf = torch.minimum(torch.clamp(need_inf.unsqueeze(1) - inf_off, min=0), n_inf)
    n_take = n_hi + take_mid + take_inf
    if mask is not None:
        n_take = n_take + part_frc.long()
    sel_off = n_take.cumsum(1) - n_take
    kv_idx = torch.full((b, h, gq, k_max), -1, device=dev, dtype=torch.int32)
    _write_kernel[grid](
        proxy, units, lo.contiguous(), hi.contiguous(), need.to(torch.int32).contiguous(),
        need_inf.to(torch.int32).contiguous(), sel_off.to(torch.int32).contiguous(),
        mid_off.to(torch.int32).contiguous(), inf_off.to(torch.int32).contiguous(), kv_idx,
        gq, n, r, n_split, k_max, **common,
    )
    return SparseIndex(kv_idx, kv_count, group_size, kv_block, s_q, s_kv, mask, q_offset)


__all__ = ["select_topk_triton"]
