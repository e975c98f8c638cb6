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
from typing import Optional, Sequence, Tuple

import torch.distributed as dist

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

# Exact-score rows per chunk in the reference loss, so it never holds [N, S] for all rows.
_LOSS_CHUNK_ELEMS = 1 << 25

# Megatron's optimizer clips parameters tagged with a registered ``grad_norm_group`` by their own
# norm and leaves them out of the model's norm (its mechanism for MTP heads). Without this the
# predictor's gradients enter the model's --clip-grad norm, which shrinks the model's updates in
# stage 1 and makes a DSV run diverge from its dense baseline before any layer goes sparse.
GRAD_NORM_GROUP = "dsv_predictor"


def register_grad_norm_group() -> bool:
    """Register :data:`GRAD_NORM_GROUP` with Megatron's optimizer (idempotent); False when this
    megatron-core has no separate grad-norm groups (the predictor then shares the model's norm)."""
    try:
        from megatron.core.optimizer import optimizer as mopt
    except ImportError:  # pragma: no cover - ops-only use without Megatron
        return False
    groups = getattr(mopt, "SEPARATE_GRAD_NORM_GROUPS", None)
    if groups is None:
        return False
    if GRAD_NORM_GROUP not in groups:
        mopt.SEPARATE_GRAD_NORM_GROUPS = tuple(groups) + (GRAD_NORM_GROUP,)
    return True


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
        seed: of the sketch's private generator (default: ``torch.initial_seed()``).
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
        seed: Optional[int] = None,
    ):
        super().__init__()
        self.num_heads, self.head_dim, self.rank = num_heads, head_dim, rank
        self.num_kv_heads = num_kv_heads or num_heads
        if num_heads % self.num_kv_heads:
            raise ValueError(f"{num_heads} query heads are not a multiple of {self.num_kv_heads} key heads.")
        self.input_dim = input_dim
        in_dim = head_dim if input_dim is None else input_dim
        # Drawn for all heads of the layer on the CPU and sliced to this rank's heads, so the
        # initial predictor is the same for every tensor-parallel size (as Megatron's CPU init),
        # from its own generator, so adding DSV does not shift the model's initialisation: a
        # dense baseline and a DSV run from one seed start from the same weights.
        total = num_heads_total or num_heads
        gen = torch.Generator().manual_seed(torch.initial_seed() if seed is None else seed)
        sketch = torch.randn(total, in_dim, rank, dtype=torch.float32, generator=gen) / math.sqrt(rank)
        sketch = sketch[head_offset : head_offset + num_heads].to(device)
        self.weight_q = nn.Parameter(sketch.clone().to(dtype))
        self.weight_k = nn.Parameter(sketch.to(dtype))
        # Heads are split over tensor-parallel ranks, so each rank owns its heads' projections:
        # Megatron's checkpointing shards them along dim 0 (see sharded_state_dict).
        self.tp_group = None
        separate = register_grad_norm_group()
        for p in (self.weight_q, self.weight_k):
            p.tensor_model_parallel, p.partition_dim, p.partition_stride = True, 0, 1
            if separate:
                p.grad_norm_group = GRAD_NORM_GROUP

    def sharded_state_dict(self, prefix: str = "", sharded_offsets=(), metadata=None):
        """Megatron distributed checkpointing: weights sharded over TP ranks along heads."""
        from megatron.core.transformer.utils import ensure_metadata_has_dp_cp_group, make_sharded_tensors_for_checkpoint

        metadata = ensure_metadata_has_dp_cp_group(metadata)
        state = self.state_dict(prefix="", keep_vars=True)
        return make_sharded_tensors_for_checkpoint(
            state, prefix, {"weight_q": 0, "weight_k": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=metadata["dp_cp_group"],
        )

    def weights(self, heads: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``W_q, W_k`` of all heads, or of ``heads`` (a context-parallel rank's head slot)."""
        if heads is None:
            return self.weight_q, self.weight_k
        idx = torch.as_tensor(list(heads), dtype=torch.long, device=self.weight_q.device)
        return self.weight_q.index_select(0, idx), self.weight_k.index_select(0, idx)

    def project_queries(
        self, x: torch.Tensor, dtype: Optional[torch.dtype] = None, heads: Optional[Sequence[int]] = None
    ) -> torch.Tensor:
        """Low-rank queries ``[B, H, S, r]`` from q ``[B, H, S, D]`` (``qk`` input) or the layer
        input ``[B, S, input_dim]`` (``hidden``), detached, computed in ``dtype`` (default x's);
        ``heads``: the query heads ``x`` holds (default all)."""
        dtype = dtype or x.dtype
        eq = "bhsd,hdr->bhsr" if self.input_dim is None else "bsi,hir->bhsr"
        return torch.einsum(eq, x.detach().to(dtype), self.weights(heads)[0].to(dtype))

    def project(
        self, q: torch.Tensor, k: torch.Tensor, heads: Optional[Sequence[int]] = None
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``q [B, H, S, D]``, ``k [B, Hkv, S, D]`` -> ``q_lr, k_lr [B, H, S, r]`` (detached inputs).

        ``heads``: the query heads q holds (default all); q head ``i`` reads key head
        ``i // (len(heads) / Hkv)`` of ``k``, the layout the head all-to-all produces."""
        n_heads = self.num_heads if heads is None else len(heads)
        rep = n_heads // k.shape[1]
        wk = self.weights(heads)[1].to(k.dtype).view(k.shape[1], rep, -1, self.rank)
        k_lr = torch.einsum("bgsd,gjdr->bgjsr", k.detach(), wk).flatten(1, 2)
        return self.project_queries(q, heads=heads), k_lr

    def project_hidden(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``x [B, S, input_dim]`` -> ``q_lr, k_lr [B, H, S, r]`` (the ``hidden`` variant)."""
        k_lr = torch.einsum("bsi,hir->bhsr", x.detach(), self.weight_k.to(x.dtype))
        return self.project_queries(x), k_lr


def centered_gram(a: torch.Tensor, b: torch.Tensor, chunk: int = 8192, group=None) -> torch.Tensor:
    """``sum_j (a_j - mean a)(b_j - mean b)^T`` over the sequence axis, fp32, no grad.

    ``a [B, G, S, Da]``, ``b [B, G or 1, S, Db]`` -> ``[B, G, Da, Db]``; chunked over S so the fp32
    copies stay small (8192 tokens x 16 heads x 128 x 4 B = 64 MiB). With ``group`` (context
    parallelism) the sequence is the concatenation of every rank's chunk: means and sums are
    all-reduced (two small collectives), so every rank gets the whole sequence's Gram matrix.
    """
    acc = torch.promote_types(a.dtype, torch.float32)  # fp64 inputs stay fp64 (tests)
    with torch.no_grad():
        sums = [a.to(acc).sum(2, keepdim=True), b.to(acc).sum(2, keepdim=True)]
        n = a.shape[2]
        if group is not None:
            flat = torch.cat([t.flatten() for t in sums])
            dist.all_reduce(flat, group=group)
            sums = [t.view_as(s) for t, s in zip(flat.split([s.numel() for s in sums]), sums)]
            n *= dist.get_world_size(group)
        mean_a, mean_b = sums[0] / n, sums[1] / n
        out = None
        for i in range(0, a.shape[2], chunk):
            a_c = a[:, :, i : i + chunk].to(acc) - mean_a
            b_c = b[:, :, i : i + chunk].to(acc) - mean_b
            part = a_c.transpose(-1, -2) @ b_c
            out = part if out is None else out + part
        if group is not None:
            dist.all_reduce(out, group=group)
        return out


def row_loss_from_sums(pe, ee, pp, cosine_weight: float) -> torch.Tensor:
    """Per-row ``w (1 - cos) + (1 - w) relMSE`` from the centred sums ``pe = sum p_c e_c``,
    ``ee = sum e_c^2``, ``pp = sum p_c^2``."""
    eps = 1e-6
    cos = pe / (torch.sqrt(pp.clamp(min=0) * ee.clamp(min=0)) + eps)
    rel_mse = (pp - 2 * pe + ee) / (ee + eps)
    return cosine_weight * (1 - cos) + (1 - cosine_weight) * rel_mse


def predictor_loss(
    predictor: LowRankPredictor,
    q_rows: torch.Tensor,
    u_rows: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    cosine_weight: float = 0.95,
    x: Optional[torch.Tensor] = None,
    heads: Optional[Sequence[int]] = None,
    group=None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Mean predictor loss over sampled query rows against all keys, without any ``[N, S]`` scores.

    Per row, with exact scores ``e_j = c q.k_j`` and predicted ``p_j = c u.w_j`` (``w_j`` the
    low-rank key), mean-centred over keys: ``cos = sum p e / |p| |e|`` and the relative MSE
    ``sum (p - e)^2 / sum e^2`` (see :func:`predictor_loss_reference`). All three sums are
    quadratic forms of small Gram matrices of the centred keys: with ``G = K_c^T K_c`` ([D, D]
    per head), ``sum e^2 = c^2 q G q``, ``sum p e = c^2 q G W_k u`` and
    ``sum p^2 = c^2 u W_k^T G W_k u`` (for the ``hidden`` input, ``K_c^T X_c`` and ``X_c^T X_c``
    replace G). Cost ``S D^2`` per head instead of ``N S D``, and the gradient reaches W_q (via u)
    and W_k through [D, r] matrices: measured on an H100, 2 layers, 64k tokens, the direct form
    made a stage-1 step 3.1x slower than dense.

    Args:
        predictor: the layer's predictor (its ``weight_k`` gets gradient).
        q_rows: ``[B, H, N, D]`` exact queries of the sampled rows (detached).
        u_rows: ``[B, H, N, r]`` their predicted low-rank queries (grad to ``weight_q``).
        k: ``[B, H_kv, S, D]`` exact keys (detached).
        x: ``[B, S, in]`` layer input for the ``hidden`` predictor variant.
        heads: the query heads ``q_rows`` holds (a context-parallel head slot), default all.
        group: the sequence group when ``k`` is one chunk of the sequence (context parallelism):
            the Gram matrices are summed over it, so each row is scored against every key.
        reduction: ``"mean"`` over rows and heads, or ``"sum"`` (the caller normalises).
    """
    h = predictor.num_heads if heads is None else len(heads)
    kv_of_head = torch.arange(h, device=k.device) // (h // k.shape[1])
    g_kk = centered_gram(k, k, group=group)[:, kv_of_head]  # [B, H, D, D]
    acc = g_kk.dtype
    wk = predictor.weights(heads)[1].to(acc)
    if x is None:
        g_kw = g_kk @ wk  # [B, H, D, r]
        g_ww = wk.transpose(-1, -2) @ g_kw
    else:
        g_kx = centered_gram(k, x.unsqueeze(1))[:, kv_of_head]  # [B, H, D, in]
        g_xx = centered_gram(x.unsqueeze(1), x.unsqueeze(1))  # [B, 1, in, in]
        g_kw = g_kx @ wk
        g_ww = wk.transpose(-1, -2) @ g_xx @ wk
    q, u = q_rows.detach().to(acc), u_rows.to(acc)
    c2 = scale * scale
    ee = c2 * ((q @ g_kk) * q).sum(-1)
    pe = c2 * ((q @ g_kw) * u).sum(-1)
    pp = c2 * ((u @ g_ww) * u).sum(-1)
    rows = row_loss_from_sums(pe, ee, pp, cosine_weight)
    return rows.sum() if reduction == "sum" else rows.mean()


def _chunk_loss(pred: torch.Tensor, exact: torch.Tensor, cosine_weight: float) -> torch.Tensor:
    pred = pred - pred.mean(dim=-1, keepdim=True)
    exact = exact - exact.mean(dim=-1, keepdim=True)
    pe, ee, pp = (pred * exact).sum(-1), exact.pow(2).sum(-1), pred.pow(2).sum(-1)
    return row_loss_from_sums(pe, ee, pp, cosine_weight).sum()


def _rows_loss(q_lr_rows, k_lr, q_rows, k, scale, cosine_weight):
    with torch.no_grad():
        exact = torch.einsum("bhnd,bhsd->bhns", q_rows.float(), k.float()) * scale
    pred = torch.einsum("bhnr,bhsr->bhns", q_lr_rows.float(), k_lr.float()) * scale
    return _chunk_loss(pred, exact, cosine_weight)


def predictor_loss_reference(
    q_lr_rows: torch.Tensor,
    k_lr: torch.Tensor,
    q_rows: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    cosine_weight: float = 0.95,
) -> torch.Tensor:
    """The predictor loss computed directly from ``[N, S]`` score rows (the definition).

    Rows are centred because softmax ignores a per-row shift; the MSE is relative to the exact
    row's energy, so the loss is scale-free and the paper's 0.01 threshold keeps its meaning.

    Args:
        q_lr_rows: ``[B, H, N, r]`` predicted low-rank queries of the sampled rows (grad).
        k_lr: ``[B, H, S, r]`` low-rank keys (grad).
        q_rows: ``[B, H, N, D]`` exact queries of the sampled rows (detached).
        k: ``[B, H, S, D]`` exact keys (detached; GQA already expanded).
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
