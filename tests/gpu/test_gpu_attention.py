"""GPU (bf16) tests of the DSV attention layer; run on the lent device: pytest -m gpu tests/gpu."""

import pytest
import torch
import torch.nn.functional as F

from megatron_dsv.ops.selection import select_topk
from megatron_dsv.ops.sparse_attention import masked_dense_attention, sparse_attention

pytestmark = pytest.mark.gpu


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_sparse_attention_bf16_matches_fp32_reference():
    torch.manual_seed(0)
    b, h, s, d, g = 1, 4, 2048, 128, 32
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    index = select_topk(torch.randn(b, h, s, 16, device="cuda"), torch.randn(b, h, s, 16, device="cuda"), g, [64, 205, 512, 2048])
    out, lse = sparse_attention(q, k, v, index)
    q32, k32, v32 = (t.detach().float().requires_grad_(True) for t in (q, k, v))
    ref, ref_lse = masked_dense_attention(q32, k32, v32, index.to_dense_mask(), d**-0.5)
    # same-precision baseline: the fp32 result rounded to bf16
    base = rel_err(ref.to(torch.bfloat16), ref)
    assert rel_err(out, ref) <= 2 * base + 1e-3
    assert rel_err(lse, ref_lse) < 1e-3
    do = torch.randn_like(out)
    grads = torch.autograd.grad((out * do).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * do.float()).sum(), (q32, k32, v32))
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) <= 2 * rel_err(want.to(torch.bfloat16), want) + 1e-2


def build_block(mode, **kw):
    """A bf16 block on the GPU; the gradient predictor fit unless ``dsv_predictor_fit`` is given."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_dsv.specs import dsv_gpt_layer_spec
    from tests.megatron_shim import tiny_config

    cfg = tiny_config(
        dsv_mode=mode, use_cpu_initialization=False, bf16=True, params_dtype=torch.bfloat16,
        num_attention_heads=8, hidden_size=1024, ffn_hidden_size=2048,
        dsv_query_group=(2, 4, 4), dsv_min_keys=64, dsv_profile_stride=32,
        **{"dsv_predictor_fit": "gradient", **kw},
    )
    torch.manual_seed(0)
    # Megatron's Float16Module casts every parameter (norms and predictor included) to bf16.
    return TransformerBlock(cfg, dsv_gpt_layer_spec).cuda().bfloat16()


@pytest.mark.parametrize("mode", ["dense", "auto", "sparse"])
def test_block_bf16(megatron_state, mode):
    from megatron_dsv.layers.attention import dsv_attention_layers

    block = build_block(mode)
    x = torch.randn(4096, 2, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = block(x, attention_mask=None)
    y.float().square().mean().backward()
    assert torch.isfinite(y).all() and torch.isfinite(x.grad).all()
    for a in dsv_attention_layers(block):
        if mode != "dense":
            assert a.predictor.weight_q.grad.abs().sum() > 0
            assert float(a.pending_stats[-1].loss) > 0


def test_closed_form_profile_and_refit_bf16(megatron_state):
    """The default closed-form fit on a bf16 block: a profiling forward gives a finite recall
    curve, and the refit writes finite bf16 weights that differ from the sketch."""
    from megatron_dsv.layers.attention import dsv_attention_layers

    block = build_block("auto", dsv_predictor_fit="closed_form", dsv_kv_block=64)
    x = torch.randn(4096, 2, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    block(x, attention_mask=None).float().square().mean().backward()
    for a in dsv_attention_layers(block):
        stats = a.pending_stats[-1]
        assert torch.isfinite(stats.curve.mass_by_rank).all() and float(stats.nonfinite) == 0
        assert 0 < float(stats.recall.mean()) <= 1
        before = a.predictor.weight_q.detach().clone()
        residual = a.refit_predictor()
        assert residual is not None and torch.isfinite(residual).all()
        assert a.predictor.weight_q.dtype == torch.bfloat16 and torch.isfinite(a.predictor.weight_q.float()).all()
        assert not torch.equal(before, a.predictor.weight_q)


def test_block_bf16_sparse_all_keys_close_to_dense(megatron_state):
    from megatron_dsv.layers.attention import dsv_attention_layers

    block = build_block("auto")
    x = torch.randn(2048, 1, 1024, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad():
        y_dense = block(x, attention_mask=None)
        for a in dsv_attention_layers(block):
            a.set_sparse(True, torch.full((a.num_heads,), 2048))
        y_sparse = block(x, attention_mask=None)
    assert rel_err(y_sparse, y_dense) < 2e-2


def test_dense_path_is_cudnn_sdpa(megatron_state):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from megatron_dsv.layers.attention import sdpa_backends

    q, k, v = (torch.randn(1, 16, 8192, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    with sdpa_backends(q):
        ours = F.scaled_dot_product_attention(q, k, v)
    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        cudnn = F.scaled_dot_product_attention(q, k, v)
    assert torch.equal(ours, cudnn)


def test_dist_checkpoint_round_trip(megatron_state, tmp_path):
    """Megatron's distributed checkpointing (files on disk) carries the predictor and DSV state."""
    from megatron.core import dist_checkpointing

    from megatron_dsv.layers.attention import dsv_attention_layers

    block = build_block("auto")
    x = torch.randn(1024, 1, 1024, device="cuda", dtype=torch.bfloat16)
    block(x, attention_mask=None).float().square().mean().backward()
    for i, a in enumerate(dsv_attention_layers(block)):
        a.apply(a.state.replace(
            stats_ema={"loss": torch.tensor(0.01 * (i + 1)), "sparsity": torch.rand(8), "recall": torch.rand(8)},
            schedule={"stage": 2, "switch_iteration": 17}, sparse=i == 0, kv_units=torch.arange(8) + 64,
        ))
    dist_checkpointing.save(block.sharded_state_dict(prefix="decoder."), str(tmp_path))
    other = build_block("auto")
    loaded = dist_checkpointing.load(other.sharded_state_dict(prefix="decoder."), str(tmp_path))
    other.load_state_dict({k[len("decoder."):]: v for k, v in loaded.items()}, strict=True)
    for a, b in zip(dsv_attention_layers(block), dsv_attention_layers(other)):
        assert torch.equal(a.predictor.weight_q, b.predictor.weight_q)
        assert (a.sparse, a.schedule_state) == (b.sparse, b.schedule_state)
        assert a.kv_units_global.tolist() == b.kv_units_global.tolist()
        torch.testing.assert_close(a.stats_ema["recall"], b.stats_ema["recall"])


