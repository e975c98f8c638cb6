"""Low-rank predictor of pre-softmax attention scores, and its training loss.

Per head h the predictor maps queries and keys to rank r (default 16): ``q_lr = q W_q[h]``,
``k_lr = k W_k[h]``, and ``scale * q_lr . k_lr`` approximates ``scale * q . k``. The inputs are
detached, so the predictor never changes the model; its loss reaches only ``W_q`` and ``W_k``.

Initialisation: ``W_q = W_k = P`` with ``P`` Gaussian of variance ``1/r`` is a Johnson-Lindenstrauss
sketch, ``E[(qP).(kP)] = q.k``, so selection is meaningful from the first step and training only
has to sharpen it. Two inputs are supported: ``qk`` (project q/k themselves: RoPE-aware, local
to core attention) and ``hidden`` (project the layer input, the paper's variant).

Closed-form fit (``qk`` input): the relative-MSE part of the loss summed over rows is a quadratic
form in ``A = W_q W_k^T``, ``tr((A - I) G (A - I)^T C_q)`` with ``G`` the centred key Gram and
``C_q`` the rows' weighted second moment, so the best rank-r ``A`` is a truncated SVD in the
metric whitened by ``C_q^{1/2}`` and ``G^{1/2}`` (:func:`reduced_rank_fit`, a ``[D, D]`` problem
per head). :meth:`LowRankPredictor.accumulate_moments` sums the moments without autograd and
:meth:`LowRankPredictor.refit` writes the optimum into the weights.

Causal masks (``ops/mask.CausalMask``): a row may read only the keys ``0 .. limit(i)``, a prefix
of the sequence, so its scores are centred over that prefix and its Gram is the prefix's centred
Gram. The loss and the moments then group the sampled rows by prefix (one segment per distinct
``limit``: one per chunk for chunk-causal, one per row for token-causal) and build each segment's
Gram incrementally (:func:`prefix_centered_grams`, every key read once, ``S D^2`` per head plus
``D^2`` per segment). A segment enters the moments as a sample does (Kronecker approximation
across segments, exact when every sampled row shares one prefix). The segments are batched
(:func:`mask_segments`, one host read; :func:`prefix_centered_grams` and :func:`segment_row_blocks`,
blocks of :func:`block_elems`): the ops launched do not grow with the segments. The per-segment
loop before ran one ``nonzero`` (a host sync) and 70-90 ops per segment and statistic (issue 19
measured ~6 s for a token-causal profiling iteration on an H200 against ~55 ms for a plain one: 8
layers, 16k tokens, 512 rows). At 4096 tokens, 512 sampled rows, 4 heads of 64, one CPU thread
(measured), the loss with its backward takes 7.5 ms chunk-causal (8 chunks) and 47 ms
token-causal (512 segments), 5.4 / 203 ms with the per-segment loop; the moments 8.5 / 41 ms,
6.4 / 80 ms before. The layer passes only sampled rows with a ranking choice
(``CausalMask.rows_with_choice``): a row whose keys all lie in units its group always keeps has
nothing to fit, and one reading 2 keys made a layer's gradient 33x another's.
"""

from __future__ import annotations

import bisect
import contextlib
import itertools
import math
from dataclasses import dataclass
from typing import Iterator, List, Optional, Sequence, Tuple

import torch.distributed as dist

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from megatron_dsv.ops.eigh import batched_eigh
from megatron_dsv.ops.mask import CausalMask

# Exact-score rows per chunk in the reference loss, so it never holds [N, S] for all rows.
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
        # Summed score moments for the closed-form refit (None until accumulate_moments); a plain
        # attribute, not a buffer, so Megatron's bf16 cast of the module leaves them in fp64.
        self.moments: Optional[ScoreMoments] = None
        # Device index of a CP rank's head slot, per (heads, device): built once, so a projection
        # under context parallelism copies nothing from the host (a pageable copy syncs the host).
        self._head_index: dict = {}
        # Clipping by their own gradient norm (Megatron's grad_norm_group) is applied by the
        # runtime: megatron_dsv.runtime.lr.separate_predictor_grad_norm.
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

    def weights(self, heads: Optional[Sequence[int]] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """``W_q, W_k`` of all heads, or of ``heads`` (a context-parallel rank's head slot)."""
        if heads is None:
            return self.weight_q, self.weight_k
        key = (tuple(heads), self.weight_q.device)
        idx = self._head_index.get(key)
        if idx is None:
            idx = self._head_index[key] = torch.as_tensor(key[0], dtype=torch.long, device=key[1])
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

    def _check_closed_form(self) -> None:
        if self.input_dim is not None:
            raise ValueError(
                "the closed-form predictor fit needs the 'qk' predictor input (it fits q W_q (k W_k)^T "
                "to q k^T); use --dsv-predictor-input qk, or train the 'hidden' predictor by gradient."
            )

    @torch.no_grad()
    def accumulate_moments(
        self,
        q_rows: torch.Tensor,
        k: torch.Tensor,
        heads: Optional[Sequence[int]] = None,
        group=None,
        decay: float = 1.0,
        *,
        mask: Optional[CausalMask] = None,
        rows: Optional[torch.Tensor] = None,
    ) -> "ScoreMoments":
        """Add the score moments of sampled rows to :attr:`moments` (no autograd, fp64).

        Args:
            q_rows: ``[B, H', N, D]`` exact queries of the sampled rows (``H'`` = ``len(heads)``).
            k: ``[B, H_kv, S, D]`` exact keys; query head ``i`` of ``heads`` reads key head
                ``i // (H' / H_kv)`` (the layout of :meth:`project`).
            heads: the query heads ``q_rows`` holds (a context-parallel head slot), default all;
                the other heads get nothing.
            group: the sequence group when ``k`` is one chunk of the sequence (as in
                :func:`predictor_loss`): the key Gram is the whole sequence's.
            decay: the stored moments are multiplied by this first (1: plain sum; < 1: an
                exponential average that follows a drifting model in stage 2).
            mask, rows: the layer's causal mask and the sampled rows' positions (int64 ``[N]``):
                each row is scored against the keys it may read only (:func:`score_moments`).
        """
        self._check_closed_form()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"decay must be in [0, 1], got {decay}.")
        n_heads = self.num_heads if heads is None else len(heads)
        if q_rows.dim() != 4 or q_rows.shape[1] != n_heads or q_rows.shape[3] != self.head_dim:
            raise ValueError(
                f"q_rows must be [B, {n_heads}, N, {self.head_dim}] for these heads; got {tuple(q_rows.shape)}."
            )
        part = score_moments(q_rows, k, group=group, mask=mask, rows=rows)
        if heads is not None:
            idx = torch.as_tensor(list(heads), dtype=torch.long, device=part.c_q.device)
            part = ScoreMoments.zeros(self.num_heads, self.head_dim, part.c_q.device).index_add(idx, part)
        self.moments = part if self.moments is None else self.moments.scaled(decay) + part
        return self.moments

    def reset_moments(self) -> None:
        self.moments = None

    @torch.no_grad()
    def refit(self, eps: float = 1e-6, group=None, reset: bool = True) -> torch.Tensor:
        """Replace ``W_q, W_k`` by the closed-form optimum of the accumulated moments, in place.

        Heads without sampled rows (or whose rows' scores do not vary, or whose moments are not
        finite) keep their weights. The factors are balanced so that the low-rank queries and keys
        have columns of equal RMS (bf16/fp16 range), and are written in the weights' dtype and
        device. Runs on the moments' device with batched ops and no host synchronisation
        (:func:`reduced_rank_fit`, warm-started from the current weights): every head is fitted,
        the heads that must keep their weights are fitted to a stand-in (identity) moment and
        their weights written back unchanged.

        Args:
            eps: ridge, relative to the mean eigenvalue of each moment (``C + eps tr(C)/D I``).
            group: sum the moments over this group first (the context-parallel group, whose ranks
                hold different rows and head slots); every rank then writes the same weights.
            reset: clear the moments afterwards (the next fit sees only new rows).

        Returns:
            fp64 ``[H]`` on the moments' device: the fit's residual, the fraction of the rows'
            weighted centred score energy the rank-r fit misses (the rows' mean relative MSE for
            one sample); NaN for heads that kept their weights.
        """
        self._check_closed_form()
        if self.moments is None:
            raise RuntimeError("refit needs accumulate_moments first: no score moments are stored.")
        m = self.moments if group is None else self.moments.all_reduce(group)
        trace = lambda c: c.diagonal(dim1=-2, dim2=-1).sum(-1)
        # Heads whose moments are not finite (NaN/Inf in this iteration's q or k) keep their weights.
        finite = torch.isfinite(m.c_q).flatten(1).all(-1) & torch.isfinite(m.c_k).flatten(1).all(-1)
        fit = (m.rows > 0) & (trace(m.c_q) > 0) & (trace(m.c_k) > 0) & finite
        heads = torch.arange(self.num_heads, device=m.c_q.device)
        c_q, c_k = m.balanced_metrics(heads)
        eye = torch.eye(self.head_dim, dtype=torch.float64, device=m.c_q.device)
        keep = ~fit.view(-1, 1, 1)
        c_q, c_k = torch.where(keep, eye, c_q), torch.where(keep, eye, c_k)
        start = self.weight_q.detach().to(device=m.c_q.device, dtype=torch.float64)
        with _one_cpu_thread(m.c_q.device):
            w_q, w_k, res = reduced_rank_fit(c_q, c_k, start, eps)
        ok = fit & torch.isfinite(res) & torch.isfinite(w_q).flatten(1).all(-1) & torch.isfinite(w_k).flatten(1).all(-1)
        residual = torch.where(ok, res, float("nan"))
        ok = ok.to(self.weight_q.device).view(-1, 1, 1)
        for weight, new in ((self.weight_q, w_q), (self.weight_k, w_k)):
            weight.copy_(torch.where(ok, new.to(weight.device, weight.dtype), weight))
        if reset:
            self.moments = None
        return residual


