"""NVIDIA cuDNN frontend's block-sparse attention as a backend for attention over a SparseIndex.

The package ``nvidia-cudnn-frontend`` (>= 1.32, with ``nvidia-cutlass-dsl[cu13]``; extra
``megatron_dsv[cudnn]``) ships CuTe DSL kernels for non-causal attention where every 64-query
block attends to a list of 64-key blocks: ``q2k_block_index [B, H, S_q/64, Kmax]`` int32 with the
first ``q2k_block_nums [B, H, S_q/64]`` entries of each row valid (the rest are never read). A
:class:`SparseIndex` with 64-token query groups and 64-key blocks is that input as it stands:
``kv_idx`` is the block index and ``kv_count`` broadcast over the groups is the count. Its LSE is the
natural-log log-sum-exp in fp32, the same quantity as ``naive.py``'s.

Measured on an H200 (B=1, H=16, S=64k, D=128, bf16, same index, selection included, vs cuDNN dense
fwd+bwd 218 ms; ``benchmarks/results/cudnn_block_sparse_h200_20261130.json``): 90% sparsity x7.49
(fwd 7.0 ms, bwd 21.3 ms) against x6.08 for our Triton kernel (9.2, 25.4); 95% x13.55 against x11.64.
Its fwd+bwd peaks 2.5 GiB above the memory allocated before it there (Triton 1.0 GiB, dense 1.5).

Which cases this backend serves is decided in one place, :func:`cudnn_supported`. The package is
imported only when that function or a kernel call needs it, so this module imports without it.
"""

from __future__ import annotations

import importlib
import math
from typing import Optional, Tuple

import torch

from megatron_dsv.ops.sparse_index import SparseIndex

# The kernels' query and key block (the SM90 path of the package has 64x64 tiles).
BLOCK = 64
INSTALL_HINT = "pip install 'megatron_dsv[cudnn]' (nvidia-cudnn-frontend>=1.32, nvidia-cutlass-dsl[cu13])"
# The SM90 forward loads q/k/v/out with TMA from base addresses it assumes 128-byte aligned.
_ALIGN_BYTES = 128


def _load():
    """The package's block-sparse API; raises ImportError when it or its CuTe DSL runtime is missing.

    The package defers importing its kernels (CuTe DSL, cuda-python) to the first call; importing
    them here makes a missing dependency show up in :func:`cudnn_supported`, not mid-training.
    """
    api = importlib.import_module("cudnn.block_sparse_attention.api")
    importlib.import_module("cudnn.block_sparse_attention._interface")
    return api


def cudnn_import_error() -> Optional[str]:
    """``None`` when the package's block-sparse attention imports, else why not (the ImportError's
    text and how to install it). Independent of tensors, so a benchmark can say "not importable"
    apart from "this case is not served"."""
    try:
        _load()
    except ImportError as err:
        return f"the cuDNN frontend's block-sparse attention is not importable ({err}); {INSTALL_HINT}"
    return None