def test_megatron_clips_the_predictor_by_its_own_norm(megatron_state):
    """Megatron's clip_grad_norm (CUDA-only): the model's norm and clipped gradients are the same
    with a huge predictor gradient as without the predictor; the predictor is clipped alone."""
    from megatron.core.optimizer import OptimizerConfig
    from megatron.core.optimizer.optimizer import FP32Optimizer

    from megatron_dsv.runtime.lr import separate_predictor_grad_norm

    block = build_block("auto").float()
    assert separate_predictor_grad_norm(block) == 4
    x = torch.randn(2048, 1, 1024, device="cuda")
    block(x, attention_mask=None).square().mean().backward()
    pred = [p for n, p in block.named_parameters() if "predictor" in n]
    model = [p for n, p in block.named_parameters() if "predictor" not in n and p.grad is not None]
    model_grads = [p.grad.clone() for p in model]
    for p in pred:
        p.grad.mul_(1e4)
    opt = FP32Optimizer(torch.optim.SGD(block.parameters(), lr=1.0), OptimizerConfig(clip_grad=1e-3), None)
    norm = opt.clip_grad_norm(1e-3)
    want = torch.sqrt(sum(g.double().pow(2).sum() for g in model_grads)).item()
    assert norm == pytest.approx(want, rel=1e-4)
    for p, g in zip(model, model_grads):
        torch.testing.assert_close(p.grad, g * min(1.0, 1e-3 / (want + 1e-6)), rtol=1e-4, atol=1e-9)
    pred_norm = torch.sqrt(sum(p.grad.double().pow(2).sum() for p in pred)).item()
    assert pred_norm == pytest.approx(1e-3, rel=1e-3)


def test_ring_steps_on_cudnn_merge_to_full_attention():
    """The dense ring's cuDNN steps: per-chunk forward with LSE, merge, per-chunk backward with the
    merged out/LSE == SDPA over the concatenated keys (bf16 tolerance rule)."""
    from megatron_dsv.cp.seq_parallel import _CudnnChunk, _merge

    torch.manual_seed(0)
    b, h, s, d = 1, 4, 2048, 128
    q = torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
    ks = [torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    vs = [torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16) for _ in range(2)]
    do = torch.randn_like(q)
    assert _CudnnChunk.available(q)
    out = lse = None
    aux = []
    for k, v in zip(ks, vs):
        o, l, a = _CudnnChunk.forward(q, k, v, d**-0.5)
        out, lse = _merge(out, lse, o, l)
        aux.append(a)
    out = out.to(q.dtype)
    grads = [_CudnnChunk.backward(q, k, v, out, lse, do, d**-0.5, a) for k, v, a in zip(ks, vs, aux)]
    q32, k32, v32 = (t.float().requires_grad_(True) for t in (q, torch.cat(ks, 2), torch.cat(vs, 2)))
    ref = F.scaled_dot_product_attention(q32, k32, v32)
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), do.float())
    got = [sum(g[0].float() for g in grads), torch.cat([g[1] for g in grads], 2), torch.cat([g[2] for g in grads], 2)]
    assert rel_err(out, ref) <= 2 * rel_err(ref.to(torch.bfloat16), ref) + 1e-3
    for g, r in zip(got, ref_grads):
        assert rel_err(g, r) <= 2 * rel_err(r.to(torch.bfloat16), r) + 1e-2
