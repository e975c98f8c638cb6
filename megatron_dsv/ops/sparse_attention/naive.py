"""Plain-PyTorch reference for attention over a SparseIndex (the definition of correct).

Every query of group g attends, with softmax, to the keys of the units listed for g:
``out_i = sum_j softmax_j(scale * q_i . k_j) v_j`` over ``j`` in the group's key set, and
``lse_i = log sum_j exp(scale * q_i . k_j)`` (natural log), which lets context parallelism merge
partial results. Computed in fp32 (fp64 for fp64 inputs, for gradient checks) by gathering each group's keys; memory is ``S x K x D``, never
``S x S``. Autograd provides the backward.

With a causal mask on the index (``index.mask``) a pair the mask disallows is dropped like
padding: on a partial (diagonal) unit token by token, on a disallowed filler unit entirely.
"""

from __future__ import annotations

from typing import Tuple

import torch

from megatron_dsv.ops.sparse_index import SparseIndex

# Groups per chunk are chosen so a chunk's gathered keys stay under this many elements.
_CHUNK_ELEMS = 1 << 25


def gather_token_index(index: SparseIndex) -> Tuple[torch.Tensor, torch.Tensor]:
    """Token indices and validity of each group's keys: int64/bool ``[B, H, Gq, Kmax*kv_block]``."""
    units = index.kv_idx.long()
    valid = (units >= 0).repeat_interleave(index.kv_block, dim=-1)
    offs = torch.arange(index.kv_block, device=units.device)
    tok = (units.clamp(min=0).unsqueeze(-1) * index.kv_block + offs).flatten(-2)
    return tok, valid


def pair_mask(index: SparseIndex, tok: torch.Tensor, valid: torch.Tensor, g0: int) -> torch.Tensor:
    """Pairs computed for groups ``g0 ..`` of a chunk: bool ``[B, H, c, G, Kt]`` (validity, and the
    causal mask when the index carries one)."""
    keep = valid.unsqueeze(3)
    if index.mask is None:
        return keep
    c, g = tok.shape[2], index.group_size
    q_pos = torch.arange(g0 * g, (g0 + c) * g, device=tok.device).view(1, 1, c, g, 1) + index.q_offset
    return keep & index.mask.allowed(q_pos, tok.unsqueeze(3))


