"""SparseIndex: the selection result handed from selection to sparse attention.

Queries are split into contiguous query groups of ``group_size`` tokens (a 3D cube of the
video in cube-major order, see ``ops/layout.py``). Every group of head ``h`` in sample ``b``
attends to the same ``kv_count[b, h]`` key units listed in ``kv_idx[b, h, g, :kv_count[b, h]]``.
A key unit is one token when ``kv_block == 1`` and a contiguous block of ``kv_block`` tokens
otherwise. Entries past ``kv_count`` are padding and hold ``-1``; valid entries are distinct and
sorted ascending, so kernels read keys in memory order.

Kernels trust these values (an entry out of range is an out-of-bounds read). An index the library
built (``select_topk``, the context-parallel plans) carries proof of validity, so the training
hot path pays nothing; any other index is checked once, with a host synchronisation, by
:meth:`SparseIndex.ensure_valid` before a kernel reads it. The proof records the tensors'
version counters, so an in-place edit of ``kv_idx``/``kv_count`` voids it.

Causal masks (``mask``, a :class:`~megatron_dsv.ops.mask.CausalMask`). The index lists units,
the mask says which token pairs inside them count: attention drops every disallowed pair, on
partial (diagonal) units token-wise. The contract above is unchanged: a group with fewer allowed
units than its head's K still lists K distinct units, the rest being disallowed units that the
mask removes entirely (so ``computed_pairs`` counts them; the Triton kernels never read them).
A masked index must also give every query a key it may read: the value check refuses a group
whose lowest unit starts past its first query's limit (selection always keeps the units holding
a group's own queries).

Query offset (``q_offset``, masked indices only): query row ``i`` is key token ``i + q_offset``
for the mask, so an index can hold one shard's queries against a longer key sequence (context
parallelism: a rank's queries against the gathered keys, or against a compacted key buffer whose
layout keeps the mask exact, ``cp/seq_parallel.py``). Then ``q_offset + S_q <= S_kv``.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from megatron_dsv.ops.mask import CausalMask

PAD = -1

_FIX_BUILD = (
    "build the index with megatron_dsv.ops.selection.select_topk, or keep each group's first "
    "kv_count[b, h] entries distinct, ascending and in [0, units), and -1 after them"
)


def _int_arg(name: str, value) -> int:
    """``value`` as an int; bools, floats and other non-integers are a TypeError."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an integer, got {value!r}.")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).") from None


