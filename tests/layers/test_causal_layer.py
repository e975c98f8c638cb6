"""Causal and chunk-causal DSV layers in megatron-core TransformerBlocks (CPU), and the masked
profiler."""

import math
from types import SimpleNamespace

import pytest
import torch

from megatron_dsv.layers.attention import dsv_attention_layers
from megatron_dsv.layers.profiler import recall_curve, sampled_attention_stats
from megatron_dsv.ops.mask import CausalMask
from megatron_dsv.ops.selection import select_topk
from tests.megatron_shim import tiny_config

S, B, HID, G = 64, 2, 128, 8  # tiny_config's query group is 2x2x2
FRAME_TOKENS, CHUNK_FRAMES = 8, 2  # chunk-causal: chunks of 2 frames x 8 tokens = 16 tokens


def build(causal: bool, **cfg):
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_dsv.specs import get_dsv_gpt_layer_spec

    torch.manual_seed(0)
    block = TransformerBlock(tiny_config(**cfg), get_dsv_gpt_layer_spec(causal=causal))
    if cfg.get("dsv_causal_chunk"):
        for a in dsv_attention_layers(block):
            a.set_frame_tokens(FRAME_TOKENS)
    return block


def run(block, x):
    x = x.clone().requires_grad_(True)
    y = block(x, attention_mask=None)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    block.zero_grad(set_to_none=True)
    return y.detach(), x.grad, grads


def set_k(block, k):
    for a in dsv_attention_layers(block):
        a.set_sparse(True, torch.as_tensor(k).expand(a.num_heads))


def visible_prefix(block, x, cut):
    """Outputs of tokens [0, cut) with and without tokens [cut, S) changed."""
    with torch.no_grad():
        y0 = block(x, attention_mask=None)
        x2 = x.clone()
        x2[cut:] = torch.randn_like(x2[cut:])
        y1 = block(x2, attention_mask=None)
    return y0[:cut], y1[:cut], y0[cut:], y1[cut:]


