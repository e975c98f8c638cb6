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

import socket

import torch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_megatron_state(tp: int = 1, seed: int = 1234, rank: int = 0, world_size: int = 1, cp: int = 1) -> None:
    """Megatron state for tests (``megatron_dsv.runtime.megatron.init_megatron``, NCCL with a GPU),
    plus, on the CPU, recompute that saves and restores the CPU RNG state only. Idempotent.
    Spawned test processes pass their rank and world size (MASTER_PORT set by the parent)."""
    from megatron.core.tensor_parallel import random as mrandom

    from megatron_dsv.runtime.megatron import init_megatron

    device = "cuda" if torch.cuda.is_available() else "cpu"
    init_megatron(device, tp=tp, cp=cp, rank=rank, world_size=world_size, seed=seed)
    if device == "cpu":
        mrandom._get_all_rng_states = lambda: (torch.get_rng_state(), None, {})
        mrandom._set_all_rng_states = lambda cpu, cuda, tracked: torch.set_rng_state(cpu)
    torch.manual_seed(seed)


def tiny_config(**overrides):
    """A small DSVTransformerConfig for CPU tests (2 layers, 4 heads of 16... 32 dims).

    Single keys (``dsv_kv_block=1``), like its 8-token query groups and key floor of 1: the tests'
    sequences of 32-128 tokens (CP shards of 16-64) hold at most two 64-key blocks of the default,
    too few for selection to choose, and CP shards need whole blocks. A test of the default passes
    ``dsv_kv_block=64`` with a longer sequence."""
    from megatron_dsv.layers.transformer_config import DSVTransformerConfig

    kw = dict(
        num_layers=2, hidden_size=128, num_attention_heads=4, ffn_hidden_size=256,
        use_cpu_initialization=True, hidden_dropout=0.0, attention_dropout=0.0,
        bias_dropout_fusion=False, gradient_accumulation_fusion=False,
        dsv_query_group=(2, 2, 2), dsv_kv_block=1, dsv_min_keys=1, dsv_k_multiple=1, dsv_profile_stride=4,
    )
    kw.update(overrides)
    return DSVTransformerConfig(**kw)