def cudnn_supported(q: torch.Tensor, k: torch.Tensor, index: SparseIndex) -> Tuple[bool, str]:
    """Whether this backend computes ``sparse_attention(q, k, v, index)`` forward and backward, and why.

    Served: CUDA tensors on an SM90 GPU (H100/H200, the architecture it was tested on), bf16,
    head dim 128, as many key/value heads as query heads (MHA), query groups of 64 tokens and key
    blocks of 64 tokens, no causal mask on the index, with the package importable. The limits are
    the package's backward on SM90 (bf16, D=128, MHA only); its forward alone covers more (fp16,
    D=64/96, GQA), which a training step cannot use. A causal or chunk-causal index is not served:
    the block-sparse API takes a list of whole 64x64 blocks and no token-wise mask, so the
    diagonal blocks would compute disallowed pairs (our Triton kernels apply the mask).
    Returns ``(True, what runs)`` or ``(False, what rules it out)``.
    """
    if index.mask is not None:
        return False, (
            f"the index carries a {index.mask.kind} mask; cuDNN's block-sparse attention takes whole "
            "64x64 blocks and no token-wise mask, so its diagonal blocks would compute disallowed "
            "pairs (the Triton kernels apply the mask: --dsv-backend triton or auto)"
        )
    if not q.is_cuda:
        return False, f"tensors are on {q.device.type}; cuDNN block-sparse attention runs on CUDA GPUs only"
    major, minor = torch.cuda.get_device_capability(q.device)
    if (major, minor) != (9, 0):
        return False, (
            f"the GPU is SM{major}{minor}; this backend is enabled on SM90 (H100/H200) only, the "
            "architecture its forward and backward were tested on"
        )
    if q.dtype != torch.bfloat16:
        return False, f"dtype is {q.dtype}; cuDNN's block-sparse backward supports bf16 only"
    if q.shape[-1] != 128:
        return False, f"head dim is {q.shape[-1]}; cuDNN's SM90 block-sparse backward supports 128 only"
    if k.shape[1] != q.shape[1]:
        return False, (
            f"{q.shape[1]} query heads share {k.shape[1]} key/value heads; cuDNN's block-sparse "
            "backward supports MHA only"
        )
    if index.group_size != BLOCK or index.kv_block != BLOCK:
        return False, (
            f"query groups of {index.group_size} and key blocks of {index.kv_block} tokens; cuDNN's "
            f"SM90 block-sparse attention uses {BLOCK}x{BLOCK} blocks (--dsv-query-group with "
            f"{BLOCK} tokens and --dsv-kv-block {BLOCK})"
        )
    missing = cudnn_import_error()
    if missing is not None:
        return False, missing
    version = getattr(importlib.import_module("cudnn"), "__version__", "unknown")
    return True, f"cuDNN frontend {version} block-sparse attention (SM90, bf16, D=128, MHA, {BLOCK}x{BLOCK} blocks)"


def block_metadata(index: SparseIndex) -> Tuple[torch.Tensor, torch.Tensor]:
    """``q2k_block_index [B, H, S_q/64, Kmax]`` and ``q2k_block_nums [B, H, S_q/64]``, int32.

    The index itself (padding ``-1`` past ``kv_count`` lies in the part the kernels never read) and
    each head's K repeated over its query groups.
    """
    if index.group_size != BLOCK or index.kv_block != BLOCK:
        raise ValueError(
            f"cuDNN block-sparse attention needs query groups and key blocks of {BLOCK} tokens, got "
            f"{index.group_size} and {index.kv_block}; use backend='triton' for other sizes."
        )
    nums = index.kv_count.unsqueeze(-1).expand(-1, -1, index.num_groups).contiguous()
    return index.kv_idx.contiguous(), nums


def _conform(t: torch.Tensor) -> torch.Tensor:
    """``t`` when the kernels can read it in place, else a contiguous copy.

    In place: last dim contiguous, the other strides (of dims longer than 1) positive multiples of
    16 bytes (TMA), base address 128-byte aligned. Views of Megatron's ``[s, b, h, d]`` tensors pass.
    """
    es = t.element_size()
    strides_ok = all(st > 0 and st * es % 16 == 0 for st, n in zip(t.stride()[:-1], t.shape[:-1]) if n > 1)
    if t.stride(-1) == 1 and strides_ok and t.data_ptr() % _ALIGN_BYTES == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _forward(q, k, v, q2k, nums, scale: float, out_sbhd: bool):
    api = _load()
    q, k, v = (_conform(t) for t in (q, k, v))
    if out_sbhd and q.shape[0] == 1:
        # layout="bshd" makes the kernel write out as [1, S, H, D], which is [S, 1, H, D] memory:
        # fwd+bwd 28.71 ms in the layer's layout vs 28.66 in bhsd (S=64k, H=16, 90%, H200).
        res = api.block_sparse_attention_forward(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), q2k, q2k_block_nums=nums,
            sparse_block_size=BLOCK, softmax_scale=scale, layout="bshd",
        )
        return res["o_tensor"].transpose(1, 2), res["lse_tensor"]
    res = api.block_sparse_attention_forward(
        q, k, v, q2k, q2k_block_nums=nums, sparse_block_size=BLOCK, softmax_scale=scale, layout="bhsd",
    )
    out = res["o_tensor"]
    if out_sbhd:
        # B > 1: the kernel writes [B, H, S, D] or [B, S, H, D] only, so [S, B, H, D] is a copy
        # (0.33 ms per [S=64k, H=16, D=128] sample on an H200).
        out = out.permute(2, 0, 1, 3).contiguous().permute(1, 2, 0, 3)
    return out, res["lse_tensor"]