CASES = [
    pytest.param(dict(causal=True), S // G, id="causal"),
    pytest.param(dict(causal=False, dsv_causal_chunk=CHUNK_FRAMES), CHUNK_FRAMES * FRAME_TOKENS, id="chunk_causal"),
]


@pytest.mark.parametrize("spec,boundary", CASES)
def test_sparse_with_all_units_equals_dense_masked_block(megatron_state, spec, boundary):
    block = build(**spec, dsv_mode="auto", dsv_predictor_fit="gradient")
    x = torch.randn(S, B, HID)
    y_dense, dx_dense, g_dense = run(block, x)  # dense (SDPA is_causal or block mask), profiled
    stats = [a.pop_stats() for a in dsv_attention_layers(block)]
    assert all(len(s) == 1 and torch.isfinite(s[0].recall).all() for s in stats)  # the masked profile ran
    set_k(block, S)
    y_sparse, dx_sparse, g_sparse = run(block, x)
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx_sparse, dx_dense, rtol=1e-4, atol=1e-5)
    assert g_sparse.keys() == g_dense.keys()
    for n in g_dense:
        torch.testing.assert_close(g_sparse[n], g_dense[n], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("spec,boundary", CASES)
@pytest.mark.parametrize("sparse", [False, True])
def test_masked_block_never_reads_later_tokens(megatron_state, spec, boundary, sparse):
    """Tokens before a boundary do not see later tokens: query groups for token-causal (selection
    is shared by a group, so it may depend on the group's later queries), chunks for chunk-causal.
    The sparse case keeps few units, so selection really chooses."""
    block = build(**spec, dsv_mode="sparse").eval()
    if sparse:
        set_k(block, 12)
    else:
        for a in dsv_attention_layers(block):
            a.set_sparse(False)
    x = torch.randn(S, B, HID)
    for cut in (boundary, 3 * boundary if 3 * boundary < S else 2 * boundary):
        before0, before1, after0, after1 = visible_prefix(block, x, cut)
        torch.testing.assert_close(before1, before0, rtol=0, atol=1e-6)
        assert (after1 - after0).abs().max() > 1e-2  # later tokens did change


def test_chunk_causal_differs_from_bidirectional(megatron_state):
    x = torch.randn(S, B, HID)
    with torch.no_grad():
        y_chunk = build(causal=False, dsv_causal_chunk=CHUNK_FRAMES, dsv_mode="dense", num_layers=1)(x, attention_mask=None)
        y_full = build(causal=False, dsv_mode="dense", num_layers=1)(x, attention_mask=None)
    last = S - CHUNK_FRAMES * FRAME_TOKENS  # one layer: the last chunk sees everything in both
    torch.testing.assert_close(y_chunk[last:], y_full[last:], rtol=1e-5, atol=1e-6)
    assert (y_chunk[:last] - y_full[:last]).abs().max() > 1e-2


def test_causal_layer_configuration_errors(megatron_state):
    with pytest.raises(ValueError, match="multiple of 2"):
        tiny_config(dsv_causal_chunk=3)
    block = build(causal=False, dsv_causal_chunk=2, dsv_mode="sparse")
    layer = dsv_attention_layers(block)[0]
    layer._frame_tokens = None
    with pytest.raises(ValueError, match="set_frame_tokens"):
        layer.causal_mask()
    with pytest.raises(ValueError, match="chunk-causal mask of its own"):
        dsv_attention_layers(build(causal=True, dsv_causal_chunk=2, dsv_mode="sparse"))[0].causal_mask()


def _fake_cp(layer, world=2):
    """The layer as apply_dsv_context_parallel leaves it, with a sequence-only plan (no collective
    runs before the checks under test)."""
    from megatron_dsv.cp.plan import LayerPlan

    layer._cp_groups = SimpleNamespace(size=world)
    layer.apply(layer.state.replace(cp_plan=LayerPlan(1, world, (tuple(range(layer.num_heads)),))))
    return layer


def test_masks_cp_cannot_split_are_refused(megatron_state):
    from megatron.core.transformer.enums import AttnMaskType

    # chunks of 16 tokens, shards of 24: neither divides the other
    layer = _fake_cp(dsv_attention_layers(build(causal=False, dsv_causal_chunk=CHUNK_FRAMES, dsv_mode="sparse"))[0])
    q = torch.randn(24, B, 4, 32)
    with pytest.raises(ValueError, match="cuts the causal chunks of 16 tokens"):
        layer(q, q, q, None)
    layer = _fake_cp(dsv_attention_layers(build(causal=False, dsv_mode="dense"))[0])
    with pytest.raises(ValueError, match="attn_mask_type=padding"):
        layer(q, q, q, torch.zeros(B, 1, 48, 48, dtype=torch.bool), attn_mask_type=AttnMaskType.padding)


def test_k_is_floored_at_the_forced_units(megatron_state):
    layer = dsv_attention_layers(build(causal=True, dsv_mode="sparse"))[0]
    layer.set_sparse(True, torch.ones(layer.num_heads, dtype=torch.int32))
    assert layer.kv_count(S).tolist() == [CausalMask("causal").max_forced(S, G, 1)] * layer.num_heads


@pytest.mark.parametrize("mask", [CausalMask("causal"), CausalMask("chunk_causal", 16)])
@pytest.mark.parametrize("kvb", [1, 4])
def test_masked_recall_curve_is_the_recall_of_masked_selection(mask, kvb):
    """The curve's recall at K is the exact masked attention mass on the units masked selection
    keeps at K, row by row; disallowed units hold no mass and rank last."""
    b, h, s, d, r = 2, 2, 64, 16, 4
    q, k = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    q_lr, k_lr = torch.randn(b, h, s, r), torch.randn(b, h, s, r)
    rows = torch.arange(1, s, 3)
    scale = 1 / math.sqrt(d)
    curve = recall_curve(q, k, q_lr, k_lr, rows, group_size=G, kv_block=kvb, scale=scale, critical_mass=0.9, mask=mask)
    units, need = s // kvb, mask.max_forced(s, G, kvb)
    logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask.dense(s), float("-inf"))
    p = torch.softmax(logits, -1)[:, :, rows]
    for kk in (need, need + 3, units):
        keep = select_topk(q_lr, k_lr, G, kk, kv_block=kvb, mask=mask).to_dense_mask()[:, :, rows]
        want = (p * keep).sum(-1).mean(dim=(0, 2))
        torch.testing.assert_close(curve.recall(kk), want.float(), rtol=1e-5, atol=1e-6)
    assert torch.allclose(curve.recall(units), torch.ones(h))
    sp = sampled_attention_stats(q[:, :, rows], k, scale, 0.9, mask=mask, rows=rows)["sparsity"]
    readable = (mask.limit(rows) + 1).float()
    need_keys = ((p.sort(-1, descending=True).values.cumsum(-1) < 0.9).sum(-1) + 1).float()
    torch.testing.assert_close(sp, (1 - need_keys / readable).mean(-1), rtol=1e-5, atol=1e-6)


