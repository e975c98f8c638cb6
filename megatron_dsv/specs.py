"""Module-level ModuleSpec objects, selectable with Megatron's ``--spec megatron_dsv.specs <name>``.

* ``dsv_gpt_layer_spec``: Megatron's local (pure megatron-core) GPT layer with DSV core attention,
  bidirectional (``attn_mask_type=no_mask``), as video DiTs attend.
* ``dsv_gpt_causal_layer_spec``: the same, token-causal (``attn_mask_type=causal``), for causal
  language models such as Megatron-LM's ``pretrain_gpt.py`` (sparse on the masked Triton or the
  reference kernels, not cuDNN).
* ``dsv_gpt_layer_te_spec``: the same on Transformer Engine's linear/norm modules; defined only
  when Transformer Engine imports.

``get_dsv_gpt_layer_spec(...)`` builds variants (causal, qk layernorm, RMSNorm, TE) programmatically.
"""

from __future__ import annotations

import dataclasses
import logging

from megatron.core.models.gpt.gpt_layer_specs import (
    get_gpt_layer_local_spec,
    get_gpt_layer_with_transformer_engine_spec,
)
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.spec_utils import ModuleSpec

from megatron_dsv.layers.attention import HAVE_TE, DSVCoreAttention
from megatron_dsv.layers.self_attention import DSVSelfAttention

logger = logging.getLogger("megatron_dsv")


def with_dsv_attention(layer_spec: ModuleSpec, attn_mask_type: AttnMaskType = AttnMaskType.no_mask) -> ModuleSpec:
    """Copy of a TransformerLayer spec whose self-attention uses DSV core attention with
    ``attn_mask_type`` (``no_mask``: bidirectional; ``causal``: token-causal)."""
    if attn_mask_type not in (AttnMaskType.no_mask, AttnMaskType.causal):
        raise ValueError(f"DSV attention is bidirectional (no_mask) or causal, got attn_mask_type={attn_mask_type.name}.")
    layer_sub = layer_spec.submodules
    attn = layer_sub.self_attention
    attn_sub = dataclasses.replace(attn.submodules, core_attention=DSVCoreAttention)
    params = dict(attn.params or {}, attn_mask_type=attn_mask_type)
    new_attn = ModuleSpec(module=DSVSelfAttention, params=params, submodules=attn_sub)
    return ModuleSpec(
        module=layer_spec.module,
        params=dict(layer_spec.params or {}),
        submodules=dataclasses.replace(layer_sub, self_attention=new_attn),
    )


def get_dsv_gpt_layer_spec(use_te: bool = False, causal: bool = False, **kwargs) -> ModuleSpec:
    """A GPT-style layer spec with DSV attention, bidirectional or (``causal=True``) token-causal;
    ``kwargs`` go to Megatron's spec builder (``qk_layernorm``, ``normalization``, ...)."""
    if use_te and not HAVE_TE:
        raise ImportError("use_te=True needs Transformer Engine; install it or use use_te=False.")
    base = get_gpt_layer_with_transformer_engine_spec(**kwargs) if use_te else get_gpt_layer_local_spec(**kwargs)
    return with_dsv_attention(base, AttnMaskType.causal if causal else AttnMaskType.no_mask)


dsv_gpt_layer_spec = get_dsv_gpt_layer_spec(use_te=False)
dsv_gpt_causal_layer_spec = get_dsv_gpt_layer_spec(use_te=False, causal=True)

if HAVE_TE:
    dsv_gpt_layer_te_spec = get_dsv_gpt_layer_spec(use_te=True)

__all__ = ["dsv_gpt_layer_spec", "dsv_gpt_causal_layer_spec", "get_dsv_gpt_layer_spec", "with_dsv_attention"] + (
    ["dsv_gpt_layer_te_spec"] if HAVE_TE else []
)