def _backward(q, k, v, out, lse, do, q2k, nums, scale: float):
    api = _load()
    q, k, v, out, do = (_conform(t) for t in (q, k, v, out, do))
    res = api.block_sparse_attention_backward(
        do, q, k, v, out, lse.contiguous(), q2k, q2k_block_nums=nums,
        softmax_scale=scale, sparse_block_size=BLOCK, layout="bhsd",
    )
    return res["dq_tensor"], res["dk_tensor"], res["dv_tensor"]


class _CudnnSparseAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, index: SparseIndex, scale: float, out_sbhd: bool = False):
        q2k, nums = block_metadata(index)
        out, lse = _forward(q, k, v, q2k, nums, scale, out_sbhd)
        ctx.save_for_backward(q, k, v, out, lse, q2k, nums)
        ctx.set_materialize_grads(False)
        ctx.scale = scale
        return out, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, out, lse, q2k, nums = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(out)
        dq, dk, dv = _backward(q, k, v, out, lse, do, q2k, nums, ctx.scale)
        if dlse is not None:
            # d lse_i / d s_ij = scale * p_ij, so an LSE gradient adds dlse_i * p_ij to ds_ij, which
            # cuDNN's backward has no input for. Its two terms are attention sums the kernels give:
            # dq_i += scale * dlse_i * sum_j p_ij k_j (a forward with k as the values) and
            # dk_j += scale * sum_i p_ij dlse_i q_i (the dv of a backward with do = dlse * q).
            # Only context-parallel merges differentiate the LSE; they pay one more forward and backward.
            acc = torch.promote_types(q.dtype, torch.float32)
            dlse = dlse.to(acc).unsqueeze(-1)
            pk, _ = _forward(q, k, k, q2k, nums, ctx.scale, False)
            _, _, pq = _backward(q, k, v, out, lse, (dlse * q.to(acc)).to(q.dtype), q2k, nums, ctx.scale)
            dq = (dq.to(acc) + ctx.scale * dlse * pk.to(acc)).to(q.dtype)
            dk = (dk.to(acc) + ctx.scale * pq.to(acc)).to(k.dtype)
        return dq, dk, dv, None, None, None


def sparse_attention_cudnn(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, index: SparseIndex,
    scale: Optional[float] = None, out_sbhd: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse attention on cuDNN's block-sparse kernels; contract of ``sparse_attention``.

    ``q [B, H, S_q, D]``, ``k, v [B, H, S_kv, D]`` (any strides with a contiguous last dim) ->
    ``out [B, H, S_q, D]`` bf16 (with ``out_sbhd`` a view of ``[S_q, B, H, D]`` memory: written so
    by the kernel when B == 1, copied otherwise) and ``lse [B, H, S_q]`` fp32, natural log.
    Differentiable w.r.t. q, k, v through ``out`` and ``lse``. Raises ValueError, before any work,
    with :func:`cudnn_supported`'s reason when the case is not served.
    """
    if v.shape != k.shape or v.dtype != k.dtype or k.dtype != q.dtype:
        raise ValueError(
            f"q {tuple(q.shape)} {q.dtype}, k {tuple(k.shape)} {k.dtype} and v {tuple(v.shape)} {v.dtype} "
            "must share a dtype, and k and v a shape."
        )
    if index.kv_idx.device != q.device or k.device != q.device or v.device != q.device:
        raise ValueError("q, k, v and the SparseIndex must be on the same device.")
    b, h, s_q, d = q.shape
    if (index.batch_size, index.num_heads, index.seq_len_q, index.seq_len_kv) != (b, h, s_q, k.shape[2]) or k.shape[-1] != d:
        raise ValueError(
            f"SparseIndex covers B={index.batch_size}, H={index.num_heads}, S_q={index.seq_len_q}, "
            f"S_kv={index.seq_len_kv}; q is {tuple(q.shape)} and k {tuple(k.shape)}."
        )
    ok, reason = cudnn_supported(q, k, index)
    if not ok:
        raise ValueError(f"cuDNN block-sparse attention does not serve this case: {reason}. Use backend='triton'.")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    return _CudnnSparseAttention.apply(q, k, v, index, scale, bool(out_sbhd))


__all__ = ["cudnn_import_error", "cudnn_supported", "sparse_attention_cudnn", "block_metadata", "BLOCK", "INSTALL_HINT"]
