"""Small helpers shared by the ops (no Megatron imports)."""

from __future__ import annotations

import functools
import importlib
import logging
import os
import sys
from dataclasses import dataclass
from typing import Sequence

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


@dataclass(frozen=True)
class BackendChoice:
    """The kernels a call runs and why: ``name`` is ``"triton"`` or ``"reference"``."""

    name: str
    reason: str


_KERNEL_MODULES = ("megatron_dsv.ops.selection.triton", "megatron_dsv.ops.sparse_attention.triton")


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def choose_backend(
    backend: str, device, kernel_modules: Sequence[str] = _KERNEL_MODULES, what: str = "DSV kernels"
) -> BackendChoice:
    """Resolve ``backend`` for tensors on ``device``; the choice of ``"auto"`` is logged once.

    ``"auto"``: Triton on CUDA tensors, the PyTorch reference elsewhere (the Triton kernels run on
    a CPU only under ``TRITON_INTERPRET=1``, orders of magnitude slower than the reference);
    on CUDA, if the Triton kernels cannot be imported, the reference, logged as a warning.
    ``"triton"`` on non-CUDA tensors needs ``TRITON_INTERPRET=1`` set before megatron_dsv's
    kernels are imported, else a ValueError says what to change. No host synchronisation.
    """
    if backend not in ("auto", "triton", "reference"):
        raise ValueError(f"backend must be 'auto', 'triton' or 'reference', got {backend!r}.")
    device = torch.device(device)
    if backend == "reference":
        return BackendChoice("reference", "requested (backend='reference')")
    if backend == "triton":
        if device.type != "cuda":
            _check_interpreter(device, kernel_modules, what)
            return BackendChoice("triton", "requested (backend='triton'), CPU tensors under TRITON_INTERPRET=1")
        return BackendChoice("triton", "requested (backend='triton')")
    if device.type != "cuda":
        choice = BackendChoice(
            "reference",
            f"auto: {device.type} tensors run the PyTorch reference (the Triton kernels need CUDA; "
            "backend='triton' with TRITON_INTERPRET=1 runs them in the CPU interpreter, for tests)",
        )
        log_once(logging.INFO, f"{what}: {choice.name} kernels, {choice.reason}.")
        return choice
    for module in kernel_modules:
        try:
            importlib.import_module(module)
        except ImportError as err:
            choice = BackendChoice(
                "reference", f"auto: Triton kernels unavailable ({err}); using the slow PyTorch reference"
            )
            log_once(logging.WARNING, f"{what}: {choice.reason}.")
            return choice
    choice = BackendChoice("triton", "auto: CUDA tensors run the Triton kernels")
    log_once(logging.INFO, f"{what}: {choice.name} kernels, {choice.reason}.")
    return choice


def _check_interpreter(device, kernel_modules: Sequence[str], what: str) -> None:
    fix = (
        "set TRITON_INTERPRET=1 in the environment before megatron_dsv is imported (tests, tiny "
        "shapes), move the tensors to a CUDA GPU, or use backend='reference' or backend='auto'."
    )
    if not _interpreter_on():
        raise ValueError(
            f"{what}: backend='triton' got {device.type} tensors, but Triton runs on CPU tensors only "
            f"in its interpreter (TRITON_INTERPRET=1 is not set): {fix}"
        )
    for module in kernel_modules:
        mod = sys.modules.get(module)
        if mod is not None and not getattr(mod, "_INTERPRET", True):
            raise ValueError(
                f"{what}: {module} was imported before TRITON_INTERPRET=1 was set, so its kernels "
                f"are compiled for a GPU and cannot run on {device.type} tensors: {fix}"
            )


def resolve_backend(backend: str, x: torch.Tensor, kernel_module: str, what: str) -> str:
    """Name of the backend a call on ``x`` runs; see :func:`choose_backend`."""
    return choose_backend(backend, x.device, (kernel_module,), what).name


def check_finite(what: str = "DSV inputs", **tensors: torch.Tensor) -> None:
    """Raise ValueError if any named tensor holds NaN or Inf; one host synchronisation in all.

    For outside the training hot path, e.g. a profiling iteration: ``check_finite("layer 3
    predictor", q_lr=q_lr, k_lr=k_lr)``. Tensors ``[B, H, S, ...]`` report the first bad
    (batch, head, token).
    """
    if not tensors:
        return
    flags = torch.stack([~torch.isfinite(t).all() for t in tensors.values()]).tolist()
    for (name, t), bad in zip(tensors.items(), flags):
        if not bad:
            continue
        where = tuple(int(i) for i in (~torch.isfinite(t)).nonzero()[0].tolist())
        at = f"(batch {where[0]}, head {where[1]}, token {where[2]})" if t.dim() >= 3 else f"at {where}"
        n_bad = int((~torch.isfinite(t)).sum())
        raise ValueError(
            f"{what}: {name} holds {n_bad} non-finite values (NaN or Inf), the first {at}. Upstream "
            "of attention this means diverged activations or a diverged predictor: lower the "
            "learning rate (the predictor's is --dsv-predictor-lr), check the data for NaN/Inf, "
            "or run this layer dense (--dsv-mode dense) until it is fixed."
        )