def sparse_attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """See :func:`sparse_attention`; GQA when k/v have fewer heads than q."""
    b, h, s, d = q.shape
    rep = h // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    g = index.group_size
    tok, valid = gather_token_index(index)
    gq, kt = tok.shape[2], tok.shape[3]
    bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    hi = torch.arange(h, device=q.device).view(1, h, 1, 1)
    acc = torch.promote_types(q.dtype, torch.float32)
    qg = q.to(acc).view(b, h, gq, g, d)
    chunk = max(1, _CHUNK_ELEMS // max(1, b * h * kt * d))
    outs, lses = [], []
    for g0 in range(0, gq, chunk):
        t = tok[:, :, g0 : g0 + chunk]
        # padding gathers token 0: zero it, so a NaN there cannot reach the output (0 * NaN)
        keep = valid[:, :, g0 : g0 + chunk].unsqueeze(-1)
        k_sel = k[bi, hi, t].to(acc).where(keep, 0.0)  # [B, H, c, Kt, D]
        v_sel = v[bi, hi, t].to(acc).where(keep, 0.0)
        scores = torch.einsum("bhgqd,bhgkd->bhgqk", qg[:, :, g0 : g0 + chunk], k_sel) * scale
        scores = scores.masked_fill(~pair_mask(index, t, valid[:, :, g0 : g0 + chunk], g0), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - lse.unsqueeze(-1))
        outs.append(torch.einsum("bhgqk,bhgkd->bhgqd", p, v_sel))
        lses.append(lse)
    out = torch.cat(outs, dim=2).reshape(b, h, s, d).to(q.dtype)
    return out, torch.cat(lses, dim=2).reshape(b, h, s)  # fp32 (fp64 for fp64 inputs)


def masked_dense_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Dense attention with a bool ``[B, H, S_q, S_kv]`` keep-mask, fp32; for tests (S x S memory)."""
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    acc = torch.promote_types(q.dtype, torch.float32)
    scores = torch.einsum("bhqd,bhkd->bhqk", q.to(acc), k.to(acc)) * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    out = torch.einsum("bhqk,bhkd->bhqd", torch.exp(scores - lse.unsqueeze(-1)), v.to(acc))
    return out.to(q.dtype), lse


def sparse_attention_backward_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    do: torch.Tensor, index: SparseIndex, scale: float,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of one key set's share of an attention whose final ``out``/``lse`` are given.

    With ``p_ij = exp(scale q_i.k_j - lse_i)`` and ``delta_i = do_i . out_i``:
    ``dv_j = sum_i p_ij do_i``, ``ds_ij = p_ij (do_i . v_j - delta_i)``, ``dq_i = scale sum_j ds_ij k_j``,
    ``dk_j = scale sum_i ds_ij q_i``. When ``out``/``lse`` are the merged result over several key
    sets (context parallelism), calling this per key set and summing gives the exact gradient.
    Returns fp32 ``dq [B, H, S_q, D]``, ``dk, dv [B, H_kv, S_kv, D]``.
    """
    b, h, s, d = q.shape
    h_kv, s_kv = k.shape[1], k.shape[2]
    rep = h // h_kv
    acc = torch.promote_types(q.dtype, torch.float32)
    k_full = (k.repeat_interleave(rep, dim=1) if rep > 1 else k).to(acc)
    v_full = (v.repeat_interleave(rep, dim=1) if rep > 1 else v).to(acc)
    g = index.group_size
    tok, valid = gather_token_index(index)
    gq, kt = tok.shape[2], tok.shape[3]
    bi = torch.arange(b, device=q.device).view(b, 1, 1, 1)
    hi = torch.arange(h, device=q.device).view(1, h, 1, 1)
    qg = q.to(acc).view(b, h, gq, g, d)
    dog = do.to(acc).view(b, h, gq, g, d)
    lseg = lse.to(acc).view(b, h, gq, g)
    delta = (do.to(acc) * out.to(acc)).sum(-1).view(b, h, gq, g)
    dq = torch.empty(b, h, gq, g, d, dtype=acc, device=q.device)
    dk = torch.zeros(b, h, s_kv, d, dtype=acc, device=q.device)
    dv = torch.zeros(b, h, s_kv, d, dtype=acc, device=q.device)
    chunk = max(1, _CHUNK_ELEMS // max(1, b * h * kt * d))
    for g0 in range(0, gq, chunk):
        sl = slice(g0, g0 + chunk)
        t = tok[:, :, sl]
        keep = valid[:, :, sl].unsqueeze(-1)
        k_sel, v_sel = k_full[bi, hi, t].where(keep, 0.0), v_full[bi, hi, t].where(keep, 0.0)  # [B, H, c, Kt, D]
        scores = torch.einsum("bhgqd,bhgkd->bhgqk", qg[:, :, sl], k_sel) * scale
        pairs = pair_mask(index, t, valid[:, :, sl], g0)
        p = torch.exp(scores - lseg[:, :, sl].unsqueeze(-1)).masked_fill(~pairs, 0.0)
        dp = torch.einsum("bhgqd,bhgkd->bhgqk", dog[:, :, sl], v_sel)
        ds = (p * (dp - delta[:, :, sl].unsqueeze(-1))).masked_fill(~pairs, 0.0)
        dq[:, :, sl] = torch.einsum("bhgqk,bhgkd->bhgqd", ds, k_sel) * scale
        # padding scatters into token 0: add exact zeros there, even when a row is NaN
        dk_sel = (torch.einsum("bhgqk,bhgqd->bhgkd", ds, qg[:, :, sl]) * scale).where(keep, 0.0)
        dv_sel = torch.einsum("bhgqk,bhgqd->bhgkd", p, dog[:, :, sl]).where(keep, 0.0)
        flat = t.flatten(2).unsqueeze(-1).expand(-1, -1, -1, d)
        dk.scatter_add_(2, flat, dk_sel.flatten(2, 3))
        dv.scatter_add_(2, flat, dv_sel.flatten(2, 3))
    if rep > 1:
        dk, dv = dk.view(b, h_kv, rep, s_kv, d).sum(2), dv.view(b, h_kv, rep, s_kv, d).sum(2)
    return dq.view(b, h, s, d), dk, dv
