"""LayerState: one owner, one checked way in (apply), one checkpoint format (to_dict/from_dict)."""

import pytest
import torch

from megatron_dsv.layers.attention import dsv_attention_layers
from megatron_dsv.layers.state import STATE_VERSION, LayerState
from tests.layers.test_attention import HID, S, B, build


def _trained_state(block):
    for i, a in enumerate(dsv_attention_layers(block)):
        a.apply(a.state.replace(
            stats_ema={"loss": torch.tensor(0.02), "sparsity": torch.full((4,), 0.8), "recall": torch.full((4,), 0.9)},
            schedule={"stage": 2, "switch_iteration": 5}, sparse=i == 0, kv_units=torch.tensor([2, 3, 4, 5]),
            reason="test",
        ))
    return block.state_dict()


def test_round_trip_restores_every_field(megatron_state):
    state = _trained_state(build(dsv_mode="auto"))
    other = build(dsv_mode="auto")
    other.load_state_dict(state, strict=True)
    a = dsv_attention_layers(other)[0]
    assert a.sparse and a.kv_units_global.tolist() == [2, 3, 4, 5] and a.decision == "test"
    assert a.schedule_state == {"stage": 2, "switch_iteration": 5}
    torch.testing.assert_close(a.stats_ema["recall"], torch.full((4,), 0.9))
    assert state[next(k for k in state if k.endswith("_extra_state"))]["version"] == STATE_VERSION


@pytest.mark.parametrize("damage, match", [
    (lambda st: st.update(version=99), "version 99 is not one this megatron_dsv reads"),
    (lambda st: st.pop("stats_ema"), "lacks \\['stats_ema'\\].*damaged"),
    (lambda st: st.update(stats_ema={"sparsity": "x"}), "malformed"),
    (lambda st: st.update(stats_ema={"sparsity": [0.5, 0.5], "recall": [0.5, 0.5]}), "cover 2 heads, this layer has 4"),
    (lambda st: st.update(kv_units=[1, 2]), "K covers 2 heads, this layer has 4"),
])
def test_damaged_or_mismatched_state_is_refused_at_load_with_the_fix(megatron_state, damage, match):
    state = _trained_state(build(dsv_mode="auto"))
    key = next(k for k in state if k.endswith("core_attention._extra_state"))
    state[key] = dict(state[key])
    damage(state[key])
    with pytest.raises(ValueError, match=match) as err:
        build(dsv_mode="auto").load_state_dict(state, strict=True)
    assert "layer 1" in str(err.value) and "--dsv-on-resume reset" in str(err.value)


def test_the_advice_works_with_strict_loading(megatron_state):
    """The refusal says --dsv-on-resume reset: weights load (strictly), the schedule starts afresh."""
    block = build(dsv_mode="auto")
    state = _trained_state(block)
    with pytest.raises(ValueError, match="another DSV config"):
        build(dsv_mode="auto", dsv_predictor_rank=8).load_state_dict(state, strict=True)
    fresh = build(dsv_mode="auto", dsv_on_resume="reset")
    fresh.load_state_dict(state, strict=True)
    a, b = dsv_attention_layers(block)[0], dsv_attention_layers(fresh)[0]
    assert torch.equal(a.predictor.weight_q, b.predictor.weight_q)
    assert not b.sparse and b.stats_ema == {} and b.schedule_state == {}


def test_apply_checks_before_adopting(megatron_state):
    a = dsv_attention_layers(build(dsv_mode="auto"))[0]
    with pytest.raises(ValueError, match="need K for the layer's 4 heads"):
        a.apply(a.state.replace(kv_units=torch.tensor([1, 2])))
    with pytest.raises(ValueError, match=">= 1 key unit"):
        a.apply(a.state.replace(kv_units=torch.tensor([1, 0, 1, 1])))
    with pytest.raises(RuntimeError, match="apply_dsv_context_parallel"):
        from megatron_dsv.cp.plan import LayerPlan

        a.apply(a.state.replace(cp_plan=LayerPlan(1, 1, ((0, 1, 2, 3),))))
    dense = dsv_attention_layers(build(dsv_mode="dense"))[0]
    with pytest.raises(RuntimeError, match="no predictor"):
        dense.apply(dense.state.replace(sparse=True))
    assert a.state == LayerState()  # nothing was adopted


def test_forward_under_cp_without_setup_says_what_to_call(megatron_state):
    from megatron.core.transformer.enums import AttnMaskType

    from megatron_dsv.layers.attention import DSVCoreAttention
    from tests.megatron_shim import tiny_config

    class _CP:
        def size(self):
            return 2

    layer = DSVCoreAttention(config=tiny_config(), layer_number=1, attn_mask_type=AttnMaskType.no_mask,
                             attention_type="self")
    layer.pg_collection.cp = _CP()
    q = torch.randn(S, B, 4, HID // 4)
    with pytest.raises(RuntimeError, match="apply_dsv_context_parallel\\(model\\)"):
        layer(q, q, q, None)