def centered_gram(
    a: torch.Tensor, b: torch.Tensor, chunk: int = 8192, group=None, dtype: Optional[torch.dtype] = None
) -> torch.Tensor:
    """``sum_j (a_j - mean a)(b_j - mean b)^T`` over the sequence axis, fp32 (or ``dtype``), no grad.

    ``a [B, G, S, Da]``, ``b [B, G or 1, S, Db]`` -> ``[B, G, Da, Db]``; chunked over S so the fp32
    copies stay small (8192 tokens x 16 heads x 128 x 4 B = 64 MiB). With ``group`` (context
    parallelism) the sequence is the concatenation of every rank's chunk: means and sums are
    all-reduced (two small collectives), so every rank gets the whole sequence's Gram matrix.
    """
    acc = dtype or torch.promote_types(a.dtype, torch.float32)  # fp64 inputs stay fp64 (tests)
    with torch.no_grad():
        sums = [a.sum(2, keepdim=True, dtype=acc), b.sum(2, keepdim=True, dtype=acc)]
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


@dataclass(frozen=True)
class MaskSegments:
    """Sampled rows grouped by the key prefix they may read (one segment per distinct prefix end).

    Attributes:
        ends: ascending distinct prefix ends (host ints): segment ``j``'s rows read keys ``[0, ends[j])``.
        starts: host ints ``[M + 1]``: segment ``j``'s rows are ``order[starts[j]:starts[j + 1]]``.
        order: int64 ``[N]`` on the rows' device: indices into ``rows``, sorted by prefix end.
        segment: int64 ``[N]`` on the rows' device: the segment of ``rows[order[i]]``.
        slot: int64 ``[N]`` on the rows' device: the rank of ``rows[order[i]]`` in its segment.
        device_ends: int64 ``[M]`` on the rows' device: ``ends`` (no host-to-device copy, which
            synchronises on CUDA).
    """

    ends: Tuple[int, ...]
    starts: Tuple[int, ...]
    order: torch.Tensor
    segment: torch.Tensor
    slot: torch.Tensor
    device_ends: torch.Tensor

    def __len__(self) -> int:
        return len(self.ends)

    def rows_per_segment_times_end(self) -> int:
        """``sum_j |segment j| * ends[j]``: the keys the rows read, summed over rows (host int)."""
        return sum((b - a) * e for a, b, e in zip(self.starts, self.starts[1:], self.ends))


def mask_segments(mask: CausalMask, rows: torch.Tensor, seq_len: int) -> MaskSegments:
    """Sampled rows grouped by the key prefix they may read (:class:`MaskSegments`).

    One sort on the device and one host read (the rows' range and their sorted ends): the only
    host synchronisation. Building one ``nonzero`` per segment instead synchronised once per
    sampled row under a token-causal mask (512 per layer and statistic at 16k tokens, stride 32).

    Raises unless ``rows`` is an int64 ``[N]`` of positions in ``[0, seq_len)``."""
    if rows is None or rows.dim() != 1 or rows.dtype != torch.int64:
        raise ValueError("a masked predictor statistic needs the sampled rows' positions: rows=int64 [N].")
    ends = (mask.limit(rows) + 1).clamp(max=seq_len)
    sorted_ends, order = torch.sort(ends, stable=True)
    new = torch.ones_like(sorted_ends, dtype=torch.bool)
    new[1:] = sorted_ends[1:] != sorted_ends[:-1]
    segment = new.long().cumsum(0) - 1
    place = torch.arange(rows.numel(), device=rows.device)
    slot = place - torch.where(new, place, 0).cummax(0).values
    if not rows.numel():
        return MaskSegments((), (0,), order, segment, slot, sorted_ends)
    lo, hi, *host = torch.cat([rows.min().view(1), rows.max().view(1), sorted_ends]).tolist()
    if lo < 0 or hi >= seq_len:
        raise ValueError(f"row positions must lie in [0, {seq_len}) (the keys' sequence); got [{lo}, {hi}].")
    firsts = [i for i in range(len(host)) if i == 0 or host[i] != host[i - 1]]
    uniq = tuple(host[i] for i in firsts)
    # [M] distinct ends on the device without a boolean index (which synchronises): every row of
    # a segment writes the same value.
    device_ends = sorted_ends.new_zeros(len(uniq)).scatter_(0, segment, sorted_ends)
    return MaskSegments(uniq, tuple(firsts) + (len(host),), order, segment, slot, device_ends)


def block_elems(device) -> int:
    """Elements of one block of per-run (or per-row) Gram matrices in the masked statistics.

    CUDA: 2^24 (128 MiB in fp64), few blocks, since every op is a kernel launch. CPU: 2^17, blocks
    that stay in cache (4 heads of 64, 4096 tokens, 512 token-causal rows, one thread, measured:
    the loss with its backward 47 ms and the moments 41 ms with 2^17; 77 / 60 ms with 2^16, 136 /
    192 ms with 2^20; chunk-causal, 8 chunks: 7.5 / 8.5 ms with 2^17, 9.6 / 10.2 ms with 2^16)."""
    return 1 << 24 if torch.device(device).type == "cuda" else 1 << 17