def test_causal_gpt_sparse_with_all_units_equals_dense(megatron_state):
    """pretrain_gpt.py's model with the causal DSV spec: logits of the sparse path at K = all
    units equal the dense causal path's."""
    from megatron.core.models.gpt import GPTModel

    from megatron_dsv.specs import dsv_gpt_causal_layer_spec

    torch.manual_seed(0)
    cfg = tiny_config(hidden_size=64, num_attention_heads=4, ffn_hidden_size=128, dsv_mode="sparse")
    model = GPTModel(config=cfg, transformer_layer_spec=dsv_gpt_causal_layer_spec, vocab_size=64,
                     max_sequence_length=S, position_embedding_type="learned_absolute").eval()
    tokens = torch.randint(0, 64, (B, S))
    pos = torch.arange(S).expand(B, S)
    with torch.no_grad():
        set_k(model, S)
        sparse = model(tokens, pos, attention_mask=None)
        for a in dsv_attention_layers(model):
            a.set_sparse(False)
        dense = model(tokens, pos, attention_mask=None)
        tokens[:, S // 2 :] = torch.randint(0, 64, (B, S // 2))
        later = model(tokens, pos, attention_mask=None)
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(later[:, : S // 2], dense[:, : S // 2], rtol=0, atol=1e-6)


@pytest.mark.parametrize("kvb", [1, 32])
@pytest.mark.parametrize("spec", [dict(causal=True), dict(causal=False, dsv_causal_chunk=CHUNK_FRAMES)], ids=["causal", "chunk_causal"])
def test_masked_layer_on_triton_kernels(megatron_state, spec, kvb):
    """--dsv-backend triton with a mask (CPU: the Triton interpreter): the sparse layer at K = all
    units equals its dense masked path, the attention runs Triton and the selection the reference,
    and describe() says both. 16-token query groups: the Triton kernels need a multiple of 16."""
    from tests.ops.triton_env import INTERPRET

    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    block = build(**spec, dsv_mode="sparse", dsv_backend="triton", dsv_query_group=(2, 2, 4), dsv_kv_block=kvb, num_layers=1)
    x = torch.randn(S, B, HID)
    for a in dsv_attention_layers(block):
        a.set_sparse(False)
    y_dense, dx_dense, g_dense = run(block, x)
    set_k(block, S // kvb)  # every key unit
    y_sparse, dx_sparse, g_sparse = run(block, x)
    layer = dsv_attention_layers(block)[0]
    assert "triton kernels" in layer.describe() and layer.selection_backend() == "triton"
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx_sparse, dx_dense, rtol=1e-4, atol=1e-5)
    for n in g_dense:
        torch.testing.assert_close(g_sparse[n], g_dense[n], rtol=1e-4, atol=1e-5)


def test_masked_layer_refuses_triton_for_blocks_below_the_key_tile(megatron_state):
    """--dsv-backend triton with a mask and 1 < kv_block < the forward's key tile (16 < 32 for
    fp32) is an error naming the fix, raised before any attention kernel runs."""
    from tests.ops.triton_env import INTERPRET

    if not INTERPRET and not torch.cuda.is_available():
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    block = build(causal=True, dsv_mode="sparse", dsv_backend="triton", dsv_query_group=(2, 2, 4), dsv_kv_block=16, num_layers=1)
    set_k(block, S // 16)
    with pytest.raises(ValueError, match=r"kv_block 16 < its forward key tile 32 .*Use a multiple of 32 .*kv_block 1 \(Python API\)"):
        run(block, torch.randn(S, B, HID))


def test_planner_sees_the_layer_mask(megatron_state):
    from megatron_dsv.runtime.controller import DSVController

    block = build(causal=False, dsv_causal_chunk=CHUNK_FRAMES, dsv_mode="sparse")
    layer = dsv_attention_layers(block)[0]
    assert layer.planning_mask == CausalMask("chunk_causal", CHUNK_FRAMES * FRAME_TOKENS)
    layer._frame_tokens = None  # a chunk-causal layer before the model gave its frame size
    assert layer.planning_mask is None
    causal = build(causal=True, dsv_mode="sparse")
    with torch.no_grad():
        causal(torch.randn(S, B, HID), attention_mask=None)
    ctl = DSVController(causal, log=lambda m: None)
    shape = ctl._cp_shape(dsv_attention_layers(causal)[0])
    assert shape.mask == CausalMask("causal") and shape.seq_len == S
