"""Plain-PyTorch reference for attention over a SparseIndex (the definition of correct).

Every query of group g attends, with softmax, to the keys of the units listed for g:
``out_i = sum_j softmax_j(scale * q_i . k_j) v_j`` over ``j`` in the group's key set, and
``lse_i = log sum_j exp(scale * q_i . k_j)`` (natural log), which lets context parallelism merge
partial results. Computed in fp32 (fp64 for fp64 inputs, for gradient checks) by gathering each group's keys; memory is ``S x K x D``, never
``S x S``. Autograd provides the backward.
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
        k_sel = k[bi, hi, t].to(acc)  # [B, H, c, Kt, D]
        v_sel = v[bi, hi, t].to(acc)
        scores = torch.einsum("bhgqd,bhgkd->bhgqk", qg[:, :, g0 : g0 + chunk], k_sel) * scale
        scores = scores.masked_fill(~valid[:, :, g0 : g0 + chunk].unsqueeze(3), float("-inf"))
        lse = torch.logsumexp(scores, dim=-1)
        p = torch.exp(scores - lse.unsqueeze(-1))
        outs.append(torch.einsum("bhgqk,bhgkd->bhgqd", p, v_sel))
        lses.append(lse)
    out = torch.cat(outs, dim=2).reshape(b, h, s, d).to(q.dtype)
    return out, torch.cat(lses, dim=2).reshape(b, h, s).float()


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