def prefix_centered_grams(
    tensors: Sequence[torch.Tensor],
    pairs: Sequence[Tuple[int, int]],
    ends: Sequence[int],
    dtype: torch.dtype,
    group=None,
    *,
    device_ends: Optional[torch.Tensor] = None,
    piece: Optional[int] = None,
    max_elems: Optional[int] = None,
) -> Iterator[Tuple[int, int, List[torch.Tensor]]]:
    """Centred Grams of the prefixes ``[0, end)`` for ascending ``ends``, in blocks: yields
    ``(j0, j1, grams)`` with ``grams`` one ``[B, G, j1 - j0, Da, Db]`` per ``(a, b)`` of ``pairs``
    (indices into ``tensors``, each ``[B, G or 1, S, D_t]``) for ``ends[j0:j1]``; the blocks cover
    ``ends`` in order. Each Gram is :func:`centered_gram` of its prefix; no grad.

    Every token is read once, in runs between consecutive ends cut into pieces of at most
    ``piece`` tokens (default: the mean run length, so there are at most twice as many pieces as
    ends), batched: each piece's mean and Gram about that mean, and the prefixes as cumulative sums
    of Chan et al.'s update (:meth:`_Moments.then_each`), carried from one block of pieces to the
    next. Every term is relative to a piece's own mean, so a short prefix's Gram keeps its
    precision even when its keys sit far from the sequence's mean (early RoPE'd keys do): with sums
    about one sequence-wide shift instead, fp32 put rounding noise the size of ``1e-7 |k -
    shift|^2`` into the Grams of the first few keys of a token-causal sequence (zero exactly), and
    a CP = 2 block's predictor gradient differed from the single-process one by 2e-4 of its largest
    entry. A block holds at most ``max_elems`` elements of Grams (and of gathered tokens; default
    :func:`block_elems`), so the Python steps and kernel launches grow with the blocks, not with the
    ends (one ``nonzero`` and about 90 ops per token-causal end before), and nothing synchronises
    with the host.

    With ``group`` (context parallelism) the tensors are this rank's shard of a sequence split
    into equal contiguous shards in the group's rank order (rank ``p`` holds tokens ``[p*S, (p+1)*S)``),
    and ``ends`` are positions in the whole sequence, each inside this rank's shard
    (``p*S < end <= (p+1)*S``) or on a shard boundary (a multiple of ``S``): what the sampled rows of
    the shard need under a mask that :meth:`CausalMask.check_shards` accepts. Every shard's means
    and Grams are all-gathered once (``D^2`` numbers per head and shard), so a prefix's Gram is the
    earlier shards' merged with this shard's running one. The collective runs when this function
    is called, on every rank, whether or not it has ends.

    ``device_ends``: ``ends`` as int64 ``[M]`` on the tensors' device (:attr:`MaskSegments.device_ends`);
    without it they are copied there (a host synchronisation on CUDA)."""
    ends = [int(e) for e in ends]
    if any(b <= a for a, b in zip(ends, ends[1:])) or (ends and ends[0] < 1):
        raise ValueError(f"prefix ends must be ascending and >= 1, got {ends}.")
    if piece is not None and piece < 1:
        raise ValueError(f"piece must be >= 1 token, got {piece}.")
    device = tensors[0].device
    max_elems = block_elems(device) if max_elems is None else max_elems
    if max_elems < 1:
        raise ValueError(f"max_elems must be >= 1, got {max_elems}.")
    if device_ends is not None and (device_ends.shape != (len(ends),) or device_ends.device != device):
        raise ValueError(f"device_ends must be [{len(ends)}] on {device}, got {tuple(device_ends.shape)} on {device_ends.device}.")
    s = tensors[0].shape[2]
    n_shards = 1 if group is None else dist.get_world_size(group)
    me = 0 if group is None else dist.get_rank(group)
    total, lo = s * n_shards, me * s
    outside = [e for e in ends if not (lo < e <= lo + s) and (e % s or e > total)]
    if outside:
        raise ValueError(
            f"prefix ends {outside} lie neither in this shard's tokens ({lo}, {lo + s}] nor on a shard "
            f"boundary (a multiple of {s} up to {total}): the mask cuts a sequence shard (see CausalMask.check_shards)."
        )
    shape = _RunShape.of(tensors, pairs)
    cum: List[Optional[_Moments]] = [None]  # cum[p]: the tokens [0, p*S)
    if group is not None:
        with torch.no_grad():
            own = _shard_moments(tensors, pairs, dtype, shape, max_elems)
            fields = own.means + own.grams
            flat = torch.cat([x.flatten() for x in fields])
            gathered = [torch.empty_like(flat) for _ in range(n_shards)]
            dist.all_gather(gathered, flat, group=group)
            for part in gathered:
                views = [x.view_as(y) for x, y in zip(part.split([y.numel() for y in fields]), fields)]
                shard = _Moments(own.n, views[: len(tensors)], views[len(tensors):])
                cum.append(shard if cum[-1] is None else cum[-1].merge(shard, pairs))
    if device_ends is None:
        device_ends = torch.tensor(ends, dtype=torch.int64, device=device)
    return _prefix_blocks(tensors, pairs, ends, device_ends, cum, lo, dtype, shape, piece, max_elems)