@dataclass(frozen=True)
class SparseIndex:
    """Critical key units per (batch, head, query group).

    Attributes:
        kv_idx: int32 ``[B, H, Gq, Kmax]`` key-unit indices, ascending, ``-1`` past ``kv_count``.
        kv_count: int32 ``[B, H]`` number of valid entries per head (the head's K), ``>= 1``.
        group_size: queries per group; ``seq_len_q == Gq * group_size``.
        kv_block: tokens per key unit (1 = token granularity).
        seq_len_q: number of query tokens S_q.
        seq_len_kv: number of key tokens S_kv; ``seq_len_kv % kv_block == 0``.
        mask: optional :class:`CausalMask` over the key sequence; pairs it disallows are not
            computed, whatever units are listed.
        q_offset: key position of query row 0 under the mask (``>= 0``, ``q_offset + seq_len_q <=
            seq_len_kv``); 0 without a mask.
    """

    kv_idx: torch.Tensor
    kv_count: torch.Tensor
    group_size: int
    kv_block: int
    seq_len_q: int
    seq_len_kv: int
    mask: Optional[CausalMask] = None
    q_offset: int = 0
    # Version counters of (kv_idx, kv_count) when the values were known valid; set only by the
    # library (_mark_valid) and by ensure_valid, never by the constructor.
    _proof: Optional[Tuple[int, ...]] = field(default=None, init=False, repr=False, compare=False)

    def __post_init__(self):
        for name in ("group_size", "kv_block", "seq_len_q", "seq_len_kv", "q_offset"):
            object.__setattr__(self, name, _int_arg(f"SparseIndex.{name}", getattr(self, name)))
        self.validate(check_values=False)

    @property
    def batch_size(self) -> int:
        return self.kv_idx.shape[0]

    @property
    def num_heads(self) -> int:
        return self.kv_idx.shape[1]

    @property
    def num_groups(self) -> int:
        return self.kv_idx.shape[2]

    @property
    def max_count(self) -> int:
        return self.kv_idx.shape[3]

    @property
    def num_kv_units(self) -> int:
        return self.seq_len_kv // self.kv_block

    @property
    def verified(self) -> bool:
        """True if the values are known valid: built by the library, or checked by
        :meth:`ensure_valid`, and not modified in place since."""
        return self._proof is not None and self._proof == _versions(self)

    def ensure_valid(self) -> "SparseIndex":
        """Check the values once (one host synchronisation) unless :attr:`verified`.

        Called by the attention functions before any kernel reads the index: an index the
        library built costs nothing, a user-built one is checked on first use.
        """
        if not self.verified:
            self.validate(check_values=True)
            _mark_valid(self)
        return self

    def validate(self, check_values: bool = True) -> "SparseIndex":
        """Check shapes and dtypes; with ``check_values`` also ranges, order and padding.

        The value check reads the index back to the host (always, even for a verified index:
        tests use it to check the kernels that build indices); errors name the first offending
        (batch, head, group) and what to change.
        """
        idx, cnt = self.kv_idx, self.kv_count
        if idx.dtype != torch.int32 or cnt.dtype != torch.int32:
            raise TypeError(
                f"SparseIndex needs int32 kv_idx and kv_count, got {idx.dtype} and {cnt.dtype}; "
                "convert with .to(torch.int32)."
            )
        if idx.dim() != 4 or cnt.dim() != 2 or tuple(cnt.shape) != tuple(idx.shape[:2]):
            raise ValueError(
                f"SparseIndex needs kv_idx [B, H, Gq, Kmax] and kv_count [B, H]; got "
                f"{tuple(idx.shape)} and {tuple(cnt.shape)}."
            )
        if idx.device != cnt.device:
            raise ValueError("kv_idx and kv_count must live on the same device.")
        if self.group_size < 1 or self.kv_block < 1:
            raise ValueError(
                f"group_size ({self.group_size}) and kv_block ({self.kv_block}) must be >= 1."
            )
        if self.seq_len_q != idx.shape[2] * self.group_size:
            raise ValueError(
                f"seq_len_q={self.seq_len_q} must equal Gq*group_size="
                f"{idx.shape[2]}*{self.group_size}."
            )
        if self.seq_len_kv % self.kv_block != 0:
            raise ValueError(
                f"seq_len_kv={self.seq_len_kv} is not a multiple of kv_block={self.kv_block}."
            )
        if self.mask is not None:
            if not isinstance(self.mask, CausalMask):
                raise TypeError(
                    f"SparseIndex.mask must be a megatron_dsv.ops.mask.CausalMask or None, got "
                    f"{type(self.mask).__name__}."
                )
            if self.q_offset < 0 or self.q_offset + self.seq_len_q > self.seq_len_kv:
                raise ValueError(
                    f"a causal mask needs the queries to be key tokens [q_offset, q_offset + S_q) of the "
                    f"key sequence; got q_offset={self.q_offset}, S_q={self.seq_len_q}, S_kv={self.seq_len_kv}. "
                    "Pass the shard's first token as q_offset and keys covering it."
                )
        elif self.q_offset != 0:
            raise ValueError(
                f"q_offset={self.q_offset} places the queries for a causal mask; an index without a mask "
                "needs q_offset=0."
            )
        if idx.shape[3] > self.num_kv_units or idx.shape[3] < 1:
            raise ValueError(
                f"Kmax={idx.shape[3]} must be in [1, {self.num_kv_units}] (the number of key units)."
            )
        if check_values:
            self._check_values()
        return self

    def _check_values(self) -> None:
        idx, cnt = self.kv_idx.cpu().long(), self.kv_count.cpu().long()
        kmax, units = idx.shape[3], self.num_kv_units
        geometry = f"S_kv={self.seq_len_kv} / kv_block={self.kv_block} = {units} key units"

        def first(mask: torch.Tensor) -> Tuple[int, ...]:
            return tuple(int(i) for i in mask.nonzero()[0].tolist())

        def at(b: int, h: int, g: int) -> str:
            return f"(batch {b}, head {h}, group {g})"

        bad = (cnt < 1) | (cnt > kmax)
        if bool(bad.any()):
            b, h = first(bad)
            raise ValueError(
                f"kv_count[{b}, {h}] = {int(cnt[b, h])} must lie in [1, Kmax={kmax}] "
                f"(Kmax = kv_idx.shape[-1]): set each head's K to its number of valid entries."
            )
        bad = idx >= units
        if bool(bad.any()):
            b, h, g, p = first(bad)
            raise ValueError(
                f"kv_idx entries must lie in [0, {units}): {at(b, h, g)} lists key unit "
                f"{int(idx[b, h, g, p])} at position {p}, but the keys have {geometry}. Build the "
                f"index for these keys (seq_len_kv, kv_block) or {_FIX_BUILD}."
            )
        bad = idx < PAD
        if bool(bad.any()):
            b, h, g, p = first(bad)
            raise ValueError(
                f"kv_idx entries must lie in [0, {units}): {at(b, h, g)} holds {int(idx[b, h, g, p])} "
                f"at position {p}; the only negative value allowed is -1 (padding, after the "
                f"first kv_count[b, h] entries). Fix: {_FIX_BUILD}."
            )
        valid = torch.arange(kmax).view(1, 1, 1, -1) < cnt.view(*cnt.shape, 1, 1)
        pad = idx == PAD
        bad = pad != ~valid
        if bool(bad.any()):
            b, h, g, _ = first(bad)
            n_valid = int((~pad[b, h, g]).sum())
            raise ValueError(
                f"kv_idx must hold -1 exactly at the positions past kv_count: {at(b, h, g)} has "
                f"{n_valid} valid entries but kv_count[{b}, {h}] = {int(cnt[b, h])}. Set kv_count to "
                f"the number of valid entries of each head (every group of a head has the same "
                f"count), with the valid entries first and -1 after them."
            )
        both = valid[..., 1:] & valid[..., :-1]
        bad = (idx[..., 1:] <= idx[..., :-1]) & both
        if bool(bad.any()):
            b, h, g, p = first(bad)
            u, w = int(idx[b, h, g, p]), int(idx[b, h, g, p + 1])
            what = f"lists key unit {u} twice" if u == w else f"lists key unit {u} before {w}"
            raise ValueError(
                f"valid kv_idx entries must be distinct and ascending: {at(b, h, g)} {what}. "
                f"Sort and deduplicate each group's entries (torch.unique sorts them) and lower "
                f"kv_count to match, or {_FIX_BUILD}."
            )
        if self.mask is not None:
            self._check_masked(idx)

    def _check_masked(self, idx: torch.Tensor) -> None:
        """Every query must keep a key under the mask, or its softmax is empty (0/0). ``limit``
        is non-decreasing and a group's units ascend, so it suffices that the group's lowest unit
        starts at or before its first query's limit; the kernels rely on it (the first key tile a
        query tile reads then holds a key every row of it may read)."""
        first = torch.arange(idx.shape[2]) * self.group_size + self.q_offset
        lowest = idx[..., 0] * self.kv_block
        bad = lowest > self.mask.limit(first)
        if bool(bad.any()):
            b, h, g = (int(i) for i in bad.nonzero()[0].tolist())
            q0 = g * self.group_size + self.q_offset
            raise ValueError(
                f"under the {self.mask.kind} mask, (batch {b}, head {h}, group {g}) lists no key its "
                f"first query (token {q0}) may read: its lowest key unit {int(idx[b, h, g, 0])} starts "
                f"at token {int(lowest[b, h, g])}, past that query's last allowed key "
                f"{int(self.mask.limit(torch.tensor(q0)))}. A masked index must list the units holding "
                "each group's own queries (select_topk(..., mask=) keeps them); build it with "
                "select_topk or add those units."
            )

    def density(self) -> torch.Tensor:
        """Fraction of (query, key) pairs computed, per head: fp32 ``[B, H]``."""
        return self.kv_count.float() * self.kv_block / self.seq_len_kv

    def computed_pairs(self) -> int:
        """Number of (query, key) pairs the attention computes over all samples and heads."""
        return int(self.kv_count.long().sum()) * self.kv_block * self.seq_len_q

    def to_dense_mask(self) -> torch.Tensor:
        """Bool ``[B, H, S_q, S_kv]`` mask of computed pairs (the causal mask applied); for tests
        on small inputs only."""
        b, h, gq, _ = self.kv_idx.shape
        units = torch.zeros(b, h, gq, self.num_kv_units + 1, dtype=torch.bool, device=self.kv_idx.device)
        idx = self.kv_idx.long().clone()
        idx[idx < 0] = self.num_kv_units  # padding writes into the spare column
        units.scatter_(-1, idx, True)
        units = units[..., :-1].repeat_interleave(self.kv_block, dim=-1)
        pairs = units.repeat_interleave(self.group_size, dim=2)
        if self.mask is not None:
            q_pos = torch.arange(self.seq_len_q, device=pairs.device).view(-1, 1) + self.q_offset
            k_pos = torch.arange(self.seq_len_kv, device=pairs.device).view(1, -1)
            pairs = pairs & self.mask.allowed(q_pos, k_pos)
        return pairs

    def to(self, device: torch.device) -> "SparseIndex":
        moved = SparseIndex(
            self.kv_idx.to(device), self.kv_count.to(device), self.group_size, self.kv_block,
            self.seq_len_q, self.seq_len_kv, self.mask, self.q_offset,
        )
        return _mark_valid(moved) if self.verified else moved


