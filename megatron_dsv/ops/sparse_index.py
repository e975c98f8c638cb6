"""SparseIndex: the selection result handed from selection to sparse attention.

Queries are split into contiguous query groups of ``group_size`` tokens (a 3D cube of the
video in cube-major order, see ``ops/layout.py``). Every group of head ``h`` in sample ``b``
attends to the same ``kv_count[b, h]`` key units listed in ``kv_idx[b, h, g, :kv_count[b, h]]``.
A key unit is one token when ``kv_block == 1`` and a contiguous block of ``kv_block`` tokens
otherwise. Entries past ``kv_count`` are padding and hold ``-1``; valid entries are distinct and
sorted ascending, so kernels read keys in memory order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PAD = -1


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
    """

    kv_idx: torch.Tensor
    kv_count: torch.Tensor
    group_size: int
    kv_block: int
    seq_len_q: int
    seq_len_kv: int

    def __post_init__(self):
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

    def validate(self, check_values: bool = True) -> "SparseIndex":
        """Check shapes and dtypes; with ``check_values`` also ranges, order and padding.

        The value check reads the index back to the host; it is for tests and debugging, not
        for the training hot path.
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
        if idx.shape[3] > self.num_kv_units or idx.shape[3] < 1:
            raise ValueError(
                f"Kmax={idx.shape[3]} must be in [1, {self.num_kv_units}] (the number of key units)."
            )
        if check_values:
            cnt_h = cnt.cpu()
            if int(cnt_h.min()) < 1 or int(cnt_h.max()) > idx.shape[3]:
                raise ValueError(
                    f"kv_count must lie in [1, Kmax={idx.shape[3]}], got "
                    f"[{int(cnt_h.min())}, {int(cnt_h.max())}]."
                )
            idx_h = idx.cpu().long()
            pos = torch.arange(idx.shape[3])
            valid = pos.view(1, 1, 1, -1) < cnt_h.long().view(*cnt_h.shape, 1, 1)
            if bool(((idx_h != PAD) != valid).any()):
                raise ValueError("kv_idx must hold -1 exactly at the positions past kv_count.")
            if bool(((idx_h < 0) & valid).any()) or bool((idx_h >= self.num_kv_units).any()):
                raise ValueError(f"kv_idx entries must lie in [0, {self.num_kv_units}).")
            both = valid[..., 1:] & valid[..., :-1]
            if bool(((idx_h[..., 1:] <= idx_h[..., :-1]) & both).any()):
                raise ValueError("valid kv_idx entries must be distinct and ascending.")
        return self

    def density(self) -> torch.Tensor:
        """Fraction of (query, key) pairs computed, per head: fp32 ``[B, H]``."""
        return self.kv_count.float() * self.kv_block / self.seq_len_kv

    def computed_pairs(self) -> int:
        """Number of (query, key) pairs the attention computes over all samples and heads."""
        return int(self.kv_count.long().sum()) * self.kv_block * self.seq_len_q

    def to_dense_mask(self) -> torch.Tensor:
        """Bool ``[B, H, S_q, S_kv]`` mask of computed pairs; for tests on small inputs only."""
        b, h, gq, _ = self.kv_idx.shape
        units = torch.zeros(b, h, gq, self.num_kv_units + 1, dtype=torch.bool, device=self.kv_idx.device)
        idx = self.kv_idx.long().clone()
        idx[idx < 0] = self.num_kv_units  # padding writes into the spare column
        units.scatter_(-1, idx, True)
        units = units[..., :-1].repeat_interleave(self.kv_block, dim=-1)
        return units.repeat_interleave(self.group_size, dim=2)

    def to(self, device: torch.device) -> "SparseIndex":
        return SparseIndex(
            self.kv_idx.to(device), self.kv_count.to(device), self.group_size, self.kv_block,
            self.seq_len_q, self.seq_len_kv,
        )


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
    if seq_len % group_size != 0:
        raise ValueError(
            f"sequence length {seq_len} is not a multiple of the query group size {group_size}: "
            "choose a video latent shape whose (T, H, W) are multiples of --dsv-query-group, "
            "or a smaller query group."
        )
    return seq_len // group_size


__all__ = ["SparseIndex", "PAD", "k_from_sparsity", "num_groups"]
