"""Kernels and their plain-PyTorch references; imports nothing from Megatron.

Ops live in their folders (``selection``, ``sparse_attention``); shared public helpers are here:
:func:`choose_backend` (which kernels a call runs and why), :func:`check_finite` (NaN/Inf inputs
as an error, one host sync) and :class:`KernelOptions` (Triton kernel variants).
"""

from megatron_dsv.ops._utils import BackendChoice, check_finite, choose_backend
from megatron_dsv.ops.options import KernelOptions

__all__ = ["BackendChoice", "KernelOptions", "check_finite", "choose_backend"]
