"""Batched symmetric eigendecomposition of small matrices without a host synchronisation.

:func:`batched_eigh` is ``torch.linalg.eigh`` for ``[B, n, n]`` with ``n <= 128``: the Triton
Jacobi kernel (``triton.py``) on CUDA, the reference (``naive.py``: ``torch.linalg.eigh``) on
other devices. The closed-form predictor fit uses it for its Rayleigh-Ritz step.
"""

from __future__ import annotations

from typing import Tuple

import torch

from megatron_dsv.ops._utils import resolve_backend
from megatron_dsv.ops.eigh.naive import batched_eigh_reference

MAX_SIZE = 128
"""Largest matrix the Jacobi kernel takes (one program holds it in registers)."""


def batched_eigh(a: torch.Tensor, backend: str = "auto", tol: float = 1e-14) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ascending ``[B, n]`` and eigenvectors ``[B, n, n]`` (columns) of symmetric
    ``a [B, n, n]`` (fp32 or fp64; its lower triangle is read).

    Args:
        backend: ``"auto"`` (Triton on CUDA, the reference elsewhere), ``"triton"`` (CPU tensors
            need ``TRITON_INTERPRET=1``) or ``"reference"`` (``torch.linalg.eigh``: on CUDA one
            host sync per call).
        tol: the Jacobi kernel rotates a pair while its off-diagonal entry exceeds ``tol`` times
            the matrix's Frobenius norm (fp64; see ``triton.py``).

    Eigenvectors are defined up to sign (and rotation within repeated eigenvalues), as for
    ``torch.linalg.eigh``. The Triton kernel computes in fp64 and returns ``a``'s dtype.
    """
    if a.dim() != 3 or a.shape[-1] != a.shape[-2]:
        raise ValueError(f"batched_eigh takes [B, n, n] matrices, got shape {tuple(a.shape)}.")
    if a.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"batched_eigh needs fp32 or fp64 matrices, got {a.dtype}; cast them.")
    if resolve_backend(backend, a, "megatron_dsv.ops.eigh.triton", "batched eigh") == "reference":
        return batched_eigh_reference(a)
    n = a.shape[-1]
    if n > MAX_SIZE:
        raise ValueError(
            f"batched_eigh's Jacobi kernel takes matrices up to {MAX_SIZE} x {MAX_SIZE}, got {n} x {n}: "
            "use backend='reference' (torch.linalg.eigh)."
        )
    from megatron_dsv.ops.eigh.triton import jacobi_eigh

    w, v = jacobi_eigh(a.double(), tol=tol)
    # stable: tied eigenvalues (a zero or scaled-identity block) keep the kernel's column order, the
    # same on every device and run, so CP ranks that refit the same moments write the same weights
    w, order = torch.sort(w, dim=-1, stable=True)
    v = torch.gather(v, 2, order.unsqueeze(1).expand_as(v))
    return w.to(a.dtype), v.to(a.dtype)


__all__ = ["MAX_SIZE", "batched_eigh", "batched_eigh_reference"]
