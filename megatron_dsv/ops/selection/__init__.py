"""Critical-key selection from low-rank query/key projections.

Non-finite predictor output (the contract, the same on every backend): a score
``proxy_g . unit_j`` that is NaN or +-Inf ranks below every finite score. A group keeps its top
``K`` finite units; if it has fewer than ``K`` finite scores it keeps all of them and fills up
with the non-finite units of lowest position. So a NaN row of ``k_lr`` makes its key unit the
last choice of every group, and a NaN in a group's ``q_lr`` makes that group keep the first
``K`` units; the index stays valid and both backends return the same one. Nothing is raised
and no host synchronisation is added: call :func:`check_finite` (one host sync) where an error
is wanted, e.g. on profiling iterations, to stop or fall back to dense attention.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from megatron_dsv.ops._utils import check_finite, resolve_backend
from megatron_dsv.ops.mask import CausalMask
from megatron_dsv.ops.options import KernelOptions, resolve_options
from megatron_dsv.ops.selection.naive import group_proxies, pool_keys, select_topk_reference
from megatron_dsv.ops.sparse_index import SparseIndex, _int_arg, _mark_valid, num_groups

KPerHead = Union[int, Sequence[int], torch.Tensor]


def normalize_k_per_head(k_per_head: KPerHead, batch: int, heads: int, num_units: int, device) -> torch.Tensor:
    """Turn an int, a per-head list, an ``[H]`` or a ``[B, H]`` tensor into int32 ``[B, H]``
    on ``device`` (see :func:`_k_per_head` for the checks)."""
    return _k_per_head(k_per_head, batch, heads, num_units, device)[0]


def _k_per_head(k_per_head: KPerHead, batch: int, heads: int, num_units: int, device) -> Tuple[torch.Tensor, int, int]:
    """``(K int32 [B, H] on device, min K, max K)``, the extremes read on the host.

    Values must be integers (a float such as 16.5 is an error, never truncated) in
    ``[1, num_units]``; they are checked on the host (a device tensor is copied there).
    """
    try:
        k = torch.as_tensor(k_per_head).to("cpu")
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(
            f"k_per_head must be an int, a list of ints or an integer tensor, got {k_per_head!r} ({err})."
        ) from None
    if k.dtype == torch.bool or k.is_complex():
        raise TypeError(f"k_per_head must hold integers (key units per head), got dtype {k.dtype}.")
    if k.is_floating_point():
        bad = ~torch.isfinite(k) | (k != torch.round(k))
        if bool(bad.any()):
            value = float(k.flatten()[bad.flatten().nonzero()[0, 0]])
            raise ValueError(
                f"k_per_head must hold whole numbers of key units, got {value}: round it "
                f"yourself (math.ceil keeps at least the requested density) and pass an int."
            )
    k = k.to(torch.int64)
    if k.dim() == 0:
        k = k.expand(batch, heads)
    elif k.dim() == 1:
        if k.numel() != heads:
            raise ValueError(f"k_per_head has {k.numel()} entries for {heads} heads.")
        k = k.view(1, heads).expand(batch, heads)
    elif tuple(k.shape) != (batch, heads):
        raise ValueError(f"k_per_head must be an int, [H] or [B, H]; got shape {tuple(k.shape)}.")
    k_min, k_max = int(k.min()), int(k.max())
    if k_min < 1:
        raise ValueError(
            f"k_per_head must lie in [1, {num_units}] (the number of key units = S_kv / kv_block); "
            f"got {k_min}: every head keeps at least 1 key unit, raise K to 1 or more."
        )
    if k_max > num_units:
        raise ValueError(
            f"k_per_head must lie in [1, {num_units}] (the number of key units = S_kv / kv_block); "
            f"got {k_max}. Lower the density or use a smaller kv_block."
        )
    k = k.to(torch.int32).contiguous()
    if torch.device(device).type == "cuda":
        # From pinned memory without blocking: a pageable copy makes the host wait for every
        # kernel already queued (torch synchronises the stream after it), and so does reading
        # the max back from the device. Each sparse layer's forward did both (two host syncs).
        return k.pin_memory().to(device, non_blocking=True), k_min, k_max
    return k.to(device), k_min, k_max


def select_topk(
    q_lr: torch.Tensor,
    k_lr: torch.Tensor,
    group_size: int,
    k_per_head: KPerHead,
    kv_block: int = 1,
    backend: str = "auto",
    *,
    options: Optional[KernelOptions] = None,
    mask: Optional[CausalMask] = None,
    q_offset: int = 0,
) -> SparseIndex:
    """Pick each query group's critical key units from low-rank projections.

    Non-finite scores rank last, the same on every backend (see the module docstring); use
    :func:`check_finite` to turn them into an error.

    Args:
        q_lr: ``[B, H, S_q, r]`` low-rank queries (cube-major order).
        k_lr: ``[B, H, S_kv, r]`` low-rank keys.
        group_size: queries per group G; ``S_q % G == 0``.
        k_per_head: key units kept per head: int, ``[H]`` or ``[B, H]``; each in
            ``[1, S_kv / kv_block]``.
        kv_block: tokens per key unit; 1 selects single keys, n selects blocks of n keys.
        backend: ``"auto"`` (Triton on CUDA tensors, the reference otherwise; the choice is
            logged once, see :func:`megatron_dsv.ops.choose_backend`), ``"triton"`` (CPU tensors
            need ``TRITON_INTERPRET=1``) or ``"reference"``.
        options: Triton kernel variant (:class:`~megatron_dsv.ops.options.KernelOptions`);
            ``None`` = the defaults. The reference ignores it.
        mask: optional :class:`~megatron_dsv.ops.mask.CausalMask` (self-attention, ``S_q ==
            S_kv``): each group keeps its forced units (partial/diagonal ones and those holding
            its own queries; K must be at least :meth:`CausalMask.max_forced`), then its best
            allowed units; a group with fewer allowed units than K keeps all of them and fills up
            with disallowed units, which attention drops (see ``selection/naive.py``). The index
            carries the mask. Both backends give the same index (the Triton kernels' ``MASK``
            specialisation, see ``selection/triton.py``; equal on an H200 and in the interpreter,
            ``tests/ops/test_selection_triton_masked.py``).
        q_offset: with ``mask``, the key token of query row 0 (a sequence shard's first token
            when ``k_lr`` is the gathered sequence); a multiple of ``group_size``,
            ``q_offset + S_q <= S_kv``. The index
            carries it.

    Returns:
        :class:`SparseIndex` with ``kv_idx [B, H, S_q/G, max K]`` sorted ascending, marked as
        valid (attention reads it without checking its values again).
    """
    options = resolve_options(options)
    if q_lr.dim() != 4 or k_lr.dim() != 4:
        raise ValueError(f"q_lr and k_lr must be [B, H, S, r]; got {tuple(q_lr.shape)}, {tuple(k_lr.shape)}.")
    b, h, s_q, r = q_lr.shape
    if k_lr.shape[0] != b or k_lr.shape[1] != h or k_lr.shape[3] != r:
        raise ValueError(f"q_lr {tuple(q_lr.shape)} and k_lr {tuple(k_lr.shape)} disagree on B, H or r.")
    if not q_lr.is_floating_point() or not k_lr.is_floating_point():
        raise TypeError(f"q_lr and k_lr must be floating point, got {q_lr.dtype} and {k_lr.dtype}.")
    if q_lr.device != k_lr.device:
        raise ValueError(f"q_lr and k_lr must be on the same device, got {q_lr.device} and {k_lr.device}.")
    num_groups(s_q, group_size)
    group_size = _int_arg("group_size", group_size)
    s_kv = k_lr.shape[2]
    kv_block = _int_arg("kv_block", kv_block)
    if kv_block < 1:
        raise ValueError(f"kv_block must be >= 1 (tokens per key unit; 1 selects single keys), got {kv_block}.")
    if s_kv % kv_block:
        raise ValueError(
            f"key length {s_kv} is not a multiple of kv_block={kv_block}; choose a kv_block that "
            "divides the sequence length (--dsv-kv-block)."
        )
    if mask is not None:
        if not isinstance(mask, CausalMask):
            raise TypeError(f"mask must be a megatron_dsv.ops.mask.CausalMask or None, got {type(mask).__name__}.")
        q_offset = _int_arg("q_offset", q_offset)
        if q_offset % group_size:
            raise ValueError(
                f"q_offset={q_offset} must be a multiple of the query group size {group_size}: the shard's "
                "groups must be groups of the whole sequence, whose forced units the K floor "
                "(CausalMask.max_forced) counts. Shard the sequence into whole query groups."
            )
        if q_offset < 0 or q_offset + s_q > s_kv:
            raise ValueError(
                f"a causal mask needs the queries to be key tokens [q_offset, q_offset + S_q) of the keys; "
                f"got q_offset={q_offset}, S_q={s_q}, S_kv={s_kv}."
            )
    elif q_offset != 0:
        raise ValueError(f"q_offset={q_offset} places queries under a causal mask; pass mask= or q_offset=0.")
    backend = resolve_backend(backend, q_lr, "megatron_dsv.ops.selection.triton", "selection")
    kv_count, k_min, k_max = _k_per_head(k_per_head, b, h, s_kv // kv_block, q_lr.device)
    if mask is not None:
        # over the whole key sequence: the K rule is global, and a shard's groups need no more
        mask.check_k(k_min, s_kv, group_size, kv_block)
    if backend == "triton":
        from megatron_dsv.ops.selection.triton import select_topk_triton

        index = select_topk_triton(q_lr, k_lr, group_size, kv_count, kv_block, options=options, k_max=k_max,
                                   mask=mask, q_offset=q_offset)
    else:
        index = select_topk_reference(q_lr, k_lr, group_size, kv_count, kv_block, mask=mask, q_offset=q_offset,
                                      k_max=k_max)
    return _mark_valid(index)



__all__ = ["select_topk", "group_proxies", "pool_keys", "normalize_k_per_head", "check_finite"]
