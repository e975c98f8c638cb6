"""Small helpers shared by the ops (no Megatron imports)."""

from __future__ import annotations

import functools
import importlib
import logging

import torch

logger = logging.getLogger("megatron_dsv")

# Head dims the kernels accept: multiples of 16 (tensor-core tiles) up to 256.
MAX_HEAD_DIM = 256


@functools.lru_cache(maxsize=None)
def log_once(level: int, msg: str) -> None:
    """Log ``msg`` once per process (backend choices, fallbacks the user should know about)."""
    logger.log(level, msg)


def check_head_dim(d: int) -> None:
    if d % 16 != 0 or not 16 <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dim {d} is not supported by DSV sparse attention: it must be a multiple of 16 "
            f"between 16 and {MAX_HEAD_DIM} (e.g. 64, 96, 128). Change --kv-channels or the "
            "number of heads, or run this layer dense (--dsv-mode dense)."
        )


def check_floating(name: str, *tensors) -> None:
    for t in tensors:
        if t.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise TypeError(
                f"{name} needs fp32, fp16 or bf16 tensors (fp64 on the reference backend), "
                f"got {t.dtype}; cast the inputs."
            )



def resolve_backend(backend: str, x: torch.Tensor, kernel_module: str, what: str) -> str:
    """``"auto"`` -> ``"triton"`` on CUDA tensors, ``"reference"`` elsewhere; checks the name.

    On CUDA, if the Triton module cannot be imported, the reference is used and that is logged
    once (it is orders of magnitude slower, so the user must know).
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}.")
    if backend != "auto":
        return backend
    if not x.is_cuda:
        return "reference"
    try:
        importlib.import_module(kernel_module)
    except ImportError as err:
        log_once(logging.WARNING, f"DSV {what}: Triton kernels unavailable ({err}); using the slow PyTorch reference.")
        return "reference"
    return "triton"
