from megatron.core.transformer.enums import AttnMaskType

from megatron_dsv.layers.attention import DSVCoreAttention
from megatron_dsv.layers.self_attention import DSVSelfAttention
from megatron_dsv.specs import dsv_gpt_layer_spec, get_dsv_gpt_layer_spec


def test_spec_uses_dsv_attention_bidirectional():
    attn = dsv_gpt_layer_spec.submodules.self_attention
    assert attn.module is DSVSelfAttention
    assert attn.params["attn_mask_type"] == AttnMaskType.no_mask
    assert attn.submodules.core_attention is DSVCoreAttention


def test_spec_builder_passes_options():
    spec = get_dsv_gpt_layer_spec(qk_layernorm=True, normalization="RMSNorm")
    sub = spec.submodules.self_attention.submodules
    assert sub.core_attention is DSVCoreAttention
    assert sub.q_layernorm is not None and "Identity" not in getattr(sub.q_layernorm, "__name__", str(sub.q_layernorm))


def test_te_spec_only_with_te():
    import megatron_dsv.specs as specs

    assert hasattr(specs, "dsv_gpt_layer_te_spec") == specs.HAVE_TE
