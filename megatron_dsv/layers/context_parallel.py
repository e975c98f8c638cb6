"""Switch on DSV's sparsity-aware context parallelism over a built model.

``apply_dsv_context_parallel(model, ...)`` is called once, by every rank at the same point, after
the model is built (in the style of torchtitan's ``parallelize_*``): it builds the head/sequence
groups of every split of each distinct CP group once (``new_group`` is collective over the world)
and hands them, with the layer's initial plan, to every DSV self-attention layer. Constructors run
no collective.
"""

from __future__ import annotations

import logging
from typing import Dict, Optional, Sequence, Tuple

from megatron_dsv.cp.groups import CPGroups, build_cp_groups
from megatron_dsv.layers.attention import dsv_attention_layers

logger = logging.getLogger("megatron_dsv")


def apply_dsv_context_parallel(model, *, cp_group=None, hierarchical_groups: Optional[Sequence] = None) -> int:
    """Enable CP on every DSV self-attention layer of ``model`` (a module or list of chunks).

    Args:
        cp_group: the context-parallel group; default each layer's ``pg_collection.cp``.
        hierarchical_groups: Megatron's two hierarchical CP groups (``--cp-comm-type a2a+p2p
            --hierarchical-context-parallel-sizes U R``), reused for that split; default the
            layers' ``pg_collection.hcp`` when they were built with that comm type.

    Returns the number of layers switched on (0 when the CP size is 1: nothing to do).
    """
    chunks = model if isinstance(model, (list, tuple)) else [model]
    layers = [l for m in chunks for l in dsv_attention_layers(m) if l.is_self_attention]
    built: Dict[Tuple[int, ...], CPGroups] = {}
    n = 0
    for layer in layers:
        group = cp_group if cp_group is not None else getattr(layer.pg_collection, "cp", None)
        if group is None or group.size() <= 1:
            continue
        hcp = hierarchical_groups
        if hcp is None and layer.cp_comm_type == "a2a+p2p":
            sizes = getattr(layer.config, "hierarchical_context_parallel_sizes", None) or []
            hcp = getattr(layer.pg_collection, "hcp", None) if len(sizes) == 2 else None
        import torch.distributed as dist

        key = tuple(dist.get_process_group_ranks(group))
        if key not in built:
            built[key] = build_cp_groups(group, hcp)
        layer.enable_context_parallel(built[key])
        n += 1
    if n:
        logger.info("DSV context parallelism on %d layers (CP size %d)", n, next(iter(built.values())).size)
    return n


__all__ = ["apply_dsv_context_parallel"]