def _versions(index: SparseIndex) -> Tuple[int, ...]:
    try:
        return (index.kv_idx._version, index.kv_count._version)
    except RuntimeError:  # inference-mode tensors have no version counter: in-place edits go unseen
        return ()


def _mark_valid(index: SparseIndex) -> SparseIndex:
    """Record that ``index`` is valid as it is now. Library code only, for indices valid by
    construction (selection results, context-parallel plans); never for user input."""
    object.__setattr__(index, "_proof", _versions(index))
    return index


def k_from_sparsity(sparsity: torch.Tensor, num_kv_units: int, multiple: int = 1, floor: int = 1) -> torch.Tensor:
    """Keys (or key units) to keep per head for a given sparsity: ``ceil((1 - s) * N)``.

    Rounded up to ``multiple`` (a kernel tile), at least ``floor``, at most ``num_kv_units``.
    Returns int32 of the same shape as ``sparsity``.
    """
    keep = torch.ceil((1.0 - sparsity.float().clamp(0.0, 1.0)) * num_kv_units)
    if multiple > 1:
        keep = torch.ceil(keep / multiple) * multiple
    keep = keep.clamp(min=max(1, floor), max=num_kv_units)
    return keep.to(torch.int32)


def num_groups(seq_len: int, group_size: int) -> int:
    """Number of query groups; raises if ``seq_len`` is not a multiple of ``group_size``."""
    if isinstance(group_size, bool) or not isinstance(group_size, int):
        try:
            group_size = _int_arg("group_size", group_size)
        except TypeError:
            raise TypeError(
                f"the query group size must be an integer number of queries, got {group_size!r}; "
                "pass e.g. 64 (a 4x4x4 cube, --dsv-query-group 4x4x4)."
            ) from None
    if group_size < 1:
        raise ValueError(
            f"the query group size must be >= 1 query, got {group_size}; pass the number of "
            "queries per group, e.g. 64 (a 4x4x4 cube, --dsv-query-group 4x4x4)."
        )
    if seq_len % group_size != 0:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of the query group size {group_size}: "
            "choose a video latent shape whose (T, H, W) are multiples of --dsv-query-group, "
            "or a smaller query group."
        )
    return seq_len // group_size


__all__ = ["SparseIndex", "PAD", "k_from_sparsity", "num_groups"]
