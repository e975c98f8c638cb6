import functools
import math

import pytest
import torch

import megatron_dsv.layers.predictor as predictor_mod
import megatron_dsv.layers.profiler as profiler_mod
from megatron_dsv.layers.predictor import LowRankPredictor, predictor_loss, predictor_loss_reference
from megatron_dsv.layers.profiler import sample_rows, sampled_attention_stats
from megatron_dsv.ops.selection import select_topk


def brute_force_sparsity(q, k, scale, mass):
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * scale, -1)
    out = torch.empty(p.shape[:-1])
    for idx in torch.cartesian_prod(*[torch.arange(n) for n in p.shape[:-1]]):
        row = p[tuple(idx)].sort(descending=True).values
        acc, n = 0.0, 0
        while acc < mass:  # smallest set of keys holding `mass`
            acc += float(row[n])
            n += 1
        out[tuple(idx)] = 1 - n / p.shape[-1]
    return out.mean(-1)


@pytest.mark.parametrize("mass", [0.5, 0.9])
def test_sparsity_equals_brute_force(mass, monkeypatch):
    monkeypatch.setattr(profiler_mod, "_CHUNK_ELEMS", 200)  # several row chunks
    b, h, s, d = 2, 3, 48, 16
    q, k = torch.randn(b, h, s, d) * 2, torch.randn(b, h, s, d)
    rows = sample_rows(s, 4, 1)
    assert rows.tolist() == list(range(1, s, 4))
    stats = sampled_attention_stats(q[:, :, rows], k, 0.25, mass)
    torch.testing.assert_close(stats["sparsity"], brute_force_sparsity(q[:, :, rows], k, 0.25, mass).float())


def test_recall_equals_selected_mass():
    b, h, s, d, g = 1, 2, 32, 16, 8
    q, k = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    index = select_topk(torch.randn(b, h, s, 4), torch.randn(b, h, s, 4), g, [4, 32])
    rows = sample_rows(s, 3, 0)
    stats = sampled_attention_stats(q[:, :, rows], k, 0.25, 0.9, row_groups=rows // g, index=index)
    p = torch.softmax(q[:, :, rows] @ k.transpose(-1, -2) * 0.25, -1)
    mask = index.to_dense_mask()[:, :, rows]
    torch.testing.assert_close(stats["recall"], (p * mask).sum(-1).mean(-1))
    assert torch.allclose(stats["recall"][0, 1], torch.tensor(1.0))  # K = all keys


def test_sketch_init_approximates_scores():
    pred = LowRankPredictor(num_heads=2, head_dim=64, rank=64)
    q, k = torch.randn(1, 2, 128, 64), torch.randn(1, 2, 128, 64)
    q_lr, k_lr = pred.project(q, k)
    exact, approx = q @ k.transpose(-1, -2), q_lr @ k_lr.transpose(-1, -2)
    corr = torch.corrcoef(torch.stack([exact.flatten(), approx.flatten()]))[0, 1]
    assert corr > 0.6  # JL sketch: unbiased, correlation grows with rank


@pytest.mark.parametrize("variant", ["qk", "qk_gqa", "hidden"])
def test_gram_loss_equals_direct_loss(variant, monkeypatch):
    monkeypatch.setattr(predictor_mod, "_LOSS_CHUNK_ELEMS", 512)  # several checkpointed chunks
    b, h, s, d, r, hid = 2, 4, 96, 16, 4, 24
    hkv = 2 if variant == "qk_gqa" else h
    q = torch.randn(b, h, s, d, dtype=torch.float64) + 0.3
    k = torch.randn(b, hkv, s, d, dtype=torch.float64) - 0.5  # non-zero mean: centring matters
    x = torch.randn(b, s, hid, dtype=torch.float64) if variant == "hidden" else None
    pred = LowRankPredictor(h, d, r, num_kv_heads=hkv, input_dim=hid if x is not None else None, dtype=torch.float64)
    rows = sample_rows(s, 5, 2)
    q_lr, k_lr = pred.project_hidden(x) if x is not None else pred.project(q, k)
    k_full = k.repeat_interleave(h // hkv, dim=1)
    ref = predictor_loss_reference(q_lr[:, :, rows], k_lr, q[:, :, rows], k_full, 0.25)
    g_ref = torch.autograd.grad(ref, (pred.weight_q, pred.weight_k), retain_graph=True)
    monkeypatch.setattr(predictor_mod, "centered_gram", functools.partial(predictor_mod.centered_gram, chunk=16))
    got = predictor_loss(pred, q[:, :, rows], q_lr[:, :, rows], k, 0.25, x=x)
    g_got = torch.autograd.grad(got, (pred.weight_q, pred.weight_k))
    torch.testing.assert_close(got.double(), ref.double(), rtol=1e-5, atol=1e-6)
    for a, c in zip(g_got, g_ref):
        torch.testing.assert_close(a.double(), c.double(), rtol=1e-4, atol=1e-6)
    assert 0.05 < float(ref.detach()) < 2  # a real, non-trivial loss value


def test_centered_gram_chunks_in_fp32():
    from megatron_dsv.layers.predictor import centered_gram

    a, b = torch.randn(2, 3, 100, 8) + 5, torch.randn(2, 3, 100, 4) - 2
    want = (a - a.mean(2, keepdim=True)).transpose(-1, -2) @ (b - b.mean(2, keepdim=True))
    torch.testing.assert_close(centered_gram(a, b, chunk=7), want, rtol=1e-4, atol=1e-4)


def test_predictor_learns_low_rank_scores():
    torch.manual_seed(0)
    b, h, s, d, r = 1, 2, 64, 32, 4
    basis = torch.randn(h, r, d)  # q and k live in a rank-4 subspace: learnable exactly
    q = torch.randn(b, h, s, r) @ basis
    k = torch.randn(b, h, s, r) @ basis
    pred = LowRankPredictor(h, d, r)
    opt = torch.optim.Adam(pred.parameters(), lr=3e-2)
    rows = sample_rows(s, 4, 0)
    losses = []
    for _ in range(150):
        q_lr, k_lr = pred.project(q, k)
        loss = predictor_loss(pred, q[:, :, rows], q_lr[:, :, rows], k, 1 / math.sqrt(d))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.01 < losses[0]


def test_predictor_gqa_shapes_and_grad_isolation():
    pred = LowRankPredictor(num_heads=4, head_dim=16, rank=8, num_kv_heads=2)
    q = torch.randn(2, 4, 32, 16, requires_grad=True)
    k = torch.randn(2, 2, 32, 16, requires_grad=True)
    q_lr, k_lr = pred.project(q, k)
    assert q_lr.shape == k_lr.shape == (2, 4, 32, 8)
    loss = predictor_loss(pred, q, q_lr, k, 0.25)
    loss.backward()
    assert q.grad is None and k.grad is None
    assert pred.weight_q.grad.abs().sum() > 0 and pred.weight_k.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="not a multiple"):
        LowRankPredictor(num_heads=3, head_dim=16, rank=8, num_kv_heads=2)


def test_head_slot_weights_reuse_one_device_index():
    """A CP rank's head slot: the right rows, from an index built once per (heads, device)."""
    pred = LowRankPredictor(6, 16, 4)
    slot = [4, 1, 3]
    for _ in range(2):
        w_q, w_k = pred.weights(slot)
        assert torch.equal(w_q, pred.weight_q[slot]) and torch.equal(w_k, pred.weight_k[slot])
    pred.weights([0, 2])
    assert len(pred._head_index) == 2
