"""Sampled exact attention: per-head sparsity at the critical mass and predictor recall.

On every ``stride``-th query (offset rotating with the iteration) the exact softmax row over all
keys is computed in chunks of rows (never ``S x S`` at once). Per row:

* sparsity = 1 - (smallest number of keys holding ``critical_mass`` of the row's mass) / S;
* recall = exact attention mass on the keys the row's query group selected.

Both are averaged over the sampled rows per (batch, head). The EMA across iterations is kept by
the caller (the stage controller), so a recomputed forward cannot count an iteration twice.
"""

from __future__ import annotations

from typing import Dict, Optional

import torch

from megatron_dsv.ops.sparse_attention.naive import gather_token_index
from megatron_dsv.ops.sparse_index import SparseIndex

_CHUNK_ELEMS = 1 << 25


def sample_rows(seq_len: int, stride: int, offset: int, device=None) -> torch.Tensor:
    """Query rows ``offset % stride, offset % stride + stride, ...`` (int64)."""
    return torch.arange(offset % stride, seq_len, stride, device=device)


@torch.no_grad()
def sampled_attention_stats(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    critical_mass: float,
    row_groups: Optional[torch.Tensor] = None,
    index: Optional[SparseIndex] = None,
) -> Dict[str, torch.Tensor]:
    """Sparsity (and recall when ``index`` is given) of sampled query rows.

    Args:
        q_rows: ``[B, H, N, D]`` queries of the sampled rows.
        k: ``[B, H, S, D]`` all keys (GQA expanded).
        row_groups: int64 ``[N]`` group of ``index`` that each sampled row belongs to.
        index: the selection of the rows' query groups.

    Returns:
        ``{"sparsity": [B, H], "recall": [B, H]}`` in fp32 (recall only with ``index``).
    """
    b, h, n, _ = q_rows.shape
    s = k.shape[2]
    chunk = max(1, _CHUNK_ELEMS // max(1, b * h * s))
    kf = k.float()
    need = torch.empty(b, h, n, device=k.device)
    recall = torch.empty(b, h, n, device=k.device) if index is not None else None
    if index is not None:
        tok, valid = gather_token_index(index)
        tok = tok.masked_fill(~valid, s)  # padding scatters into a spare column
    for i in range(0, n, chunk):
        p = torch.softmax(torch.einsum("bhnd,bhsd->bhns", q_rows[:, :, i : i + chunk].float(), kf) * scale, -1)
        csum = p.sort(dim=-1, descending=True).values.cumsum(-1)
        need[:, :, i : i + chunk] = (csum < critical_mass).sum(-1).float() + 1
        if index is not None:
            groups = row_groups[i : i + chunk]
            sel = torch.zeros(b, h, groups.numel(), s + 1, device=k.device, dtype=p.dtype)
            sel.scatter_(-1, tok[:, :, groups], 1.0)
            recall[:, :, i : i + chunk] = (p * sel[..., :s]).sum(-1)
    out = {"sparsity": 1.0 - need.clamp(max=s).mean(-1) / s}
    if recall is not None:
        out["recall"] = recall.mean(-1)
    return out
