"""Attention FLOPs as DSV computes them: the query-key pairs each layer actually evaluates.

Megatron's throughput report (``num_floating_point_operations`` in ``megatron/training/training.py``)
counts core attention as dense and causal: ``6 * (heads * head_dim) * sum(L^2)`` per layer, i.e.
half of the ``L x L`` pairs. A DSV layer is bidirectional and, when sparse, evaluates only the keys
its query group selected, so the patched report replaces that term, layer by layer, with

    12 * head_dim * pairs,    pairs = L * sum_h min(K_h * kv_block, L)

per sequence: 2 GEMMs (``QK^T`` and ``PV``) x 2 FLOPs per multiply-add x 3 for forward + backward
(Megatron's convention), over the pairs actually computed. A dense DSV layer has ``K_h *
kv_block = L`` for every head (``L^2`` pairs per head); a sparse one has ``K_h`` key units per
head. Predictor, selection and profiler work is overhead and is not counted as model FLOPs.

Pure functions of plain numbers; nothing here imports Megatron or torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

FLOPS_PER_PAIR_PER_DIM = 3 * 2 * 2
"""forward + backward (x3) * multiply-add (x2) * two GEMMs, ``QK^T`` and ``PV`` (x2)."""


@dataclass(frozen=True)
class AttentionWork:
    """What one self-attention layer computes for one sequence.

    ``keys_per_query``: keys each query attends to, one entry per (global) head; ``seq_len`` for
    a dense head.
    """

    seq_len: int
    head_dim: int
    keys_per_query: Tuple[int, ...]

    @classmethod
    def dense(cls, seq_len: int, num_heads: int, head_dim: int) -> "AttentionWork":
        """Bidirectional dense attention: every query sees every key."""
        return cls(int(seq_len), int(head_dim), (int(seq_len),) * int(num_heads))

    @classmethod
    def sparse(
        cls, seq_len: int, head_dim: int, kv_units_per_head: Sequence[int], kv_block: int = 1
    ) -> "AttentionWork":
        """DSV sparse attention: each query sees its group's ``K_h`` key units of ``kv_block``
        keys (at most the whole sequence)."""
        keys = tuple(min(int(k) * int(kv_block), int(seq_len)) for k in kv_units_per_head)
        return cls(int(seq_len), int(head_dim), keys)

    def pairs(self) -> int:
        """Query-key pairs per sequence, summed over heads."""
        return self.seq_len * sum(self.keys_per_query)

    def flops(self, num_sequences: int = 1) -> int:
        """Forward + backward core-attention FLOPs for ``num_sequences`` sequences."""
        return FLOPS_PER_PAIR_PER_DIM * self.head_dim * self.pairs() * int(num_sequences)


def replace_core_attention_flops(
    megatron_core_flops: float,
    num_attention_layers: int,
    layers: Sequence[AttentionWork],
    num_sequences: int,
) -> float:
    """Megatron's core-attention FLOPs with the share of ``layers`` replaced by what they compute.

    Args:
        megatron_core_flops: Megatron's core-attention term for the whole model and batch
            (``sum(L^2) * standard_self_attn_core_term`` in ``transformer_flops``).
        num_attention_layers: how many layers that term covers (each gets an equal share).
        layers: the DSV self-attention layers this process sees (with pipeline parallelism, those
            of its stage; the other layers keep Megatron's count).
        num_sequences: sequences in the batch (Megatron's ``batch_size``).
    """
    if not layers:
        return megatron_core_flops
    if len(layers) > num_attention_layers:
        raise ValueError(
            f"{len(layers)} DSV attention layers but Megatron counts {num_attention_layers} "
            "attention layers; the FLOPs report cannot be corrected."
        )
    per_layer = megatron_core_flops / num_attention_layers
    dsv = sum(w.flops(num_sequences) for w in layers)
    return megatron_core_flops - len(layers) * per_layer + dsv


def megatron_dense_core_flops(seq_len: int, num_heads: int, head_dim: int, num_sequences: int) -> float:
    """Megatron's per-layer core-attention term for BSHD (causal: half the pairs), for reference:
    ``3 * 2 * (heads * head_dim) / 2 * 2 * L^2`` per sequence."""
    return 3 * 2 * (num_heads * head_dim) / 2 * 2 * seq_len * seq_len * num_sequences


def sparse_fraction(layers: Sequence[AttentionWork]) -> Optional[float]:
    """Computed pairs over dense pairs, over ``layers`` (None without layers)."""
    if not layers:
        return None
    dense = sum(w.seq_len * w.seq_len * len(w.keys_per_query) for w in layers)
    return sum(w.pairs() for w in layers) / dense


__all__ = [
    "AttentionWork",
    "FLOPS_PER_PAIR_PER_DIM",
    "megatron_dense_core_flops",
    "replace_core_attention_flops",
    "sparse_fraction",
]