@dataclass(frozen=True)
class _RunShape:
    """Elements per run of the batched moments: gathered tokens (per token) and Grams."""

    token_elems: int
    gram_elems: int

    @classmethod
    def of(cls, tensors, pairs) -> "_RunShape":
        b = tensors[0].shape[0]
        heads = lambda i: tensors[i].shape[1]  # noqa: E731
        return cls(
            token_elems=b * sum(t.shape[1] * t.shape[3] for t in tensors),
            gram_elems=b * sum(max(heads(i), heads(j)) * tensors[i].shape[3] * tensors[j].shape[3] for i, j in pairs),
        )

    def runs_per_block(self, length: int, max_elems: int) -> int:
        return max(1, max_elems // max(self.gram_elems, self.token_elems * length))


@dataclass
class _Moments:
    """Token counts ``[R]``, means ``[B, G, R, D_t]`` per tensor and Grams about the means
    ``[B, G, R, Da, Db]`` per pair of ``R`` token runs; a run may be empty (count 0, mean 0,
    Gram 0)."""

    n: torch.Tensor
    means: List[torch.Tensor]
    grams: List[torch.Tensor]

    def merge(self, other: "_Moments", pairs) -> "_Moments":
        """The moments of each run of this followed by the same run of ``other`` (Chan et al.;
        ``R`` = 1 broadcasts); ``pairs`` as the Grams were built. An empty side leaves the other
        unchanged."""
        n = self.n + other.n
        safe = n.clamp(min=1)
        share = (other.n / safe).view(-1, 1)
        w = (self.n * other.n / safe).view(-1, 1, 1)
        delta = [b - a for a, b in zip(self.means, other.means)]
        means = [a + d * share for a, d in zip(self.means, delta)]
        grams = [ga + gb + w * (delta[a].unsqueeze(-1) * delta[b].unsqueeze(-2))
                 for (a, b), ga, gb in zip(pairs, self.grams, other.grams)]
        return _Moments(n, means, grams)

    def last(self) -> "_Moments":
        """The last run's moments, copied (a view would keep the whole block's memory)."""
        return _Moments(self.n[-1:].clone(), [m[:, :, -1:].clone() for m in self.means],
                        [g[:, :, -1:].clone() for g in self.grams])

    def then_each(self, runs: "_Moments", pairs) -> "_Moments":
        """For every ``i``, the moments of these (one run) followed by ``runs`` ``0..i``.

        Chan's update applied run by run is ``P_i = P_{i-1} + M_i + w_i d_i d_i^T`` with ``d_i =
        m_i - mu_{i-1}`` (run ``i``'s mean minus the prefix mean before it) and ``w_i = N_{i-1}
        n_i / N_i``, so the prefix Grams are a cumulative sum of these terms (the same terms, in
        the same order, as the sequential merge; each is about a run's own mean) once the prefix
        means are known, and those are a cumulative sum of ``n_i (m_i - ref)`` with ``ref`` this
        prefix's mean (or the first run's): rounding relative to the distance from ``ref``, not to
        the keys' size. A few passes over ``[R, D, D]``: a log-depth (Hillis-Steele) scan of the
        merge made ``log2 R``, 2.4 s for the moments on one CPU thread for 4 heads of 64 at 4096
        tokens and 958 runs, against 78 ms for the per-end loop it replaced."""
        n = self.n + runs.n.cumsum(0)
        before = (n - runs.n).view(-1, 1)
        safe = n.clamp(min=1).view(-1, 1)
        had = (self.n > 0).view(1, 1)
        refs = [torch.where(had, m, r[:, :, :1]) for m, r in zip(self.means, runs.means)]
        means = [ref + (runs.n.view(-1, 1) * (r - ref)).cumsum(2) / safe for ref, r in zip(refs, runs.means)]
        prev = [torch.cat([ref, m[:, :, :-1]], 2) for ref, m in zip(refs, means)]
        delta = [r - p for r, p in zip(runs.means, prev)]
        w = torch.sqrt(before * runs.n.view(-1, 1) / safe)  # w d d^T = (sqrt(w) d)(sqrt(w) d)^T
        scaled = [d * w for d in delta]
        grams = []
        for (a, b), g0, g in zip(pairs, self.grams, runs.grams):
            left, right = (scaled[i].expand(*g.shape[:3], -1).reshape(-1, g.shape[-2 + j], 1) for j, i in ((0, a), (1, b)))
            term = torch.baddbmm(g.flatten(0, 2), left, right.transpose(-1, -2)).view(g.shape)
            term[:, :, :1] += g0  # the carried prefix enters the first run's term
            grams.append(term.cumsum_(2))
        return _Moments(n, means, grams)


def _run_moments(tensors, pairs, starts: torch.Tensor, stops: torch.Tensor, length: int, dtype) -> _Moments:
    """Moments of the local token runs ``[starts[i], stops[i])`` (int64 ``[R]`` on the tensors'
    device, each at most ``length`` tokens), every run about its own mean."""
    r, s = starts.shape[0], tensors[0].shape[2]
    idx = starts.unsqueeze(1) + torch.arange(length, device=starts.device)  # [R, L]
    valid = idx < stops.unsqueeze(1)
    weight = valid.to(dtype).unsqueeze(-1)  # [R, L, 1]: padding positions read token S-1, zeroed
    n = valid.sum(1).to(dtype)
    idx = idx.clamp(max=s - 1).flatten()
    means, centred = [], []
    for t in tensors:
        x = t.index_select(2, idx).to(dtype).view(t.shape[0], t.shape[1], r, length, t.shape[3]) * weight
        m = x.sum(3) / n.clamp(min=1).view(-1, 1)
        means.append(m)
        centred.append((x - m.unsqueeze(3)) * weight)
    return _Moments(n, means, [centred[a].transpose(-1, -2) @ centred[b] for a, b in pairs])


def _empty_moments(tensors, pairs, dtype) -> _Moments:
    b, dev = tensors[0].shape[0], tensors[0].device
    z = lambda *shape: torch.zeros(*shape, dtype=dtype, device=dev)  # noqa: E731
    return _Moments(
        z(1),
        [z(b, t.shape[1], 1, t.shape[3]) for t in tensors],
        [z(b, max(tensors[i].shape[1], tensors[j].shape[1]), 1, tensors[i].shape[3], tensors[j].shape[3]) for i, j in pairs],
    )


def _scan_runs(tensors, pairs, bounds: torch.Tensor, length: int, carry: _Moments, dtype, shape: _RunShape,
               max_elems: int) -> Iterator[Tuple[int, int, _Moments]]:
    """Prefix moments ``carry + tokens [0, bounds[i])`` for runs ending at ascending ``bounds``
    (int64 ``[R]``, each run at most ``length`` tokens), in blocks ``(r0, r1, moments [r1 - r0])``."""
    starts = torch.cat([bounds.new_zeros(1), bounds[:-1]])
    block = shape.runs_per_block(length, max_elems)
    for r0 in range(0, bounds.shape[0], block):
        r1 = min(bounds.shape[0], r0 + block)
        prefix = carry.then_each(_run_moments(tensors, pairs, starts[r0:r1], bounds[r0:r1], length, dtype), pairs)
        carry = prefix.last()
        yield r0, r1, prefix


def _run_length(extent: int, runs: int, shape: _RunShape, max_elems: int) -> int:
    """Tokens per run: ``extent / runs`` (rounded up), capped so one run's gathered tokens fit
    ``max_elems``."""
    return max(1, min(-(-extent // max(1, runs)), max_elems // shape.token_elems))


def _shard_moments(tensors, pairs, dtype, shape: _RunShape, max_elems: int) -> _Moments:
    """Moments of the whole local shard (one run)."""
    s = tensors[0].shape[2]
    length = _run_length(s, 1, shape, max_elems)
    bounds = torch.cat([torch.arange(length, s, length, device=tensors[0].device),
                        torch.full((1,), s, dtype=torch.int64, device=tensors[0].device)])
    *_, (_, _, prefix) = _scan_runs(tensors, pairs, bounds, length, _empty_moments(tensors, pairs, dtype), dtype,
                                    shape, max_elems)
    return prefix.last()


def _prefix_blocks(tensors, pairs, ends, device_ends, cum, lo: int, dtype, shape: _RunShape, piece, max_elems):
    s = tensors[0].shape[2]
    i0 = bisect.bisect_right(ends, lo)  # ends up to lo: earlier shard boundaries
    i1 = bisect.bisect_right(ends, lo + s)  # ends in this shard; after i1: later shard boundaries

    def boundary_block(j0, j1):
        with torch.no_grad():
            grams = [torch.cat([cum[ends[j] // s].grams[p] for j in range(j0, j1)], 2) for p in range(len(pairs))]
        return j0, j1, grams

    if i0:
        yield boundary_block(0, i0)
    if i1 > i0:
        with torch.no_grad():
            local, m = [e - lo for e in ends[i0:i1]], i1 - i0
            length = piece or _run_length(local[-1], m, shape, max_elems)
            # The runs between consecutive ends, each cut into ceil(len / length) pieces of at most
            # `length` tokens (at most 2m pieces, about m when the ends are evenly spread): the
            # host knows the piece counts (from `local`), the device computes the bounds (from
            # `device_ends`), so nothing is copied either way. Fixed cuts at multiples of `length`
            # also cut the short runs: 958 pieces instead of 511 for 504 token-causal ends.
            sizes = [-(-(e - p) // length) for p, e in zip([0] + local[:-1], local)]
            at_host = [a - 1 for a in itertools.accumulate(sizes)]  # the piece completing end j
            dev_local = device_ends[i0:i1] - lo
            first = torch.cat([dev_local.new_zeros(1), dev_local[:-1]])
            pieces = -(-(dev_local - first) // length)
            end_piece = pieces.cumsum(0)
            run = torch.repeat_interleave(torch.arange(m, device=dev_local.device), pieces, output_size=at_host[-1] + 1)
            offset = torch.arange(at_host[-1] + 1, device=dev_local.device) - (end_piece - pieces)[run]
            bounds = torch.minimum(first[run] + (offset + 1) * length, dev_local[run])
            at = end_piece - 1
            carry = cum[lo // s] if cum[lo // s] is not None else _empty_moments(tensors, pairs, dtype)
            blocks = _scan_runs(tensors, pairs, bounds, length, carry, dtype, shape, max_elems)
        while True:
            with torch.no_grad():
                item = next(blocks, None)
                if item is None:
                    break
                r0, r1, prefix = item
                j0, j1 = bisect.bisect_left(at_host, r0), bisect.bisect_left(at_host, r1)
                if j1 == j0:
                    continue
                sel = at[j0:j1] - r0
                grams = [g.index_select(2, sel) for g in prefix.grams]
            yield i0 + j0, i0 + j1, grams
    if i1 < len(ends):
        yield boundary_block(i1, len(ends))


@dataclass(frozen=True)
class SegmentRows:
    """The sampled rows of a block of ``m`` segments, with the segments' prefix Grams.

    Attributes:
        idx: int64 ``[n]`` indices into the rows.
        segment: int64 ``[n]`` each row's segment in the block (``0 .. m-1``).
        pos: int64 ``[n]`` each row's place in the padded layout ``[m, width]`` (flattened).
        width: the most rows of one segment in the block.
        grams: one ``[B, G, m, Da, Db]`` per pair.
    """

    idx: torch.Tensor
    segment: torch.Tensor
    pos: torch.Tensor
    width: int
    grams: List[torch.Tensor]

    def times_gram(self, g: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``x_i^T G_{segment(i)}`` for rows ``x [B, H, n, Da]`` whose heads form ``G'`` equal
        consecutive groups (GQA) and ``g [B, G', m, Da, Db]``: ``[B, H, n, Db]``, one batched
        product per segment on the padded layout (no copy of a Gram per row)."""
        b, h, n, da = x.shape
        groups, m = g.shape[1], g.shape[2]
        pad = x.new_zeros(b, h, m * self.width, da).index_copy_(2, self.pos, x)
        y = torch.einsum("bgmad,bgjmca->bgjmcd", g, pad.view(b, groups, h // groups, m, self.width, da))
        return y.reshape(b, h, m * self.width, -1).index_select(2, self.pos)


def segment_row_blocks(
    segments: MaskSegments, blocks: Iterator[Tuple[int, int, List[torch.Tensor]]], row_elems: int,
    max_elems: Optional[int] = None,
) -> Iterator[SegmentRows]:
    """The sampled rows with their prefix's Grams (:class:`SegmentRows`), for
    :func:`prefix_centered_grams`' blocks of ``segments.ends``: all rows once, in order of their
    prefix end, in groups of consecutive segments whose padded layout holds at most ``max_elems``
    elements (``row_elems`` per padded row; default :func:`block_elems`), or one segment.

    Under a token-causal mask every segment has one row (no padding); chunk-causal segments
    have about equally many. Copying each row's Gram instead made the chunk-causal moments 4x
    slower than the per-segment loop on the CPU (512 rows in 8 segments)."""
    max_elems = block_elems(segments.order.device) if max_elems is None else max_elems
    starts = segments.starts
    for j0, j1, grams in blocks:
        a = j0
        while a < j1:
            width, stop = starts[a + 1] - starts[a], a + 1
            while stop < j1:
                wider = max(width, starts[stop + 1] - starts[stop])
                if (stop + 1 - a) * wider * row_elems > max_elems:
                    break
                width, stop = wider, stop + 1
            r0, r1 = starts[a], starts[stop]
            with torch.no_grad():
                seg = segments.segment[r0:r1] - a
                pos = seg * width + segments.slot[r0:r1]
            yield SegmentRows(segments.order[r0:r1], seg, pos, width, [g[:, :, a - j0 : stop - j0] for g in grams])
            a = stop


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
    *,
    mask: Optional[CausalMask] = None,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Mean predictor loss over sampled query rows against all keys (the keys each row may read
    under ``mask``), without any ``[N, S]`` scores.

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
        mask, rows: a causal mask and the sampled rows' positions in ``k``'s sequence (int64
            ``[N]``): each row's scores are centred over, and compared on, the keys ``[0,
            limit(row)]`` only, with that prefix's Gram matrices (:func:`prefix_centered_grams`,
            one per distinct limit). With ``group``, ``rows`` are positions in the whole
            sequence (this shard's rows plus its first token) and ``k`` is one equal shard, as
            without a mask.
    """
    if reduction not in ("mean", "sum"):
        raise ValueError(f"reduction must be 'mean' or 'sum', got {reduction!r}.")
    h = predictor.num_heads if heads is None else len(heads)
    kv_of_head = torch.arange(h, device=k.device) // (h // k.shape[1])
    acc = torch.promote_types(k.dtype, torch.float32)
    wk = predictor.weights(heads)[1].to(acc)
    q, u = q_rows.detach().to(acc), u_rows.to(acc)
    if mask is None:
        if x is None:
            grams = [centered_gram(k, k, group=group)]
        else:
            grams = [centered_gram(k, k, group=group), centered_gram(k, x.unsqueeze(1)),
                     centered_gram(x.unsqueeze(1), x.unsqueeze(1))]
        losses = _row_losses(grams, kv_of_head, wk, q, u, scale, cosine_weight)
        return losses.sum() if reduction == "sum" else losses.mean()
    if rows is None or rows.numel() != q_rows.shape[2]:
        raise ValueError(f"a masked predictor loss needs the positions of the {q_rows.shape[2]} sampled rows (rows=[N]).")
    seq_len = k.shape[2] * (1 if group is None else dist.get_world_size(group))
    segments = mask_segments(mask, rows.to(k.device), seq_len)
    tensors, pairs = ([k.detach()], [(0, 0)]) if x is None else ([k.detach(), x.detach().unsqueeze(1)], [(0, 0), (0, 1), (1, 1)])
    blocks = prefix_centered_grams(tensors, pairs, segments.ends, acc, group=group, device_ends=segments.device_ends)
    total = q.new_zeros(())
    row_elems = q.shape[0] * q.shape[1] * max(t.shape[3] for t in tensors)
    for part in segment_row_blocks(segments, blocks, row_elems):
        total = total + _row_losses_own_grams(part, wk, q[:, :, part.idx], u[:, :, part.idx], scale, cosine_weight).sum()
    return total if reduction == "sum" else total / (q.shape[0] * q.shape[1] * q.shape[2])


def _row_losses(grams, kv_of_head, wk, q, u, scale, cosine_weight) -> torch.Tensor:
    """Per-row loss ``[B, H, N]`` from the centred Grams ``[G_kk]`` (``qk`` input) or ``[G_kk,
    G_kx, G_xx]`` (``hidden``) of the keys the rows read; see :func:`predictor_loss`."""
    g_kk = grams[0][:, kv_of_head]  # [B, H, D, D]
    if len(grams) == 1:
        g_kw = g_kk @ wk  # [B, H, D, r]
        g_ww = wk.transpose(-1, -2) @ g_kw
    else:
        g_kw = grams[1][:, kv_of_head] @ wk  # G_kx [B, H, D, in] @ W_k
        g_ww = wk.transpose(-1, -2) @ grams[2] @ wk  # G_xx [B, 1, in, in]
    c2 = scale * scale
    ee = c2 * ((q @ g_kk) * q).sum(-1)
    pe = c2 * ((q @ g_kw) * u).sum(-1)
    pp = c2 * ((u @ g_ww) * u).sum(-1)
    return row_loss_from_sums(pe, ee, pp, cosine_weight)


def _row_losses_own_grams(part: SegmentRows, wk, q, u, scale, cosine_weight) -> torch.Tensor:
    """Per-row loss ``[B, H, n]`` where each row has its segment's centred Grams (a causal
    prefix), ``part.grams``: ``[G_kk]`` ``[B, H_kv, m, D, D]`` (``qk`` input) or ``[G_kk, G_kx [B,
    H_kv, m, D, in], G_xx [B, 1, m, in, in]]`` (``hidden``); the sums of :func:`_row_losses`, as
    ``v = W_k u``: ``pe = (G_kx^T q) . v``, ``pp = v^T G_xx v``.

    ``pp`` is written ``2 (G v').v - (G v').v'`` with ``v'`` = ``v`` detached: the same value (both
    products are computed identically, so exactly) and the gradient ``2 G v`` (a Gram is
    symmetric), while autograd keeps the ``[n, D]`` product instead of every segment's Gram."""
    c2 = scale * scale
    grams = part.grams
    g_kk, g_kx, g_xx = grams[0], grams[-2] if len(grams) > 1 else grams[0], grams[-1]
    v = torch.einsum("bhnr,hir->bhni", u, wk)  # [B, H, n, D or in]
    ee = c2 * (part.times_gram(g_kk, q) * q).sum(-1)
    pe = c2 * (part.times_gram(g_kx, q) * v).sum(-1)
    fixed = v.detach()
    gv = part.times_gram(g_xx, fixed)
    pp = c2 * (2 * (gv * v).sum(-1) - (gv * fixed).sum(-1))
    return row_loss_from_sums(pe, ee, pp, cosine_weight)


def _chunk_loss(pred: torch.Tensor, exact: torch.Tensor, cosine_weight: float, allowed=None) -> torch.Tensor:
    """Summed row loss of ``[B, H, n, S]`` score rows, centred over the keys ``allowed`` (bool
    ``[n, S]``, None = all) and zero elsewhere."""
    if allowed is None:
        pred = pred - pred.mean(dim=-1, keepdim=True)
        exact = exact - exact.mean(dim=-1, keepdim=True)
    else:
        w = allowed.to(pred.dtype)
        n = w.sum(-1, keepdim=True)
        pred = (pred - (pred * w).sum(-1, keepdim=True) / n) * w
        exact = (exact - (exact * w).sum(-1, keepdim=True) / n) * w
    pe, ee, pp = (pred * exact).sum(-1), exact.pow(2).sum(-1), pred.pow(2).sum(-1)
    return row_loss_from_sums(pe, ee, pp, cosine_weight).sum()


def _rows_loss(q_lr_rows, k_lr, q_rows, k, scale, cosine_weight, allowed=None):
    with torch.no_grad():
        exact = torch.einsum("bhnd,bhsd->bhns", q_rows.float(), k.float()) * scale
    pred = torch.einsum("bhnr,bhsr->bhns", q_lr_rows.float(), k_lr.float()) * scale
    return _chunk_loss(pred, exact, cosine_weight, allowed)


def predictor_loss_reference(
    q_lr_rows: torch.Tensor,
    k_lr: torch.Tensor,
    q_rows: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    cosine_weight: float = 0.95,
    *,
    mask: Optional[CausalMask] = None,
    rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The predictor loss computed directly from ``[N, S]`` score rows (the definition).

    Rows are centred because softmax ignores a per-row shift; the MSE is relative to the exact
    row's energy, so the loss is scale-free and the paper's 0.01 threshold keeps its meaning.

    Args:
        q_lr_rows: ``[B, H, N, r]`` predicted low-rank queries of the sampled rows (grad).
        k_lr: ``[B, H, S, r]`` low-rank keys (grad).
        q_rows: ``[B, H, N, D]`` exact queries of the sampled rows (detached).
        k: ``[B, H, S, D]`` exact keys (detached; GQA already expanded).
        mask, rows: a causal mask and the rows' positions (int64 ``[N]``): each row is centred
            over and compared on the keys it may read only.
    """
    b, h, n, _ = q_rows.shape
    s = k.shape[2]
    if mask is not None and (rows is None or rows.numel() != n):
        raise ValueError(f"a masked reference loss needs the positions of the {n} rows (rows=[N]).")
    keys = torch.arange(s, device=k.device)
    chunk = max(1, _LOSS_CHUNK_ELEMS // max(1, b * h * s))
    total = q_lr_rows.new_zeros((), dtype=torch.float32)
    q_rows, k = q_rows.detach(), k.detach()
    for i in range(0, n, chunk):
        sl = slice(i, i + chunk)
        allowed = None if mask is None else mask.allowed(rows[sl].to(k.device).view(-1, 1), keys)
        total = total + checkpoint(
            _rows_loss, q_lr_rows[:, :, sl], k_lr, q_rows[:, :, sl], k, scale, cosine_weight, allowed,
            use_reentrant=False,
        )
    return total / (b * h * n)


@dataclass(frozen=True)
class ScoreMoments:
    """Per-query-head moments of the closed-form predictor fit (fp64; sums, so summable).

    For a row ``q_i`` scored against the centred keys ``K_c`` (Gram ``G = K_c^T K_c``), the
    relative squared error of ``A = W_q W_k^T`` is ``w_i |K_c (A - I)^T q_i|^2`` with
    ``w_i = 1 / q_i^T G q_i``. Summed over one sample's rows that is
    ``tr((A - I) G (A - I)^T C_q)`` with ``C_q = sum_i w_i q_i q_i^T``. Each sample enters as
    ``G / tr G`` and ``tr(G) C_q`` (scale-free, same product), and samples are summed, which is
    exact when their key Grams agree up to scale and a Kronecker approximation otherwise.

    Attributes:
        c_q: ``[H, D, D]`` ``sum_i tr(G) / (q_i^T G q_i) q_i q_i^T`` over sampled rows.
        c_k: ``[H, D, D]`` ``sum G / tr(G)`` over samples (the head's key head's Gram).
        q_energy, rows: ``[H]`` ``sum |q_i|^2`` and the number of rows.
        k_energy, keys: ``[H]`` ``sum tr(G)`` (centred key energy) and the number of keys.
    """

    c_q: torch.Tensor
    c_k: torch.Tensor
    q_energy: torch.Tensor
    rows: torch.Tensor
    k_energy: torch.Tensor
    keys: torch.Tensor

    @classmethod
    def zeros(cls, num_heads: int, head_dim: int, device=None) -> "ScoreMoments":
        z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)
        return cls(z(num_heads, head_dim, head_dim), z(num_heads, head_dim, head_dim), *(z(num_heads) for _ in range(4)))

    def _fields(self):
        return (self.c_q, self.c_k, self.q_energy, self.rows, self.k_energy, self.keys)

    def __add__(self, other: "ScoreMoments") -> "ScoreMoments":
        if other.c_q.shape != self.c_q.shape:
            raise ValueError(f"cannot add score moments of shapes {tuple(self.c_q.shape)} and {tuple(other.c_q.shape)}.")
        return ScoreMoments(*(a + b for a, b in zip(self._fields(), other._fields())))

    def scaled(self, factor: float) -> "ScoreMoments":
        return ScoreMoments(*(a * factor for a in self._fields()))

    def index_add(self, heads: torch.Tensor, part: "ScoreMoments") -> "ScoreMoments":
        """These moments plus ``part``'s head ``i`` added to head ``heads[i]``."""
        return ScoreMoments(*(a.index_add(0, heads, b) for a, b in zip(self._fields(), part._fields())))

    def all_reduce(self, group=None) -> "ScoreMoments":
        """Sum over ``group`` (one collective); returns a new object."""
        fields = self._fields()
        flat = torch.cat([f.flatten() for f in fields])
        dist.all_reduce(flat, group=group)
        return ScoreMoments(*(p.view_as(f) for p, f in zip(flat.split([f.numel() for f in fields]), fields)))

    def balanced_metrics(self, heads: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``C_q`` and ``G`` of ``heads`` rescaled to mean per-row / per-key second moments.

        The optimum ``A`` does not depend on the two scales; they set the split of ``A`` into
        ``W_q W_k^T`` so that ``q W_q`` and ``k_c W_k`` have columns of about equal RMS.
        """
        c_q, c_k = self.c_q[heads], self.c_k[heads]
        tr_q = c_q.diagonal(dim1=-2, dim2=-1).sum(-1)
        tr_k = c_k.diagonal(dim1=-2, dim2=-1).sum(-1)
        s_q = self.q_energy[heads] / self.rows[heads] / tr_q
        s_k = self.k_energy[heads] / self.keys[heads] / tr_k
        return c_q * s_q.view(-1, 1, 1), c_k * s_k.view(-1, 1, 1)


@torch.no_grad()
def score_moments(
    q_rows: torch.Tensor,
    k: torch.Tensor,
    group=None,
    *,
    mask: Optional[CausalMask] = None,
    rows: Optional[torch.Tensor] = None,
) -> ScoreMoments:
    """:class:`ScoreMoments` of sampled rows ``q_rows [B, H, N, D]`` against keys ``k [B, H_kv, S, D]``.

    The key Gram is accumulated in fp64 (chunks of 8192 tokens, no fp64 copy of k); ``group``:
    the sequence group when ``k`` is one chunk of the sequence.

    With a causal ``mask`` and the rows' positions ``rows`` (int64 ``[N]``) a row is scored against
    the keys it may read, the prefix ``[0, limit(row)]``: its weight ``tr(G_i) / q_i^T G_i q_i``
    uses that prefix's centred Gram ``G_i``, and each group of rows sharing a prefix (a segment)
    adds its normalised Gram ``G / tr G`` weighted by its share of the rows, so ``c_k`` is the
    rows' mean normalised Gram per sample (``G / tr G`` once per sample without a mask). ``k_energy``
    and ``keys`` are the rows' mean ``tr G_i`` and readable key count per sample, the same sums
    as without a mask when every row reads every key. With ``group`` and a mask, ``rows`` are
    positions in the whole sequence and a segment's share is of the rows over the group, so the
    group's moments sum to the single-process ones (without a mask ``c_k``, ``k_energy`` and ``keys``
    sum to ``N`` times them: the fit does not depend on that common scale).
    """
    if q_rows.dim() != 4 or k.dim() != 4 or q_rows.shape[0] != k.shape[0] or q_rows.shape[3] != k.shape[3]:
        raise ValueError(f"q_rows [B, H, N, D] and k [B, H_kv, S, D] disagree: {tuple(q_rows.shape)}, {tuple(k.shape)}.")
    b, h, n, d = q_rows.shape
    if h % k.shape[1]:
        raise ValueError(f"{h} query heads are not a multiple of {k.shape[1]} key heads.")
    kv_of_head = torch.arange(h, device=k.device) // (h // k.shape[1])
    q = q_rows.detach().to(device=k.device, dtype=torch.float64)
    ones = torch.ones(h, dtype=torch.float64, device=k.device)
    if mask is None:
        g = centered_gram(k.detach(), k.detach(), group=group, dtype=torch.float64)[:, kv_of_head]  # [B, H, D, D]
        c_q, c_k, tr = _segment_moments(q, g)
        n_keys = k.shape[2] * (dist.get_world_size(group) if group is not None else 1)
        k_energy, keys = tr.sum(0), ones * (b * n_keys)
    else:
        if rows is None or rows.numel() != n:
            raise ValueError(f"masked score moments need the positions of the {n} sampled rows (rows=[N]).")
        seq_len = k.shape[2]
        n_rows = torch.full((1,), float(n), dtype=torch.float64, device=k.device)
        if group is not None:
            seq_len *= dist.get_world_size(group)
            # A row's share is of the rows of the whole sequence, so the ranks' moments sum to the
            # single-process ones (kept on the device: no host read).
            dist.all_reduce(n_rows, group=group)
        segments = mask_segments(mask, rows.to(k.device), seq_len)
        h_kv = k.shape[1]
        c_q = torch.zeros(h, d, d, dtype=torch.float64, device=k.device)
        c_k = torch.zeros(h_kv, d, d, dtype=torch.float64, device=k.device)
        tr_sum = torch.zeros(h_kv, dtype=torch.float64, device=k.device)
        blocks = prefix_centered_grams([k.detach()], [(0, 0)], segments.ends, torch.float64, group=group,
                                       device_ends=segments.device_ends)
        for part in segment_row_blocks(segments, blocks, b * h * d):
            part_q, part_k, tr = _row_moments(part, q[:, :, part.idx])
            c_q, c_k, tr_sum = c_q + part_q, c_k + part_k, tr_sum + tr
        # Every row weighs 1 / (rows over the group): a segment's share of the rows.
        c_k, k_energy = (c_k / n_rows)[kv_of_head], (tr_sum / n_rows)[kv_of_head]
        keys = ones * (b * segments.rows_per_segment_times_end()) / n_rows
    return ScoreMoments(
        c_q=c_q,
        c_k=c_k,
        q_energy=(q * q).sum((0, 2, 3)),
        rows=ones * (b * n),
        k_energy=k_energy,
        keys=keys,
    )


def _segment_moments(q: torch.Tensor, g: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``q [B, H, n, D]`` scored against keys of centred Gram ``g [B, H, D, D]`` (fp64):
    their ``C_q`` ``[H, D, D]``, the sum over samples of ``G / tr G`` ``[H, D, D]``, and ``tr G``
    ``[B, H]``."""
    b, h = g.shape[:2]
    tr = g.diagonal(dim1=-2, dim2=-1).sum(-1)  # [B, H]
    energy = ((q @ g) * q).sum(-1)  # [B, H, n] centred score energy of each row (up to scale^2)
    c_q = _weighted_query_moment(q, energy, tr.unsqueeze(-1))
    safe_tr = tr.clamp(min=torch.finfo(torch.float64).tiny)
    return c_q, (g / safe_tr.view(b, h, 1, 1)).sum(0), tr


def _weighted_query_moment(q: torch.Tensor, energy: torch.Tensor, tr: torch.Tensor) -> torch.Tensor:
    """``C_q`` ``[H, D, D]``: the sum over rows of ``(tr G / e) q q^T`` for rows ``q [B, H, n, D]``
    with centred score energy ``e = q^T G q`` (``energy [B, H, n]``) against keys whose Gram has
    trace ``tr`` (broadcast to ``[B, H, n]``). A row whose scores do not vary (q = 0, constant
    keys, or one readable key) carries no error to fit: weight 0."""
    valid = energy > 1e-12 * tr * (q * q).sum(-1)
    w = torch.where(valid, tr / energy.clamp(min=torch.finfo(torch.float64).tiny), 0.0)
    return torch.einsum("bhn,bhnd,bhne->hde", w, q, q)


def _row_moments(part: SegmentRows, q: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows ``q [B, H, n, D]`` each scored against the keys of its segment's centred Gram (a
    causal prefix; ``part.grams[0]`` ``[B, H_kv, m, D, D]``, fp64): their ``C_q`` ``[H, D, D]``
    (as :func:`_segment_moments`), and per key head the sums over rows and samples of ``G / tr G``
    ``[H_kv, D, D]`` and of ``tr G`` ``[H_kv]``."""
    (g,) = part.grams
    b, h, n, d = q.shape
    tr = g.diagonal(dim1=-2, dim2=-1).sum(-1)  # [B, H_kv, m]
    tr_q = tr.repeat_interleave(h // g.shape[1], dim=1).index_select(2, part.segment)  # [B, H, n]
    energy = (part.times_gram(g, q) * q).sum(-1)  # [B, H, n]
    c_q = _weighted_query_moment(q, energy, tr_q)
    count = torch.zeros(g.shape[2], dtype=g.dtype, device=g.device).index_add_(
        0, part.segment, torch.ones(n, dtype=g.dtype, device=g.device))
    safe_tr = tr.clamp(min=torch.finfo(torch.float64).tiny)
    return c_q, torch.einsum("bgm,bgmde->gde", count / safe_tr, g), (tr * count).sum((0, 2))


@contextlib.contextmanager
def _one_cpu_thread(device) -> Iterator[None]:
    """Run the closed-form fit's small CPU solvers on one thread (a no-op for other devices).
    Threads do not pay on ``[H, D, D]`` matrices and, where other processes or threads load the
    cores, their spin-waits cost far more than the work: ``eigh`` of 6 x 64 x 64 fp64 took 1.2-3.1
    ms on one thread and 156-374 ms on two on a loaded 2-core machine (measured), and the H200
    quality arms (two training processes on one host) showed 1.9-4 s profiling steps.
    ``torch.set_num_threads`` is process-wide, so the previous count is restored on exit."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _ridged(c: torch.Tensor, eps: float) -> torch.Tensor:
    """Symmetric PSD ``[..., D, D]`` plus the relative ridge ``eps tr(C)/D`` (directions no row or
    key spans stay finite)."""
    d = c.shape[-1]
    ridge = (eps * c.diagonal(dim1=-2, dim2=-1).sum(-1) / d).clamp(min=torch.finfo(c.dtype).tiny)
    eye = torch.eye(d, dtype=c.dtype, device=c.device)
    return 0.5 * (c + c.transpose(-1, -2)) + ridge.view(*ridge.shape, 1, 1) * eye


def _check_fit_args(c_q: torch.Tensor, c_k: torch.Tensor, rank: Optional[int], eps: float) -> None:
    """The fits' shared argument checks: ``[H, D, D]`` moments of one shape, ``1 <= rank <= D``
    (unless ``rank`` is None), ``eps >= 0``."""
    if c_q.dim() != 3 or c_q.shape != c_k.shape or c_q.shape[-1] != c_q.shape[-2]:
        raise ValueError(f"c_q and c_k must both be [H, D, D]; got {tuple(c_q.shape)} and {tuple(c_k.shape)}.")
    d = c_q.shape[-1]
    if rank is not None and not 1 <= rank <= d:
        raise ValueError(f"rank must be in [1, {d}] (the head dim), got {rank}.")
    if eps < 0:
        raise ValueError(f"eps must be >= 0, got {eps}.")


def _cholesky_ridge(c: torch.Tensor, eps: float) -> torch.Tensor:
    """Lower Cholesky factor of :func:`_ridged` (raises on failure: a host sync)."""
    return torch.linalg.cholesky(_ridged(c, eps))


def _cholesky_ridge_ex(c: torch.Tensor, eps: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """Lower Cholesky factor of :func:`_ridged` and its info ``[...]`` (non-zero: failed), no
    host sync."""
    return torch.linalg.cholesky_ex(_ridged(c, eps))


@torch.no_grad()
def reduced_rank_fit_exact(
    c_q: torch.Tensor, c_k: torch.Tensor, rank: int, eps: float = 1e-6
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-r ``A = W_q W_k^T`` minimising ``tr((A - I) C_k (A - I)^T C_q)``, per head: the
    reference of :func:`reduced_rank_fit` (a full ``eigh`` per head; it checks its input on the
    host, so it synchronises; the runtime never calls it).

    With ``C = L L^T`` (Cholesky) and ``T = L_q^T L_k`` the objective is ``|L_q^T A L_k - T|_F^2``,
    so (Eckart-Young) ``L_q^T A L_k = U_r S_r V_r^T``, the top-r SVD of ``T``:
    ``W_q = L_q^{-T} U_r S_r^{1/2}``, ``W_k = L_k^{-T} V_r S_r^{1/2}`` (the same optimum and split
    as with symmetric square roots, which differ from ``L`` by a rotation). Both moments get a
    ridge ``eps tr(C)/D`` so directions no row or key spans stay finite.

    Args:
        c_q, c_k: fp64 ``[H, D, D]`` symmetric PSD moments with positive trace.
        rank: r in ``[1, D]``.

    Returns:
        ``W_q, W_k`` fp64 ``[H, D, r]`` and the residual fp64 ``[H]``: ``sum_{t > r} s_t^2 /
        sum_t s_t^2``, the fraction of the weighted energy the optimum misses.
    """
    _check_fit_args(c_q, c_k, rank, eps)
    c_q, c_k = c_q.double(), c_k.double()
    for name, c in (("c_q", c_q), ("c_k", c_k)):
        if not bool((c.diagonal(dim1=-2, dim2=-1).sum(-1) > 0).all()):
            raise ValueError(f"{name} has a head with zero trace (no rows or constant keys): fit only heads with data.")
    # Whitening by Cholesky factors (C = L L^T): the objective is |L_q^T (A - I) L_k|_F^2, so the
    # optimum is the top-r SVD of T = L_q^T L_k, read from the eigenvectors of T T^T. Same optimum
    # and singular values as symmetric square roots, at one Cholesky per moment instead of an
    # eigendecomposition, and one symmetric eigendecomposition instead of an SVD.
    l_q = _cholesky_ridge(c_q, eps)
    l_k = _cholesky_ridge(c_k, eps)
    t = l_q.transpose(-1, -2) @ l_k
    energy, u = torch.linalg.eigh(t @ t.transpose(-1, -2))  # ascending eigenvalues s^2
    energy, u = energy.flip(-1).clamp(min=0), u.flip(-1)
    s_r = energy[:, :rank].sqrt()
    u_r = u[:, :, :rank]
    v_r = t.transpose(-1, -2) @ u_r / s_r.clamp(min=torch.finfo(torch.float64).tiny).unsqueeze(-2)
    root = s_r.sqrt().unsqueeze(-2)
    w_q = torch.linalg.solve_triangular(l_q.transpose(-1, -2), u_r * root, upper=True)  # L_q^-T U_r S_r^1/2
    w_k = torch.linalg.solve_triangular(l_k.transpose(-1, -2), v_r * root, upper=True)
    residual = energy[:, rank:].sum(-1) / energy.sum(-1).clamp(min=torch.finfo(torch.float64).tiny)
    return w_q, w_k, residual


# Subspace iterations of reduced_rank_fit, from measurement (fp64, eps 1e-6; measured on the CPU).
# RoPE'd heads (3D RoPE on a 8x16x16 grid, anisotropic q/k with means, 512 sampled rows, 8 heads)
# have a small gap at the rank, lambda_{r+1}/lambda_r = 0.82-0.99, so the objective converges at
# the oversampled rate lambda_{p+1}/lambda_r. Error of the residual relative to the exact one
# (reduced_rank_fit_exact), worst head, after n iterations:
#   cold (the JL sketch)            D=64 r=16:  n=4 3.9e-07, n=6 7.1e-10, n=8 2.5e-12
#                                   D=128 r=16: n=4 5.2e-06, n=6 3.7e-08, n=8 2.4e-10
#                                   D=128 r=32: n=2 1.2e-11 (D=64 r=32: p = D, exact at n=0)
#   warm, another sample, W drifted 2%: within 2x of cold (D=128 r=16: n=8 1.3e-10)
#   warm, same sample, W drifted 0.2%:  D=64 r=16 n=2 6.1e-10, n=4 2.3e-12; D=128 r=16 n=4 5.7e-11
#   planted rank 16 + noise 1e-3 (D=128): n=0 3e-13 absolute (the rounding floor)
#   Gaussian heads with a linear spectrum, no gap at all (16 heads of 128, r=16): n=8 1.8e-5
# With p = r + 8: n=8 1.1e-06 (D=64 r=16); with p = r and no Rayleigh-Ritz step: 1e-3 after 64.
# One count for cold and warm starts: a count chosen from host state (a "fitted before" flag) that
# checkpoints do not carry would break bit-exact resume, and a device-side test would synchronise.
FIT_ITERATIONS = 8
# M + tau tr(M) I (same eigenvectors) bounds the condition of M X by 1/tau, so the Cholesky-QR
# below never meets a numerically singular block (rank-deficient moments, eps = 0 in tests).
_ITERATION_SHIFT = 1e-7
# Shift of the Cholesky-QR Gram, relative to its trace: keeps the factorisation defined for a
# block with (nearly) dependent columns; a second pass restores orthonormality.
_QR_SHIFT = 1e-14


def _orthonormalize(y: torch.Tensor, eye: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``y [H, D, p]`` by shifted Cholesky-QR, twice (one
    batched Cholesky and one batched triangular solve per pass, no host sync; the Gram is only
    ``p x p``, ``eye`` its identity). A column dependent on the others comes out as a normalised
    residual."""
    for _ in range(2):
        g = y.transpose(-1, -2) @ y
        shift = _QR_SHIFT * g.diagonal(dim1=-2, dim2=-1).sum(-1).clamp(min=torch.finfo(y.dtype).tiny)
        r, _ = torch.linalg.cholesky_ex(g + shift.view(-1, 1, 1) * eye, upper=True)
        y = torch.linalg.solve_triangular(r, y, upper=True, left=False)
    return y


@torch.no_grad()
def reduced_rank_fit(
    c_q: torch.Tensor,
    c_k: torch.Tensor,
    start: torch.Tensor,
    eps: float = 1e-6,
    iterations: int = FIT_ITERATIONS,
    backend: str = "auto",
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """:func:`reduced_rank_fit_exact`'s optimum by block subspace iteration, on the moments'
    device with batched ops and no host synchronisation.

    With ``T = L_q^T L_k`` (Cholesky factors of the ridged moments) the top-r left singular
    vectors of ``T`` are the top-r eigenvectors of ``M = T T^T``. A block of ``p = min(2r, D)``
    columns is iterated ``X <- orth(M X)`` (shifted Cholesky-QR), then one Rayleigh-Ritz step
    (``eigh`` of the ``p x p`` ``X^T M X``, :func:`megatron_dsv.ops.eigh.batched_eigh`, Jacobi on
    CUDA) gives the top-r Ritz pairs ``U_r, S_r^2``. The first r columns start from
    ``L_q^T start``, which spans ``U_r`` when ``start`` is ``W_q`` of a fit to similar moments
    (warm start); the other ``p - r`` from the columns of ``M`` of largest diagonal (deterministic;
    they also replace the warm columns of a head whose ``start`` is not finite). The residual is
    ``1 - sum(S_r^2) / tr(M)``, the true residual of the returned weights; the split is that of
    :func:`reduced_rank_fit_exact`.

    Args:
        c_q, c_k: fp64 ``[H, D, D]`` symmetric PSD moments with positive trace (no check: a head
            without one gets non-finite output, which the caller masks).
        start: ``[H, D, r]`` the current ``W_q`` (any float dtype); r is the rank.
        eps: ridge, relative to the mean eigenvalue of each moment.
        iterations: subspace iterations (:data:`FIT_ITERATIONS`).
        backend: of the ``p x p`` eigensolver (``"auto"``: Triton on CUDA, else the reference).

    Returns:
        ``W_q, W_k`` fp64 ``[H, D, r]`` and the residual fp64 ``[H]``, NaN where a Cholesky
        factorisation of a moment failed.
    """
    _check_fit_args(c_q, c_k, None, eps)
    h, d = c_q.shape[0], c_q.shape[-1]
    if start.dim() != 3 or start.shape[:2] != (h, d):
        raise ValueError(f"start must be [{h}, {d}, r] (W_q of the heads); got {tuple(start.shape)}.")
    rank = start.shape[-1]
    _check_fit_args(c_q, c_k, rank, eps)
    if iterations < 0:
        raise ValueError(f"iterations must be >= 0, got {iterations}.")
    c_q, c_k = c_q.double(), c_k.double()
    p = min(2 * rank, d)
    tiny = torch.finfo(torch.float64).tiny
    l_q, info_q = _cholesky_ridge_ex(c_q, eps)
    l_k, info_k = _cholesky_ridge_ex(c_k, eps)
    t = l_q.transpose(-1, -2) @ l_k
    m = t @ t.transpose(-1, -2)
    m = 0.5 * (m + m.transpose(-1, -2))
    diag = m.diagonal(dim1=-2, dim2=-1)
    total = diag.sum(-1)
    cols = torch.topk(diag, p, dim=-1).indices  # [H, p]
    cold = torch.gather(m, 2, cols.unsqueeze(1).expand(h, d, p))
    warm = l_q.transpose(-1, -2) @ start.to(c_q)
    warm = torch.where(torch.isfinite(warm).flatten(1).all(-1).view(h, 1, 1), warm, cold[..., :rank])
    eye_p = torch.eye(p, dtype=m.dtype, device=m.device)
    x = _orthonormalize(torch.cat([warm, cold[..., rank:]], -1), eye_p)
    eye = torch.eye(d, dtype=m.dtype, device=m.device)
    shifted = m + (_ITERATION_SHIFT * total).view(h, 1, 1) * eye
    for _ in range(iterations):
        x = _orthonormalize(shifted @ x, eye_p)
    ritz = x.transpose(-1, -2) @ m @ x
    values, vectors = batched_eigh(0.5 * (ritz + ritz.transpose(-1, -2)), backend=backend)
    energy = values.flip(-1)[:, :rank].clamp(min=0)  # s^2, descending
    u_r = x @ vectors.flip(-1)[..., :rank]
    # Eigenvectors have no sign: fix one (largest entry of each column positive), so the weights
    # do not depend on the eigensolver or on rounding in the start (CP ranks write the same).
    peak = torch.gather(u_r, 1, u_r.abs().argmax(1, keepdim=True))
    u_r = u_r * torch.where(peak < 0, -1.0, 1.0)
    s_r = energy.sqrt()
    root = s_r.sqrt().unsqueeze(-2)
    v_r = t.transpose(-1, -2) @ u_r / s_r.clamp(min=tiny).unsqueeze(-2)
    w_q = torch.linalg.solve_triangular(l_q.transpose(-1, -2), u_r * root, upper=True)  # L_q^-T U_r S_r^1/2
    w_k = torch.linalg.solve_triangular(l_k.transpose(-1, -2), v_r * root, upper=True)
    residual = (total - energy.sum(-1)) / total.clamp(min=tiny)
    residual = torch.where((info_q == 0) & (info_k == 0), residual, float("nan"))
    return w_q, w_k, residual
