"""Softmax attention over the critical keys of each query group (forward and backward).

Non-finite q, k or v propagate the same way on every backend: an output row (and its LSE) is NaN
when its query or a key it attends to is NaN, and when a value it attends to is NaN its output
row is; keys a group did not select, padding included, never touch it. Nothing is checked in
the hot path; :func:`check_finite` (one host sync) turns non-finite inputs into an error.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple

import torch

import logging

from megatron_dsv.ops._utils import (
    BackendChoice,
    check_finite,
    check_floating,
    check_head_dim,
    choose_backend,
    log_once,
    resolve_backend,
)
from megatron_dsv.ops.options import KernelOptions, resolve_options
from megatron_dsv.ops.sparse_attention.naive import (
    masked_dense_attention,
    sparse_attention_backward_reference,
    sparse_attention_reference,
)
from megatron_dsv.ops.sparse_index import SparseIndex


def sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: SparseIndex,
    scale: Optional[float] = None,
    backend: str = "auto",
    out_layout: str = "bhsd",
    *,
    options: Optional[KernelOptions] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Attention of each query group over its selected keys.

    Args:
        q: ``[B, H, S_q, D]`` queries in cube-major order.
        k, v: ``[B, H_kv, S_kv, D]``; ``H % H_kv == 0`` (grouped-query attention).
        index: :class:`SparseIndex` with ``[B, H, S_q/G, Kmax]`` key units. One that the library
            did not build (``select_topk``) has its values checked on first use (one host sync;
            ValueError naming the bad (batch, head, group)). An index with a causal ``mask``
            runs on Triton or the reference; cuDNN's block-sparse attention has no token mask,
            so ``"auto"`` skips it and ``"cudnn"`` raises ValueError.
        scale: softmax scale, default ``1/sqrt(D)``.
        backend: ``"auto"`` (NVIDIA cuDNN's block-sparse attention where
            :func:`~megatron_dsv.ops.sparse_attention.cudnn.cudnn_supported` says it serves the
            case, else Triton on CUDA tensors, the reference otherwise; see
            :func:`attention_backend`), ``"cudnn"``, ``"triton"`` (CPU tensors need
            ``TRITON_INTERPRET=1``) or ``"reference"``.
        out_layout: memory order of ``out``: ``"bhsd"`` (contiguous) or ``"sbhd"`` (a
            ``[B, H, S, D]`` view of ``[S, B, H, D]`` memory, so Megatron's ``[s, b, h*d]`` is a
            free view of it). Values are the same.
        options: Triton kernel variant (:class:`~megatron_dsv.ops.options.KernelOptions`);
            ``None`` = the defaults. The reference ignores it.

    Returns:
        ``out [B, H, S_q, D]`` in q's dtype and ``lse [B, H, S_q]`` in fp32 (fp64 for fp64 inputs;
        natural log).
        Differentiable with respect to q, k and v.
    """
    options = resolve_options(options)
    _validate(q, k, v, index)
    if out_layout not in ("bhsd", "sbhd"):
        raise ValueError(f"out_layout must be 'bhsd' or 'sbhd', got {out_layout!r}.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    backend = attention_backend(backend, q, k, index, options).name
    index.ensure_valid()
    if backend == "cudnn":
        from megatron_dsv.ops.sparse_attention.cudnn import sparse_attention_cudnn

        return sparse_attention_cudnn(q, k, v, index, scale, out_sbhd=out_layout == "sbhd")
    if backend == "triton":
        from megatron_dsv.ops.sparse_attention.triton import sparse_attention_triton

        return sparse_attention_triton(q, k, v, index, scale, out_sbhd=out_layout == "sbhd", options=options)
    out, lse = sparse_attention_reference(q, k, v, index, scale)
    if out_layout == "sbhd":
        out = out.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    return out, lse


@torch.no_grad()
def sparse_attention_fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex, scale: float, backend: str = "auto",
    *, options: Optional[KernelOptions] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Forward only, no autograd graph: ``out [B, H, S_q, D]`` (q's dtype) and fp32 ``lse [B, H, S_q]``.

    With :func:`sparse_attention_bwd`, the building block of attention split over several key sets
    whose partial results are merged by log-sum-exp (the context-parallel ring).
    """
    options = resolve_options(options)
    _validate(q, k, v, index)
    backend = _backend(backend, q)
    index.ensure_valid()
    if backend == "triton":
        from megatron_dsv.ops.sparse_attention.triton import sparse_attention_triton_fwd

        return sparse_attention_triton_fwd(q, k, v, index, scale, options=options)
    return sparse_attention_reference(q, k, v, index, scale)


@torch.no_grad()
def sparse_attention_bwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
    do: torch.Tensor, index: SparseIndex, scale: float, backend: str = "auto",
    *, options: Optional[KernelOptions] = None,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of the pairs in ``index`` given the *final* ``out``/``lse`` of the queries.

    When ``out``/``lse`` merge several key sets, the sum over key sets of ``dq`` and each set's
    ``dk``/``dv`` is the exact gradient (``p = exp(s - lse)`` uses the global normaliser).
    Returns fp32 ``dq`` and ``dk``, ``dv`` (fp32 from the reference, k's dtype from Triton).
    """
    options = resolve_options(options)
    _validate(q, k, v, index)
    backend = _backend(backend, q)
    index.ensure_valid()
    if backend == "triton":
        from megatron_dsv.ops.sparse_attention.triton import sparse_attention_triton_bwd

        return sparse_attention_triton_bwd(q, k, v, out, lse, do, index, scale, options=options)
    return sparse_attention_backward_reference(q, k, v, out, lse, do, index, scale)


def attention_backend(
    backend: str, q: torch.Tensor, k: torch.Tensor, index: SparseIndex, options: Optional[KernelOptions] = None
) -> BackendChoice:
    """The kernels :func:`sparse_attention` runs for these inputs, and why (the one place that decides).

    ``"auto"``: cuDNN's block-sparse attention where it serves the case (SM90, bf16, D=128, MHA,
    64x64 blocks, ``nvidia-cudnn-frontend`` installed: x7.49 vs Triton's x6.08 over cuDNN dense at
    90% sparsity, x13.55 vs x11.64 at 95%, H200, 64k tokens; it takes 2.52 GiB peak vs Triton's
    1.01 GiB there, so pin ``"triton"`` where memory binds), else as :func:`choose_backend`.
    ``"cudnn"`` on a case it does not serve is an error that names why (an index with a causal
    mask is one: cuDNN's block-sparse API has no token mask). A masked index the Triton kernels
    refuse (:func:`~megatron_dsv.ops.sparse_attention.triton.masked_tile_problem`, with the tiles
    of ``options``) is an error for ``"triton"`` and the reference, logged as a warning, for
    ``"auto"``.
    """
    if backend in ("auto", "cudnn"):
        from megatron_dsv.ops.sparse_attention.cudnn import cudnn_supported

        ok, why = cudnn_supported(q, k, index) if (backend == "cudnn" or q.is_cuda) else (False, "")
        if ok:
            choice = BackendChoice("cudnn", ("requested: " if backend == "cudnn" else "auto: ") + why)
            log_once(logging.INFO, f"DSV sparse attention: {choice.name} kernels, {choice.reason}.")
            return choice
        if backend == "cudnn":
            raise ValueError(f"backend='cudnn' cannot run this case: {why}. Use backend='auto' or 'triton'.")
    choice = choose_backend(backend, q.device, what="DSV sparse attention")
    if choice.name == "triton" and index.mask is not None:
        from megatron_dsv.ops.sparse_attention.triton import masked_tile_problem

        why = masked_tile_problem(index, q.shape[-1], q.dtype, resolve_options(options))
        if why is not None:
            if backend != "auto":
                raise ValueError(why + ".")
            choice = BackendChoice("reference", f"auto: {why}")
            log_once(logging.WARNING, f"DSV sparse attention: {choice.name} kernels, {choice.reason}.")
    return choice


def _backend(backend: str, q: torch.Tensor) -> str:
    return resolve_backend(backend, q, "megatron_dsv.ops.sparse_attention.triton", "sparse attention")


def _validate(q, k, v, index: SparseIndex) -> None:
    if not isinstance(index, SparseIndex):
        raise TypeError(
            f"index must be a megatron_dsv.ops.sparse_index.SparseIndex, got {type(index).__name__}; "
            "build one with megatron_dsv.ops.selection.select_topk."
        )
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(
            f"q, k, v must be [B, H, S, D]; got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}."
        )
    check_floating("sparse_attention", q, k, v)
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}.")
    if not (q.device == k.device == v.device == index.kv_idx.device):
        raise ValueError("q, k, v and the SparseIndex must be on the same device.")
    b, h, s_q, d = q.shape
    check_head_dim(d)
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != d:
        raise ValueError(f"k {tuple(k.shape)} and v {tuple(v.shape)} must be [B, H_kv, S_kv, {d}] with B={b}.")
    if h % k.shape[1] != 0:
        raise ValueError(f"query heads ({h}) must be a multiple of key/value heads ({k.shape[1]}).")
    if (index.batch_size, index.num_heads) != (b, h):
        raise ValueError(f"SparseIndex is for B={index.batch_size}, H={index.num_heads}; q has B={b}, H={h}.")
    if index.seq_len_q != s_q or index.seq_len_kv != k.shape[2]:
        raise ValueError(
            f"SparseIndex covers S_q={index.seq_len_q}, S_kv={index.seq_len_kv}; "
            f"got S_q={s_q}, S_kv={k.shape[2]}."
        )


__all__ = [
    "attention_backend", "sparse_attention", "sparse_attention_fwd", "sparse_attention_bwd", "sparse_attention_reference",
    "sparse_attention_backward_reference", "masked_dense_attention", "check_finite",
]
