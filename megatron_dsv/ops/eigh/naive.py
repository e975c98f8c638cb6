"""Reference of the batched symmetric eigensolver: ``torch.linalg.eigh``.

On CUDA it checks its solver's status on the host (``_linalg_check_errors``: one host sync per
call), which is why the GPU runs the Triton Jacobi kernel instead.
"""

from __future__ import annotations

from typing import Tuple

import torch


def batched_eigh_reference(a: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues ascending ``[B, n]`` and eigenvectors ``[B, n, n]`` (columns) of symmetric
    ``a [B, n, n]`` (its lower triangle is read)."""
    return torch.linalg.eigh(a)
