"""Test shim: run megatron-core blocks in one CPU process.

Megatron assumes CUDA in a few places our tests would otherwise touch:
* ``model_parallel_cuda_manual_seed`` and the RNG tracker's ``fork()`` use CUDA RNG states;
  we seed with ``torch.manual_seed`` and replace ``fork`` by a no-op context (the tests run
  without dropout in tensor-parallel regions, so no RNG state needs tracking);
* activation recompute (``tensor_parallel.checkpoint``) saves and restores CPU + CUDA RNG
  states; without CUDA we save and restore the CPU state only;
* ``DotProductAttention`` takes its score buffer from the global memory buffer on the current
  CUDA device; the tests never build it (DSV attention replaces it);
* the default causal mask and RoPE build CUDA tensors; the tests use no mask and no RoPE.
Everything else (parallel_state with gloo, ``use_cpu_initialization=True`` layers) runs as is.
Our own code needs none of this: it is device-agnostic.
"""

from __future__ import annotations

import contextlib
import os
import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_megatron_state(tp: int = 1, seed: int = 1234, rank: int = 0, world_size: int = 1, cp: int = 1) -> None:
    """gloo (NCCL with a GPU) init + Megatron model-parallel state, idempotent. Spawned test
    processes pass their rank and world size (MASTER_PORT set by the parent)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.tensor_parallel import random as mrandom

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world_size)
    if not ps.model_parallel_is_initialized():
        ps.initialize_model_parallel(tensor_model_parallel_size=tp, context_parallel_size=cp)
    tracker = mrandom.get_cuda_rng_tracker()
    if torch.cuda.is_available():
        if "model-parallel-rng" not in tracker.get_states():
            mrandom.model_parallel_cuda_manual_seed(seed)
    else:
        tracker.fork = lambda *a, **k: contextlib.nullcontext()
        mrandom._get_all_rng_states = lambda: (torch.get_rng_state(), None, {})
        mrandom._set_all_rng_states = lambda cpu, cuda, tracked: torch.set_rng_state(cpu)
    torch.manual_seed(seed)


def tiny_config(**overrides):
    """A small DSVTransformerConfig for CPU tests (2 layers, 4 heads of 16... 32 dims)."""
    from megatron_dsv.layers.transformer_config import DSVTransformerConfig

    kw = dict(
        num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=256,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False,
        dsv_query_group=(2, 2, 2), dsv_min_keys=1, dsv_k_multiple=1, dsv_profile_stride=4,
    )
    kw.update(overrides)
    return DSVTransformerConfig(**kw)
