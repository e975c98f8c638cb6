"""Sampled exact attention: per-head sparsity at the critical mass and predictor recall.

On every ``stride``-th query (offset rotating with the iteration) the exact softmax row over all
keys is computed in chunks of rows (never ``S x S`` at once). Per row:

* sparsity = 1 - (smallest number of keys holding ``critical_mass`` of the row's mass) / S;
* recall = exact attention mass on the keys the row's query group selected.

Both are averaged over the sampled rows per (batch, head). The EMA across iterations is kept by
the caller (the stage controller), so a recomputed forward cannot count an iteration twice.

:func:`recall_curve` measures what the selection rule actually spends: per row, the exact mass
per key unit read in the order of the row's query-group score, so K can be chosen for a critical
mass in key units per group (:meth:`RecallCurve.choose`), not from token-level sparsity, which
undercounts the units a group needs by about 2x (issue 13). The same rule with exact q/k gives
the recall the predictor could reach at best (``relative_recall``).

Under a causal mask (``ops/mask.py``) a row's mass is its softmax over the keys it may read, its
sparsity counts only those keys, and units are ranked as masked selection ranks them: the
group's forced units first, then its other allowed units by score; disallowed units rank last
and hold no mass. The layer samples only rows with a ranking choice for the curve
(``CausalMask.rows_with_choice``; ``DSVCoreAttention._sampled_rows`` says why).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.distributed as dist

from megatron_dsv.ops.mask import CausalMask
from megatron_dsv.ops.selection import group_proxies, pool_keys
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
    *,
    mask: Optional[CausalMask] = None,
    rows: Optional[torch.Tensor] = None,
) -> Dict[str, torch.Tensor]:
    """Sparsity (and recall when ``index`` is given) of sampled query rows.

    Args:
        q_rows: ``[B, H, N, D]`` queries of the sampled rows.
        k: ``[B, H, S, D]`` all keys (GQA expanded).
        row_groups: int64 ``[N]`` group of ``index`` that each sampled row belongs to.
        index: the selection of the rows' query groups.
        mask: optional causal mask (queries and keys one sequence); needs ``rows``.
        rows: int64 ``[N]`` positions of the sampled rows (with ``mask``).

    Returns:
        ``{"sparsity": [B, H], "recall": [B, H]}`` in fp32 (recall only with ``index``).
    """
    b, h, n, _ = q_rows.shape
    s = k.shape[2]
    chunk = max(1, _CHUNK_ELEMS // max(1, b * h * s))
    kf = k.float()
    if mask is not None and (rows is None or rows.numel() != n):
        raise ValueError(f"a masked profile needs the positions of the {n} sampled rows (rows=[N]).")
    # keys each row may read: S without a mask
    readable = torch.full((n,), s, device=k.device) if mask is None else (mask.limit(rows) + 1).clamp(max=s)
    need = torch.empty(b, h, n, device=k.device)
    recall = torch.empty(b, h, n, device=k.device) if index is not None else None
    if index is not None:
        tok, valid = gather_token_index(index)
        tok = tok.masked_fill(~valid, s)  # padding scatters into a spare column
    for i in range(0, n, chunk):
        logits = torch.einsum("bhnd,bhsd->bhns", q_rows[:, :, i : i + chunk].float(), kf) * scale
        if mask is not None:
            keys = torch.arange(s, device=k.device)
            logits = logits.masked_fill(~mask.allowed(rows[i : i + chunk].view(-1, 1), keys), float("-inf"))
        p = torch.softmax(logits, -1)
        csum = p.sort(dim=-1, descending=True).values.cumsum(-1)
        need[:, :, i : i + chunk] = (csum < critical_mass).sum(-1).float() + 1
        if index is not None:
            groups = row_groups[i : i + chunk]
            sel = torch.zeros(b, h, groups.numel(), s + 1, device=k.device, dtype=p.dtype)
            sel.scatter_(-1, tok[:, :, groups], 1.0)
            recall[:, :, i : i + chunk] = (p * sel[..., :s]).sum(-1)
    readable = readable.float()
    out = {"sparsity": 1.0 - (torch.minimum(need, readable) / readable).mean(-1)}
    if recall is not None:
        out["recall"] = recall.mean(-1)
    return out


def _rank_stats(unit_mass: torch.Tensor, scores: torch.Tensor, critical_mass: float):
    """Per-row mass in ranked order, summed over rows: ``[B, H, N, U] -> [B, H, U]`` (fp64 mass
    by rank position, fp64 count of rows whose critical mass needs ``t + 1`` units)."""
    order = scores.argsort(dim=-1, descending=True, stable=True)
    ranked = unit_mass.double().gather(-1, order)
    ranked = ranked / ranked.sum(-1, keepdim=True).clamp(min=torch.finfo(torch.float64).tiny)
    before = (ranked.cumsum(-1) < critical_mass).sum(-1)  # units taken before reaching the mass
    n_units = unit_mass.shape[-1]
    count = torch.zeros(ranked.shape[:2] + (n_units,), dtype=torch.float64, device=ranked.device)
    count.scatter_add_(-1, before.clamp(max=n_units - 1), torch.ones_like(before, dtype=torch.float64))
    return ranked.sum(2), count


def _resolve_quantile(quantile) -> Optional[float]:
    if quantile == "mean":
        return None
    if quantile == "p75":
        return 0.75
    if isinstance(quantile, (int, float)) and not isinstance(quantile, bool) and 0 < quantile <= 1:
        return float(quantile)
    raise ValueError(f"quantile must be 'mean', 'p75' or a number in (0, 1]; got {quantile!r}.")


@dataclass(frozen=True)
class KChoice:
    """Per-head key units chosen for a critical mass, and the recalls they give.

    Attributes:
        k: int32 ``[H]`` units per head under the predictor's ranking (the K to select with).
        k_exact: int32 ``[H]`` units the same quantile needs under the exact-q/k ranking.
        recall: fp32 ``[H]`` mean fraction of a row's mass in its group's top ``k`` units
            (predictor ranking): the recall sparse attention gets at ``k``.
        recall_exact: fp32 ``[H]`` the same at ``k`` with the exact-q/k ranking.
        relative_recall: fp32 ``[H]`` ``recall / recall_exact``: 1 when the predictor ranks
            units as exact q/k does; it can exceed 1 (a mean-pooled ranking is not the
            mass-optimal one).
        num_units: key units per row ``U``.
    """

    k: torch.Tensor
    k_exact: torch.Tensor
    recall: torch.Tensor
    recall_exact: torch.Tensor
    relative_recall: torch.Tensor
    num_units: int

    def density(self) -> torch.Tensor:
        """Fraction of key units computed per head, fp32 ``[H]``."""
        return self.k.float() / self.num_units


@dataclass(frozen=True)
class RecallCurve:
    """Sampled-row statistics of the selection rule, summable over microbatches and ranks.

    For every sampled row the key units are ranked by the score of the row's query group (the
    predictor's ranking, and the same rule on exact q/k), and the row's exact attention mass is
    read in that order. Kept per head, summed over rows and batch (fp64):

    * ``mass_by_rank[h, t]``: mass of the unit ranked ``t`` (fractions of each row's mass), so
      the recall at K is ``mass_by_rank[h, :K].sum() / rows[h]`` for every K at once;
    * ``need_count[h, t]``: rows whose ``critical_mass`` needs ``t + 1`` units, so the mean and
      every quantile of the per-row need are exact.

    Sums make the statistics reducible: add microbatches with ``+``, decay with :meth:`scaled`,
    and sum over a context-parallel group with :meth:`all_reduce`.
    """

    mass_by_rank: torch.Tensor
    mass_by_rank_exact: torch.Tensor
    need_count: torch.Tensor
    need_count_exact: torch.Tensor
    critical_mass: float

    @property
    def num_units(self) -> int:
        return self.mass_by_rank.shape[-1]

    @property
    def rows(self) -> torch.Tensor:
        """Sampled rows per head (fp64 ``[H]``; weighted when :meth:`scaled`)."""
        return self.need_count.sum(-1)

    @classmethod
    def from_unit_mass(
        cls, unit_mass: torch.Tensor, scores: torch.Tensor, scores_exact: torch.Tensor, critical_mass: float
    ) -> "RecallCurve":
        """Curve of rows given their exact mass per key unit and two rankings.

        Args:
            unit_mass: ``[B, H, N, U]`` exact attention mass of each row inside each key unit
                (read as fractions of the row's total).
            scores: ``[B, H, N, U]`` the predictor's score of each unit for the row's group.
            scores_exact: ``[B, H, N, U]`` the same rule's scores from exact q/k.
        """
        if not 0 < critical_mass <= 1:
            raise ValueError(f"critical_mass must be in (0, 1], got {critical_mass}.")
        if unit_mass.dim() != 4 or scores.shape != unit_mass.shape or scores_exact.shape != unit_mass.shape:
            raise ValueError(
                f"unit_mass, scores and scores_exact must all be [B, H, N, U]; got {tuple(unit_mass.shape)}, "
                f"{tuple(scores.shape)}, {tuple(scores_exact.shape)}."
            )
        mass, count = _rank_stats(unit_mass, scores, critical_mass)
        mass_x, count_x = _rank_stats(unit_mass, scores_exact, critical_mass)
        return cls(mass.sum(0), mass_x.sum(0), count.sum(0), count_x.sum(0), critical_mass)

    def _check_same(self, other: "RecallCurve") -> None:
        if other.critical_mass != self.critical_mass or other.mass_by_rank.shape != self.mass_by_rank.shape:
            raise ValueError(
                f"cannot combine recall curves of critical mass {self.critical_mass} / {other.critical_mass} "
                f"and shapes {tuple(self.mass_by_rank.shape)} / {tuple(other.mass_by_rank.shape)}."
            )

    def _fields(self):
        return (self.mass_by_rank, self.mass_by_rank_exact, self.need_count, self.need_count_exact)

    def __add__(self, other: "RecallCurve") -> "RecallCurve":
        self._check_same(other)
        return RecallCurve(*(a + b for a, b in zip(self._fields(), other._fields())), self.critical_mass)

    def scaled(self, factor: float) -> "RecallCurve":
        """Every sum times ``factor`` (an exponential decay across profiling iterations)."""
        return RecallCurve(*(a * factor for a in self._fields()), self.critical_mass)

    def all_reduce(self, group=None) -> "RecallCurve":
        """Sum over ``group`` (ranks that sampled different rows of the same heads, or hold
        zeros for heads they do not own); one collective."""
        fields = self._fields()
        flat = torch.cat([f.flatten() for f in fields])
        dist.all_reduce(flat, group=group)
        parts = [p.view_as(f) for p, f in zip(flat.split([f.numel() for f in fields]), fields)]
        return RecallCurve(*parts, self.critical_mass)

    def _check_rows(self) -> torch.Tensor:
        rows = self.rows
        if bool((rows <= 0).any()):
            raise ValueError(
                f"heads {torch.nonzero(rows <= 0).flatten().tolist()} have no sampled rows: profile more "
                "rows (a smaller --dsv-profile-stride) or all-reduce the curve over the ranks that hold them."
            )
        return rows

    def _recall(self, mass: torch.Tensor, k) -> torch.Tensor:
        rows = self._check_rows()
        k = torch.as_tensor(k, device=mass.device).long().expand(mass.shape[0])
        if int(k.min()) < 1 or int(k.max()) > self.num_units:
            raise ValueError(f"K must lie in [1, {self.num_units}] key units; got [{int(k.min())}, {int(k.max())}].")
        cum = mass.cumsum(-1).gather(-1, (k - 1).unsqueeze(-1)).squeeze(-1)
        return (cum / rows).float()

    def recall(self, k) -> torch.Tensor:
        """Predictor recall at K (int or ``[H]``): fp32 ``[H]``."""
        return self._recall(self.mass_by_rank, k)

    def recall_exact(self, k) -> torch.Tensor:
        """Exact-q/k recall of the same rule at K: fp32 ``[H]``."""
        return self._recall(self.mass_by_rank_exact, k)

    def units_needed(self, quantile="mean", exact: bool = False) -> torch.Tensor:
        """Per-head units for the critical mass: int32 ``[H]`` in ``[1, U]``.

        ``quantile``: ``"mean"`` (ceil of the mean need), ``"p75"`` or a number ``q`` in (0, 1]:
        the smallest need that at least a fraction ``q`` of the rows do not exceed.
        """
        q = _resolve_quantile(quantile)
        rows = self._check_rows()
        count = self.need_count_exact if exact else self.need_count
        if q is None:
            units = torch.arange(1, self.num_units + 1, device=count.device, dtype=count.dtype)
            k = torch.ceil((count * units).sum(-1) / rows)
        else:
            # Smallest t with at least q * rows rows needing <= t units; the relative slack keeps
            # a count that equals q * rows up to rounding (decayed sums) on the lower side.
            reached = count.cumsum(-1) >= (q * rows * (1 - 1e-12)).unsqueeze(-1)
            k = reached.double().argmax(-1) + 1
        return k.clamp(1, self.num_units).to(torch.int32)

    def k_for_recall(self, target: float) -> torch.Tensor:
        """Per head, the fewest units whose predictor-ranked selection holds ``target`` of the
        sampled rows' mass on average (the recall the layer gets at that K): int32 ``[H]``."""
        if not 0 < target <= 1:
            raise ValueError(f"target recall must be in (0, 1], got {target}.")
        rows = self._check_rows()
        # 1e-6: a curve summed in fp32 (a restored checkpoint) reaches 1.0 only up to rounding
        reached = self.mass_by_rank.cumsum(-1) / rows.unsqueeze(-1) >= target - 1e-6
        k = torch.where(reached.any(-1), reached.double().argmax(-1) + 1, torch.full_like(rows, self.num_units))
        return k.clamp(1, self.num_units).to(torch.int32)

    def choose(self, quantile="mean") -> KChoice:
        """K per head for the critical mass (predictor ranking) and the recalls at that K."""
        k = self.units_needed(quantile)
        recall, recall_exact = self.recall(k), self.recall_exact(k)
        return KChoice(
            k=k,
            k_exact=self.units_needed(quantile, exact=True),
            recall=recall,
            recall_exact=recall_exact,
            relative_recall=recall / recall_exact.clamp(min=torch.finfo(torch.float32).tiny),
            num_units=self.num_units,
        )


@torch.no_grad()
def recall_curve(
    q: torch.Tensor,
    k: torch.Tensor,
    q_lr: torch.Tensor,
    k_lr: torch.Tensor,
    rows: torch.Tensor,
    *,
    group_size: int,
    kv_block: int,
    scale: float,
    critical_mass: float,
    mask: Optional[CausalMask] = None,
    q_offset: int = 0,
) -> RecallCurve:
    """:class:`RecallCurve` of sampled rows under the selection rule of ``select_topk``.

    A row's group is scored as selection scores it: the mean low-rank query of the group
    (:func:`group_proxies`) against the mean low-rank key of each unit (:func:`pool_keys`). The
    exact-q/k ranking applies the same rule to q and k themselves. Exact probabilities are
    computed for chunks of rows against all keys and summed per unit; sorts run over ``U = S_kv /
    kv_block`` units, never over tokens. Memory: a chunk of ``rows x S_kv`` per head.

    Args:
        q: ``[B, H, S_q, D]`` queries (the sampled rows and their groups are read from it).
        k: ``[B, H_kv, S_kv, D]`` all keys; query head ``i`` reads key head ``i // (H / H_kv)``.
        q_lr: ``[B, H, S_q, r]`` low-rank queries, as given to ``select_topk``.
        k_lr: ``[B, H, S_kv, r]`` low-rank keys, as given to ``select_topk``.
        rows: int64 ``[N]`` sampled query positions in ``[0, S_q)``.
        group_size: queries per group; ``S_q % group_size == 0``.
        kv_block: tokens per key unit; ``S_kv % kv_block == 0``.
        scale: softmax scale of the exact attention.
        critical_mass: fraction of a row's mass its units must hold, in (0, 1].
        mask: optional :class:`CausalMask` (queries and keys one sequence): mass over the keys a
            row may read; forced units rank first, disallowed units last (as masked selection).
        q_offset: with ``mask``, the key token of query row 0 (a context-parallel shard's first
            token when ``k`` is the gathered sequence), as ``select_topk``'s; a multiple of
            ``group_size``, ``q_offset + S_q <= S_kv``. Without a mask it must be 0.
    """
    if q.dim() != 4 or k.dim() != 4 or q_lr.dim() != 4 or k_lr.dim() != 4:
        raise ValueError("q, k, q_lr and k_lr must be [B, H, S, D or r].")
    b, h, s_q, d = q.shape
    h_kv, s_kv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != d or h % h_kv:
        raise ValueError(f"k {tuple(k.shape)} does not match q {tuple(q.shape)} (B, D, or H a multiple of H_kv).")
    if q_lr.shape[:3] != q.shape[:3] or tuple(k_lr.shape[:3]) != (b, h, s_kv) or k_lr.shape[3] != q_lr.shape[3]:
        raise ValueError(
            f"q_lr {tuple(q_lr.shape)} / k_lr {tuple(k_lr.shape)} must be [B, H, S_q, r] / [B, H, S_kv, r] "
            f"for q {tuple(q.shape)} and k {tuple(k.shape)} (expand GQA key heads in k_lr, as project does)."
        )
    if s_q % group_size or s_kv % kv_block:
        raise ValueError(
            f"S_q={s_q} must be a multiple of group_size={group_size} and S_kv={s_kv} of kv_block={kv_block}."
        )
    if not 0 < critical_mass <= 1:
        raise ValueError(f"critical_mass must be in (0, 1], got {critical_mass}.")
    if rows.dim() != 1 or rows.numel() == 0 or int(rows.min()) < 0 or int(rows.max()) >= s_q:
        raise ValueError(f"rows must be a non-empty int64 [N] of positions in [0, {s_q}).")
    if mask is None and q_offset != 0:
        raise ValueError(f"q_offset={q_offset} places queries under a causal mask; pass mask= or q_offset=0.")
    if mask is not None and (q_offset < 0 or q_offset % group_size or q_offset + s_q > s_kv):
        raise ValueError(
            f"a causal mask needs the queries to be key tokens [q_offset, q_offset + S_q) of the keys, starting "
            f"on a query group; got q_offset={q_offset}, S_q={s_q}, S_kv={s_kv}, group_size={group_size}."
        )
    rep, g, r, n_units = h // h_kv, group_size, q_lr.shape[3], s_kv // kv_block
    groups, row_group = torch.unique(rows // g, return_inverse=True)
    gq = s_q // g
    proxy = group_proxies(q_lr.reshape(b, h, gq, g, r)[:, :, groups].flatten(2, 3), g)
    units = pool_keys(k_lr, kv_block)
    proxy_x = group_proxies(q.reshape(b, h, gq, g, d)[:, :, groups].flatten(2, 3), g).view(b, h_kv, rep, -1, d)
    units_x = pool_keys(k, kv_block)
    kf = k.float()
    chunk = max(1, _CHUNK_ELEMS // max(1, b * h * s_kv))
    sums = None
    for i in range(0, rows.numel(), chunk):
        r_c, g_c = rows[i : i + chunk], row_group[i : i + chunk]
        q_c = q[:, :, r_c].float().view(b, h_kv, rep, -1, d)
        logits = torch.einsum("bgjnd,bgsd->bgjns", q_c, kf) * scale
        if mask is not None:
            keys = torch.arange(s_kv, device=q.device)
            logits = logits.masked_fill(~mask.allowed(r_c.view(-1, 1) + q_offset, keys), float("-inf"))
        p = torch.softmax(logits, -1)
        unit_mass = p.flatten(1, 2).view(b, h, -1, n_units, kv_block).sum(-1)
        scores = torch.einsum("bhnr,bhur->bhnu", proxy[:, :, g_c], units)
        scores_x = torch.einsum("bgjnd,bgud->bgjnu", proxy_x[:, :, :, g_c], units_x).flatten(1, 2)
        if mask is not None:
            allowed, forced = mask.unit_classes(groups[g_c], g, kv_block, n_units, q_offset)
            scores, scores_x = (
                torch.where(forced, float("inf"), x.masked_fill(~allowed, float("-inf"))) for x in (scores, scores_x)
            )
        part = RecallCurve.from_unit_mass(unit_mass, scores, scores_x, critical_mass)
        sums = part if sums is None else sums + part
    return sums
