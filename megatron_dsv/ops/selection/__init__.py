"""Critical-key selection from low-rank query/key projections."""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from megatron_dsv.ops._utils import resolve_backend
from megatron_dsv.ops.options import KernelOptions, resolve_options
from megatron_dsv.ops.selection.naive import group_proxies, pool_keys, select_topk_reference
from megatron_dsv.ops.sparse_index import SparseIndex, num_groups

KPerHead = Union[int, Sequence[int], torch.Tensor]


def normalize_k_per_head(k_per_head: KPerHead, batch: int, heads: int, num_units: int, device) -> torch.Tensor:
    """Turn an int, a per-head list, an ``[H]`` or a ``[B, H]`` tensor into int32 ``[B, H]``."""
    k = torch.as_tensor(k_per_head, dtype=torch.int64).to("cpu")
    if k.dim() == 0:
        k = k.expand(batch, heads)
    elif k.dim() == 1:
        if k.numel() != heads:
            raise ValueError(f"k_per_head has {k.numel()} entries for {heads} heads.")
        k = k.view(1, heads).expand(batch, heads)
    elif tuple(k.shape) != (batch, heads):
        raise ValueError(f"k_per_head must be an int, [H] or [B, H]; got shape {tuple(k.shape)}.")
    if int(k.min()) < 1 or int(k.max()) > num_units:
        raise ValueError(
            f"k_per_head must lie in [1, {num_units}] (the number of key units = S_kv / kv_block); "
            f"got [{int(k.min())}, {int(k.max())}]. Lower the density or use a smaller kv_block."
        )
    return k.to(device=device, dtype=torch.int32).contiguous()


def select_topk(
    q_lr: torch.Tensor,
    k_lr: torch.Tensor,
    group_size: int,
    k_per_head: KPerHead,
    kv_block: int = 1,
    backend: str = "auto",
    *,
    options: Optional[KernelOptions] = None,
) -> SparseIndex:
    """Pick each query group's critical key units from low-rank projections.

    Args:
        q_lr: ``[B, H, S_q, r]`` low-rank queries (cube-major order).
        k_lr: ``[B, H, S_kv, r]`` low-rank keys.
        group_size: queries per group G; ``S_q % G == 0``.
        k_per_head: key units kept per head: int, ``[H]`` or ``[B, H]``; each in
            ``[1, S_kv / kv_block]``.
        kv_block: tokens per key unit; 1 selects single keys, n selects blocks of n keys.
        backend: ``"auto"`` (Triton on CUDA tensors, the reference otherwise), ``"triton"``
            (CPU tensors run under ``TRITON_INTERPRET=1``) or ``"reference"``.
        options: Triton kernel variant (:class:`~megatron_dsv.ops.options.KernelOptions`);
            ``None`` = the defaults. The reference ignores it.

    Returns:
        :class:`SparseIndex` with ``kv_idx [B, H, S_q/G, max K]`` sorted ascending.
    """
    options = resolve_options(options)
    if q_lr.dim() != 4 or k_lr.dim() != 4:
        raise ValueError(f"q_lr and k_lr must be [B, H, S, r]; got {tuple(q_lr.shape)}, {tuple(k_lr.shape)}.")
    b, h, s_q, r = q_lr.shape
    if k_lr.shape[0] != b or k_lr.shape[1] != h or k_lr.shape[3] != r:
        raise ValueError(f"q_lr {tuple(q_lr.shape)} and k_lr {tuple(k_lr.shape)} disagree on B, H or r.")
    if not q_lr.is_floating_point() or not k_lr.is_floating_point():
        raise TypeError(f"q_lr and k_lr must be floating point, got {q_lr.dtype} and {k_lr.dtype}.")
    num_groups(s_q, group_size)
    s_kv = k_lr.shape[2]
    if kv_block < 1 or s_kv % kv_block:
        raise ValueError(f"key length {s_kv} is not a multiple of kv_block={kv_block}.")
    kv_count = normalize_k_per_head(k_per_head, b, h, s_kv // kv_block, q_lr.device)
    backend = resolve_backend(backend, q_lr, "megatron_dsv.ops.selection.triton", "selection")
    if backend == "triton":
        from megatron_dsv.ops.selection.triton import select_topk_triton

        return select_topk_triton(q_lr, k_lr, group_size, kv_count, kv_block, options=options)
    return select_topk_reference(q_lr, k_lr, group_size, kv_count, kv_block)



__all__ = ["select_topk", "group_proxies", "pool_keys", "normalize_k_per_head"]
