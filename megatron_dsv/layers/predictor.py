"""Low-rank predictor of pre-softmax attention scores, and its training loss.

Per head h the predictor maps queries and keys to rank r (default 16): ``q_lr = q W_q[h]``,
``k_lr = k W_k[h]``, and ``scale * q_lr . k_lr`` approximates ``scale * q . k``. The inputs are
detached, so the predictor never changes the model; its loss reaches only ``W_q`` and ``W_k``.

Initialisation: ``W_q = W_k = P`` with ``P`` Gaussian of variance ``1/r`` is a Johnson-Lindenstrauss
sketch, ``E[(qP).(kP)] = q.k``, so selection is meaningful from the first step and training only
has to sharpen it. Two inputs are supported: ``qk`` (project q/k themselves: RoPE-aware, local
to core attention) and ``hidden`` (project the layer input, the paper's variant).
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Exact-score rows processed per chunk in the loss, so the loss never holds [N, S] for all rows.
_LOSS_CHUNK_ELEMS = 1 << 25


class LowRankPredictor(nn.Module):
    """Per-head low-rank projections.

    Args:
        num_heads: query heads H on this rank.
        head_dim: D.
        rank: r.
        num_kv_heads: key heads (GQA); ``H % num_kv_heads == 0``. Each query head has its own key
            projection applied to its key head.
        input_dim: for the ``hidden`` variant, the layer's hidden size; None for ``qk``.
        head_offset, num_heads_total: this rank's first head and the layer's head count under
            tensor parallelism.
    """

    def __init__(
        self,
        num_heads: int,
        head_dim: int,
        rank: int,
        num_kv_heads: Optional[int] = None,
        input_dim: Optional[int] = None,
        device=None,
        dtype=torch.float32,
        head_offset: int = 0,
        num_heads_total: Optional[int] = None,
    ):
        super().__init__()
        self.num_heads, self.head_dim, self.rank = num_heads, head_dim, rank
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"{num_heads} query heads are not a multiple of {self.num_kv_heads} key heads.")
        self.input_dim = input_dim
        in_dim = head_dim if input_dim is None else input_dim
        # Drawn for all heads of the layer on the CPU and sliced to this rank's heads, so the
        # initial predictor is the same for every tensor-parallel size (as Megatron's CPU init).
        total = num_heads_total or num_heads
        sketch = torch.randn(total, in_dim, rank, dtype=torch.float32) / math.sqrt(rank)
        sketch = sketch[head_offset : head_offset + num_heads].to(device)
        self.weight_q = nn.Parameter(sketch.clone().to(dtype))
        self.weight_k = nn.Parameter(sketch.to(dtype))
        # Heads are split over tensor-parallel ranks, so each rank owns its heads' projections:
        # Megatron's checkpointing shards them along dim 0 (see sharded_state_dict).
        self.tp_group = None
        for p in (self.weight_q, self.weight_k):
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Megatron distributed checkpointing: weights sharded over TP ranks along heads."""
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight_q": 0, "weight_k": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )

    def project(self, q: torch.Tensor, k: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q [B, H, S, D]``, ``k [B, Hkv, S, D]`` -> ``q_lr, k_lr [B, H, S, r]`` (detached inputs)."""
        wq, wk = self.weight_q.to(q.dtype), self.weight_k.to(k.dtype)
        q_lr = torch.einsum("bhsd,hdr->bhsr", q.detach(), wq)
        rep = self.num_heads // self.num_kv_heads
        wk = wk.view(self.num_kv_heads, rep, -1, self.rank)
        k_lr = torch.einsum("bgsd,gjdr->bgjsr", k.detach(), wk).flatten(1, 2)
        return q_lr, k_lr

    def project_hidden(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x [B, S, input_dim]`` -> ``q_lr, k_lr [B, H, S, r]`` (the ``hidden`` variant)."""
        x = x.detach()
        q_lr = torch.einsum("bsi,hir->bhsr", x, self.weight_q.to(x.dtype))
        k_lr = torch.einsum("bsi,hir->bhsr", x, self.weight_k.to(x.dtype))
        return q_lr, k_lr


def _chunk_loss(pred: torch.Tensor, exact: torch.Tensor, cosine_weight: float) -> torch.Tensor:
    """Sum over rows of ``w (1 - cos) + (1 - w) relMSE`` of mean-centred score rows.

    Rows are centred because softmax ignores a per-row shift; the MSE is relative to the exact
    row's energy, so the loss is scale-free and the paper's 0.01 threshold keeps its meaning.
    """
    pred = pred - pred.mean(dim=-1, keepdim=True)
    exact = exact - exact.mean(dim=-1, keepdim=True)
    eps = 1e-6
    cos = (pred * exact).sum(-1) / (pred.norm(dim=-1) * exact.norm(dim=-1) + eps)
    rel_mse = (pred - exact).pow(2).sum(-1) / (exact.pow(2).sum(-1) + eps)
    return (cosine_weight * (1 - cos) + (1 - cosine_weight) * rel_mse).sum()


def _rows_loss(q_lr_rows, k_lr, q_rows, k, scale, cosine_weight):
    with torch.no_grad():
        exact = torch.einsum("bhnd,bhsd->bhns", q_rows.float(), k.float()) * scale
    pred = torch.einsum("bhnr,bhsr->bhns", q_lr_rows.float(), k_lr.float()) * scale
    return _chunk_loss(pred, exact, cosine_weight)


def predictor_loss(
    q_lr_rows: torch.Tensor,
    k_lr: torch.Tensor,
    q_rows: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    cosine_weight: float = 0.95,
) -> torch.Tensor:
    """Mean predictor loss over sampled query rows, computed in chunks of rows.

    Args:
        q_lr_rows: ``[B, H, N, r]`` predicted low-rank queries of the sampled rows (grad).
        k_lr: ``[B, H, S, r]`` low-rank keys (grad).
        q_rows: ``[B, H, N, D]`` exact queries of the sampled rows (detached).
        k: ``[B, H, S, D]`` exact keys (detached; GQA already expanded).
        scale: softmax scale.

    Each chunk is checkpointed, so autograd keeps only the inputs, not the ``[chunk, S]`` scores.
    """
    b, h, n, _ = q_rows.shape
    s = k.shape[2]
    chunk = max(1, _LOSS_CHUNK_ELEMS // max(1, b * h * s))
    total = q_lr_rows.new_zeros((), dtype=torch.float32)
    q_rows, k = q_rows.detach(), k.detach()
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        total = total + checkpoint(
            _rows_loss, q_lr_rows[:, :, sl], k_lr, q_rows[:, :, sl], k, scale, cosine_weight,
            use_reentrant=False,
        )
    return total / (b * h * n)
