"""Causal attention masks in SparseIndex terms: token-causal and chunk-causal.

Both masks allow key token ``j`` for query token ``i`` iff ``j <= limit(i)``, with ``limit``
non-decreasing:

* ``causal``: ``limit(i) = i`` (a causal language model);
* ``chunk_causal`` with chunks of ``T`` tokens: ``limit(i) = (i // T + 1) * T - 1``: full
  attention inside a chunk, causal across chunks (autoregressive video generated chunk by chunk).

Against a query group ``g`` (tokens ``[g*G, (g+1)*G)``) a key unit ``u`` (tokens
``[u*kvb, (u+1)*kvb)``) is *full* (every query of the group may read every key of the unit),
*partial* (some pairs allowed: the unit needs the token-wise mask) or *disallowed*.

Video token order. VideoDiT orders tokens cube-major (``ops/layout.py``): cubes sorted by
``(t // ct, h // ch, w // cw)``, time slowest. All tokens of frames ``[c*ct, (c+1)*ct)`` (one
layer of cubes) therefore form one contiguous run of ``ct * H * W`` tokens, and a chunk of ``f``
frames with ``f % ct == 0`` is ``f / ct`` consecutive cube layers: the contiguous token range
``[c*f*H*W, (c+1)*f*H*W)``. A chunk whose frame count is not a multiple of the cube's ``t``
would cut cubes, whose tokens interleave frames, so :meth:`CausalMask.from_frames` refuses it.

Selection keeps the *forced* units of a group first: its partial units and the units holding its
own queries. Then every query reads at least its own key (no empty softmax row) and the
diagonal is always attended. A head's K must therefore be at least :meth:`CausalMask.max_forced`.
A query whose readable keys all lie in its group's forced units reads the same keys at every K
(:meth:`CausalMask.rows_with_choice` is False for it): the predictor's statistics leave it out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

KINDS = ("causal", "chunk_causal")


@dataclass(frozen=True)
class CausalMask:
    """Which (query, key) token pairs attention may compute; see the module docstring.

    Attributes:
        kind: ``"causal"`` (key ``j`` allowed for query ``i`` iff ``j <= i``) or
            ``"chunk_causal"`` (iff ``j // chunk_tokens <= i // chunk_tokens``).
        chunk_tokens: tokens per chunk for ``chunk_causal`` (>= 1); must be 0 for ``causal``.

    Queries and keys are the same sequence (self-attention): token ``i`` of the queries is token
    ``i`` of the keys.
    """

    kind: str
    chunk_tokens: int = 0

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"CausalMask kind must be one of {KINDS}, got {self.kind!r}.")
        if isinstance(self.chunk_tokens, bool) or not isinstance(self.chunk_tokens, int):
            raise TypeError(f"chunk_tokens must be an int, got {self.chunk_tokens!r}.")
        if self.kind == "chunk_causal" and self.chunk_tokens < 1:
            raise ValueError(
                f"a chunk_causal mask needs chunk_tokens >= 1 (tokens per chunk), got {self.chunk_tokens}."
            )
        if self.kind == "causal" and self.chunk_tokens != 0:
            raise ValueError(
                f"a causal mask has no chunks: pass chunk_tokens=0 (got {self.chunk_tokens}), or "
                "kind='chunk_causal'."
            )

    @classmethod
    def from_frames(cls, frames: int, frame_tokens: int, cube_t: int) -> "CausalMask":
        """Chunk-causal mask over chunks of ``frames`` frames of ``frame_tokens`` (= H*W) tokens
        each, for tokens in cube-major order with cubes ``cube_t`` frames deep."""
        if frames < 1 or frame_tokens < 1 or cube_t < 1:
            raise ValueError(f"frames ({frames}), frame_tokens ({frame_tokens}) and cube_t ({cube_t}) must be >= 1.")
        if frames % cube_t:
            raise ValueError(
                f"a causal chunk of {frames} frames cuts the query-group cubes ({cube_t} frames deep): "
                "in cube-major order a cube's tokens interleave its frames, so a chunk is a contiguous "
                f"token range only when its frame count is a multiple of {cube_t}. Set --dsv-causal-chunk "
                f"to a multiple of the cube's t ({cube_t}) or change --dsv-query-group."
            )
        return cls("chunk_causal", frames * frame_tokens)

    def limit(self, pos: torch.Tensor) -> torch.Tensor:
        """Last key token each query position may read (same shape and dtype as ``pos``)."""
        if self.kind == "causal":
            return pos
        return (pos // self.chunk_tokens + 1) * self.chunk_tokens - 1

    def allowed(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bool, broadcast of ``q_pos`` and ``k_pos``: key ``k_pos`` allowed for query ``q_pos``."""
        return k_pos <= self.limit(q_pos)

    def dense(self, seq_len: int, device=None) -> torch.Tensor:
        """Bool ``[S, S]`` keep-mask (SDPA's convention: True = attend); S x S memory."""
        pos = torch.arange(seq_len, device=device)
        return self.allowed(pos.view(-1, 1), pos.view(1, -1))

    def unit_classes(self, groups: torch.Tensor, group_size: int, kv_block: int, num_units: int, q_offset: int = 0):
        """``(allowed, forced)``, bool ``[N, U]`` for query groups ``groups`` (int64 ``[N]``) whose
        queries start at key token ``q_offset``: ``allowed``: the unit holds a key some query of
        the group may read (full or partial); ``forced``: partial units and the units holding the
        group's own queries, which selection always keeps."""
        first = groups.view(-1, 1) * group_size + q_offset
        last = first + group_size - 1
        u = torch.arange(num_units, device=groups.device).view(1, -1)
        lo, hi = u * kv_block, (u + 1) * kv_block - 1
        full = hi <= self.limit(first)
        allowed = lo <= self.limit(last)
        own = (lo <= last) & (hi >= first)
        return allowed, (allowed & ~full) | own

    def forced_count(self, seq_len: int, group_size: int, kv_block: int) -> torch.Tensor:
        """Forced units of every query group, int64 ``[S / G]``, from interval arithmetic (no
        ``[Gq, U]`` table): the own units ``[first // kvb, last // kvb]`` and the partial units
        ``[(limit(first) + 1) // kvb, limit(last) // kvb]``, clipped to the sequence."""
        first = torch.arange(0, seq_len, group_size, dtype=torch.int64)
        last = first + group_size - 1
        a0, a1 = first // kv_block, last // kv_block + 1
        b0 = (self.limit(first) + 1) // kv_block
        b1 = self.allowed_count(seq_len, group_size, kv_block)
        len_b = (b1 - b0).clamp(min=0)
        overlap = (torch.minimum(a1, b1) - torch.maximum(a0, b0)).clamp(min=0)
        return (a1 - a0) + len_b - overlap

    def allowed_count(self, seq_len: int, group_size: int, kv_block: int) -> torch.Tensor:
        """Units each query group may read (full or partial), int64 ``[S / G]``: ``[0,
        limit(last) // kv_block]`` clipped to the sequence (``limit`` is non-decreasing)."""
        last = torch.arange(group_size - 1, seq_len, group_size, dtype=torch.int64)
        return torch.clamp(self.limit(last) // kv_block + 1, max=seq_len // kv_block)

    def selected_fraction(self, k: torch.Tensor, seq_len: int, group_size: int, kv_block: int) -> float:
        """Fraction of the allowed (query group, key unit) pairs that K units per head select,
        averaged over heads: a group with fewer allowed units than K takes them all (selection's
        rule), so ``K / units`` understates the work. Token-causal, S=16k, 64x64 blocks: K = 125
        of 256 units (0.49) selects 74% of the allowed pairs."""
        allowed = self.allowed_count(seq_len, group_size, kv_block).to(torch.float64)
        taken = torch.minimum(k.detach().to(torch.float64).cpu().view(-1, 1), allowed.view(1, -1))
        return float((taken.sum(-1) / allowed.sum()).mean())

    def rows_with_choice(self, rows: torch.Tensor, group_size: int, kv_block: int, seq_len: int) -> torch.Tensor:
        """Bool ``[N]`` for query positions ``rows`` (int64 ``[N]`` in ``[0, seq_len)``): True where
        the row may read a key in a unit its query group does not always keep, so selection's
        ranking decides what the row attends to; False where every key the row may read lies in
        its group's forced units (partial units and those holding the group's queries), which
        selection keeps at any K.

        Every query of a group may read all of the group's full units (``limit`` is
        non-decreasing), and the forced units are its own units and the units that are not full,
        so a row has a choice iff its group has a full unit outside its own units: a property of
        the row's group, found by interval arithmetic (full units ``[0, f)`` with ``f = (limit(first)
        + 1) // kv_block``, own units ``[first // kv_block, last // kv_block]``). Token-causal:
        the groups starting before ``kv_block`` (they read no whole unit outside their own)."""
        if rows.dim() != 1 or rows.dtype != torch.int64:
            raise ValueError(f"rows must be int64 [N] query positions, got {rows.dtype} {tuple(rows.shape)}.")
        if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= seq_len):
            raise ValueError(f"row positions must lie in [0, {seq_len}); got [{int(rows.min())}, {int(rows.max())}].")
        first = rows // group_size * group_size
        last = torch.clamp(first + group_size - 1, max=seq_len - 1)
        full = torch.clamp((self.limit(first) + 1) // kv_block, max=seq_len // kv_block)
        own_lo, own_hi = first // kv_block, last // kv_block
        return (full > 0) & ((own_lo > 0) | (own_hi < full - 1))

    def max_forced(self, seq_len: int, group_size: int, kv_block: int) -> int:
        """The smallest K (key units per head) that holds every group's forced units."""
        return int(self.forced_count(seq_len, group_size, kv_block).max())

    def check_k(self, k_min: int, seq_len: int, group_size: int, kv_block: int) -> None:
        """Raise unless K = ``k_min`` holds every group's forced units."""
        need = self.max_forced(seq_len, group_size, kv_block)
        if k_min < need:
            raise ValueError(
                f"with a {self.kind} mask every query group keeps its partial (diagonal) key units and "
                f"the units holding its own queries, up to {need} units here (group size {group_size}, "
                f"kv_block {kv_block}); K per head = {k_min} is too small. Raise K to at least {need} "
                "(--dsv-min-keys) or use a kv_block that aligns with the query groups."
            )

    def relation(self, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> str:
        """How queries ``[q_lo, q_hi)`` relate to keys ``[k_lo, k_hi)`` (token ranges, non-empty):
        ``"full"`` (every pair allowed), ``"none"`` (no pair allowed) or ``"partial"``."""
        if k_hi - 1 <= int(self.limit(torch.tensor(q_lo))):
            return "full"
        if k_lo > int(self.limit(torch.tensor(q_hi - 1))):
            return "none"
        return "partial"

    def local(self, start: int, length: int) -> Optional["CausalMask"]:
        """The mask between queries and keys of one token range ``[start, start + length)``, in
        range-local positions: the mask itself when it is shift-invariant there (token-causal; a
        chunk-causal range starting on a chunk boundary), None when the range lies inside one
        chunk (every pair allowed). A range that starts inside a chunk and crosses its end has
        shifted chunk boundaries, which no CausalMask expresses: ValueError (see
        :meth:`check_shards`)."""
        if self.kind == "causal" or start % self.chunk_tokens == 0:
            return self
        if start // self.chunk_tokens == (start + length - 1) // self.chunk_tokens:
            return None
        raise ValueError(
            f"tokens [{start}, {start + length}) start inside a causal chunk of {self.chunk_tokens} tokens "
            "and cross its end; see CausalMask.check_shards."
        )

    def check_shards(self, seq_len: int, shard: int, what: str = "context-parallel sequence shard") -> None:
        """Raise unless contiguous shards of ``shard`` tokens leave every (query shard, key shard)
        pair fully allowed, fully disallowed or a shift of the mask itself: always for
        token-causal; for chunk-causal when a shard holds whole chunks (``shard % T == 0``) or a
        chunk whole shards (``T % shard == 0``)."""
        if self.kind == "causal" or shard % self.chunk_tokens == 0 or self.chunk_tokens % shard == 0:
            return
        raise ValueError(
            f"a {what} of {shard} tokens (of {seq_len}) cuts the causal chunks of {self.chunk_tokens} tokens: "
            "a shard must hold whole chunks or lie inside one chunk (one must divide the other), or its "
            "attention to another shard is partly masked in a way the kernels do not take. Choose a causal "
            "chunk (--dsv-causal-chunk, frames) and a context-parallel split whose shard (sequence / "
            "sequence-parallel size) is a multiple or a divisor of the chunk's tokens."
        )

    def allowed_pairs(self, q_lo: int, q_hi: int, k_lo: int, k_hi: int) -> int:
        """Allowed (query, key) pairs between queries ``[q_lo, q_hi)`` and keys ``[k_lo, k_hi)``
        (exact, O(q_hi - q_lo) arithmetic, no pair table)."""
        lim = self.limit(torch.arange(q_lo, q_hi, dtype=torch.int64))
        return int((torch.clamp(lim, max=k_hi - 1) - k_lo + 1).clamp(min=0).sum())


__all__ = ["CausalMask", "KINDS"]
