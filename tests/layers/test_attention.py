"""DSVCoreAttention inside megatron-core TransformerBlocks (CPU, gloo, use_cpu_initialization)."""


import pytest
import torch

from megatron_dsv.layers.attention import DSVCoreAttention, PredictorLossScale, dsv_attention_layers
from megatron_dsv.layers.state import LayerStats, StepControl
from tests.megatron_shim import tiny_config

S, B, HID = 64, 2, 128


def build(**cfg):
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_dsv.specs import dsv_gpt_layer_spec

    torch.manual_seed(0)
    cfg.setdefault("dsv_predictor_fit", "gradient")  # these tests are about the auxiliary-loss path
    return TransformerBlock(tiny_config(**cfg), dsv_gpt_layer_spec)


def run(block, x):
    x = x.clone().requires_grad_(True)
    y = block(x, attention_mask=None)
    (y * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
    grads = {n: p.grad.clone() for n, p in block.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads


@pytest.mark.parametrize("mode", ["dense", "auto", "sparse"])
def test_block_forward_backward(megatron_state, mode):
    block = build(dsv_mode=mode)
    y, dx, grads = run(block, torch.randn(S, B, HID))
    assert y.shape == (S, B, HID) and torch.isfinite(y).all() and torch.isfinite(dx).all()
    layers = dsv_attention_layers(block)
    assert len(layers) == 2
    pred = {n for n in grads if "predictor" in n}
    if mode == "dense":
        assert not pred and all(a.predictor is None for a in layers)
    else:
        assert len(pred) == 4 and all(grads[n].abs().sum() > 0 for n in pred)
        assert all(a.sparse == (mode == "sparse") for a in layers)
        stats = layers[0].pending_stats[-1]
        assert isinstance(stats, LayerStats) and all(stats[n] is not None for n in ("loss", "sparsity", "recall"))


def test_predictor_loss_reaches_only_predictor(megatron_state):
    block = build(dsv_mode="auto")
    x = torch.randn(S, B, HID)
    _, dx_train, g_train = run(block, x)
    for a in dsv_attention_layers(block):
        a.begin_iteration(StepControl(train_predictor=False))
    block.zero_grad(set_to_none=True)
    _, dx_off, g_off = run(block, x)
    assert torch.equal(dx_train, dx_off)
    assert not any("predictor" in n for n in g_off)
    for n, g in g_off.items():
        assert torch.equal(g, g_train[n]), n
    # and the dense baseline (no predictor at all) computes the same model gradients
    dense = build(dsv_mode="dense")
    weights = {k: v for k, v in block.state_dict().items() if "predictor" not in k and "_extra_state" not in k}
    dense.load_state_dict(weights, strict=False)
    _, dx_dense, g_dense = run(dense, x)
    torch.testing.assert_close(dx_dense, dx_off)


def test_predictor_gradients_stay_out_of_the_model_grad_norm(megatron_state):
    """Megatron's clipping norm (``get_grads_for_grad_norm``) leaves the predictor out and the
    predictor gets its own group, so a DSV model's clipped update equals the dense baseline's.
    (The clipping arithmetic itself is CUDA-only in Megatron: tests/gpu runs it.)"""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer, MegatronOptimizer

    from megatron_dsv.runtime.lr import separate_predictor_grad_norm

    block = build(dsv_mode="auto")
    assert separate_predictor_grad_norm(block) == 4
    run(block, torch.randn(S, B, HID))
    opt = FP32Optimizer.__new__(FP32Optimizer)  # FP32Optimizer.__init__ allocates on CUDA
    MegatronOptimizer.__init__(opt, torch.optim.SGD(block.parameters(), lr=1.0), OptimizerConfig(clip_grad=1.0), None)
    pred = {id(p.grad) for n, p in block.named_parameters() if "predictor" in n}
    model = {id(p.grad) for n, p in block.named_parameters() if "predictor" not in n and p.grad is not None}
    assert len(pred) == 4 and model
    assert {id(g) for g in opt.get_grads_for_grad_norm()} == model
    assert {id(g) for g in opt.get_grads_for_grad_norm("dsv_predictor")} == pred


def test_sparse_with_all_keys_equals_dense(megatron_state):
    block = build(dsv_mode="auto")
    x = torch.randn(S, B, HID)
    y_dense, dx_dense, g_dense = run(block, x)
    for a in dsv_attention_layers(block):
        a.set_sparse(True, torch.full((a.num_heads,), S))
    block.zero_grad(set_to_none=True)
    y_sparse, dx_sparse, g_sparse = run(block, x)
    torch.testing.assert_close(y_sparse, y_dense, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(dx_sparse, dx_dense, rtol=1e-4, atol=1e-5)
    for n in g_dense:
        torch.testing.assert_close(g_sparse[n], g_dense[n], rtol=1e-4, atol=1e-5)


def test_sparse_differs_from_dense_when_sparse(megatron_state):
    s = 256  # four key blocks of 64 (the library's default): sparsity 0.75 keeps one
    block = build(dsv_mode="sparse", dsv_fixed_sparsity=0.75, dsv_kv_block=64)
    x = torch.randn(s, B, HID)
    with torch.no_grad():
        y_sparse = block(x, attention_mask=None)
        for a in dsv_attention_layers(block):
            assert a.kv_count(s).tolist() == [1] * 4
            a.set_sparse(False)
        y_dense = block(x, attention_mask=None)
    assert (y_sparse - y_dense).abs().max() > 1e-3


def test_full_recompute_gives_same_predictor_update(megatron_state):
    x = torch.randn(S, B, HID)
    base = build(dsv_mode="auto")
    _, _, g0 = run(base, x)
    rec = build(dsv_mode="auto", recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    rec.load_state_dict(base.state_dict())
    _, _, g1 = run(rec, x)
    assert set(g0) == set(g1)
    for n in g0:
        torch.testing.assert_close(g1[n], g0[n], rtol=1e-5, atol=1e-6, msg=n)
    for a0, a1 in zip(dsv_attention_layers(base), dsv_attention_layers(rec)):
        assert len(a0.pending_stats) == len(a1.pending_stats) == 1  # measured once per microbatch
        torch.testing.assert_close(a0.pending_stats[0]["loss"], a1.pending_stats[0]["loss"])


def test_aux_loss_follows_main_loss_scale(megatron_state):
    block = build(dsv_mode="auto")
    x = torch.randn(S, B, HID)
    _, _, g1 = run(block, x)
    set_scale = block.config.experimental_attention_variant_loss_scale_func
    assert isinstance(set_scale.__self__, PredictorLossScale)
    assert all(a.loss_scale is set_scale.__self__ for a in dsv_attention_layers(block))
    try:
        set_scale(torch.tensor(0.25))
        block.zero_grad(set_to_none=True)
        _, _, g2 = run(block, x)
    finally:
        set_scale.__self__.reset()
    for n in g1:
        if "predictor" in n:
            torch.testing.assert_close(g2[n], 0.25 * g1[n])


def test_hidden_predictor_variant(megatron_state):
    block = build(dsv_mode="sparse", dsv_predictor_input="hidden", dsv_predictor_fit="gradient")
    _, _, grads = run(block, torch.randn(S, B, HID))
    assert dsv_attention_layers(block)[0].predictor.weight_q.shape == (4, HID, 16)
    assert grads["layers.0.self_attention.core_attention.predictor.weight_q"].abs().sum() > 0


def make_core(**cfg):
    from megatron.core.transformer.enums import AttnMaskType

    return DSVCoreAttention(
        config=tiny_config(**cfg), layer_number=1, attn_mask_type=AttnMaskType.no_mask,
        attention_type="self",
    )


def test_gqa_and_cross_attention(megatron_state):
    from megatron.core.transformer.enums import AttnMaskType

    core = make_core(num_query_groups=2, dsv_mode="sparse")
    q, k, v = torch.randn(S, B, 4, 32), torch.randn(S, B, 2, 32), torch.randn(S, B, 2, 32)
    out = core(q, k, v, None)
    assert out.shape == (S, B, 128)
    cross = DSVCoreAttention(
        config=tiny_config(), layer_number=1, attn_mask_type=AttnMaskType.no_mask, attention_type="cross"
    )
    assert cross.predictor is None and "always dense" in cross.describe()
    with pytest.raises(RuntimeError, match="cannot run sparse"):
        cross.set_sparse(True)


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_autocast_runs_attention_in_its_dtype(megatron_state, mode):
    """Under autocast q and k may arrive in fp32 (a qk RMSNorm runs in fp32 there) and v in bf16:
    both paths compute in the autocast dtype, as SDPA does, and the layer records that dtype (the
    speed probe times it), not fp32."""
    core = make_core(dsv_mode=mode)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(S, B, 4, 32, generator=g), torch.randn(S, B, 4, 32, generator=g)
    v = torch.randn(S, B, 4, 32, generator=g).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = core(q, k, v, None)
    assert core.last_dtype == torch.bfloat16 and out.dtype == torch.bfloat16
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cast_first = core(q.bfloat16(), k.bfloat16(), v, None)
    torch.testing.assert_close(out, cast_first, rtol=0, atol=0)
    fp32 = core(q, k, v.float(), None)
    assert core.last_dtype == torch.float32 and fp32.dtype == torch.float32
    assert (fp32 - out.float()).abs().max() > 0  # the cast happened: bf16 rounding shows


def test_bad_inputs_raise(megatron_state):
    from megatron.core.transformer.enums import AttnMaskType

    with pytest.raises(ValueError, match="head dim 24"):
        make_core(hidden_size=96, num_attention_heads=4)
    with pytest.raises(ValueError, match="--attention-dropout 0"):
        make_core(attention_dropout=0.1)
    core = make_core(dsv_mode="sparse")
    q = torch.randn(S, B, 4, 32)
    with pytest.raises(ValueError, match="supports no mask, attn_mask_type=causal"):
        core(q, q, q, torch.zeros(B, 1, S, S, dtype=torch.bool), attn_mask_type=AttnMaskType.padding)
    with pytest.raises(ValueError, match="not a multiple of the query group size"):
        core(q[:60], q[:60], q[:60], None)
    with pytest.raises(NotImplementedError, match="packed"):
        core(q, q, q, None, packed_seq_params=object())


def test_predictor_in_megatron_sharded_state_dict(megatron_state):
    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    block = build(dsv_mode="auto")
    sd = block.sharded_state_dict(prefix="decoder.")
    st = sd["decoder.layers.0.self_attention.core_attention.predictor.weight_q"]
    assert isinstance(st, ShardedTensor)
    assert st.key == "decoder.layers.self_attention.core_attention.predictor.weight_q"
    # layers are stacked (axis 0), heads are the tensor-parallel axis (global shape [L, H, D, r])
    assert st.global_shape == (2, 4, 32, 16)
    torch.testing.assert_close(st.data, block.layers[0].self_attention.core_attention.predictor.weight_q)


def test_dsv_does_not_shift_the_model_initialisation(megatron_state):
    dense, auto = build(dsv_mode="dense"), build(dsv_mode="auto")
    d, a = dense.state_dict(), auto.state_dict()
    for k, v in d.items():
        if torch.is_tensor(v):
            assert torch.equal(v, a[k]), k
    p1, p2 = (dsv_attention_layers(auto)[i].predictor.weight_q for i in (0, 1))
    assert not torch.equal(p1, p2)  # each layer its own sketch


def test_describe_names_the_kernels_that_ran(megatron_state):
    block = build(dsv_mode="sparse", dsv_fixed_sparsity=0.75)
    a = dsv_attention_layers(block)[0]
    assert "resolved at the first sparse forward" in a.describe()
    with torch.no_grad():
        block(torch.randn(S, B, HID), attention_mask=None)
    assert "reference kernels: auto: cpu tensors run the PyTorch reference" in a.describe()


def test_describe_a_dense_auto_layer_says_whether_the_predictor_works(megatron_state):
    """A dense layer in auto mode: 'predictor training' only while the iteration asks for predictor
    work (benchmarks that hold layers dense with no DSV work were labelled as training)."""
    a = dsv_attention_layers(build(dsv_mode="auto"))[0]
    a.begin_iteration(StepControl(iteration=0))
    assert a.describe().endswith("DSV stage 1, predictor training")
    a.begin_iteration(StepControl(train_predictor=False, collect_stats=False))
    assert a.describe().endswith("held dense, no predictor work this iteration")


@pytest.mark.parametrize("fit", ["gradient", "closed_form"])
def test_one_profiled_microbatch_per_iteration(megatron_state, fit):
    """Several microbatches in one profiling iteration: the first is measured, the others only
    train (gradient) or run plain (closed form); the next iteration measures again."""
    block = build(dsv_mode="auto", dsv_predictor_fit=fit)
    layers = dsv_attention_layers(block)
    for it in range(2):
        for a in layers:
            a.begin_iteration(StepControl(iteration=it))
        for _ in range(3):
            run(block, torch.randn(S, B, HID))
        assert all(len(a.pending_stats) == 1 for a in layers)
