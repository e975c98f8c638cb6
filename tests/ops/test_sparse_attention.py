import math

import pytest
import torch
import torch.nn.functional as F

import megatron_dsv.ops.sparse_attention.naive as naive
from megatron_dsv.ops.selection import select_topk
from megatron_dsv.ops.sparse_attention import masked_dense_attention, sparse_attention
from megatron_dsv.ops.sparse_index import SparseIndex


def random_index(b, h, s, g, k_per_head, kv_block=1, s_kv=None):
    s_kv = s_kv or s
    return select_topk(torch.randn(b, h, s, 8), torch.randn(b, h, s_kv, 8), g, k_per_head, kv_block=kv_block)


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("kv_block", [1, 4])
@pytest.mark.parametrize("hkv", [4, 2])
def test_matches_masked_dense_fwd_bwd(kv_block, hkv, monkeypatch):
    monkeypatch.setattr(naive, "_CHUNK_ELEMS", 2048)  # several group chunks
    b, h, s, d, g = 2, 4, 64, 32, 8
    units = s // kv_block
    q = torch.randn(b, h, s, d, dtype=torch.float64, requires_grad=True)
    k = torch.randn(b, hkv, s, d, dtype=torch.float64, requires_grad=True)
    v = torch.randn(b, hkv, s, d, dtype=torch.float64, requires_grad=True)
    index = random_index(b, h, s, g, [1, 3, units // 2, units], kv_block)
    out, lse = sparse_attention(q, k, v, index)
    ref, ref_lse = masked_dense_attention(q, k, v, index.to_dense_mask(), 1 / math.sqrt(d))
    do = torch.randn_like(out)
    grads = torch.autograd.grad((out * do).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * do).sum(), (q, k, v))
    assert out.dtype == torch.float64 and lse.dtype == torch.float64  # fp32 for fp32/bf16 inputs
    assert rel_err(out, ref) < 1e-10 and rel_err(lse, ref_lse) < 1e-6
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-10


def test_all_keys_equals_dense_sdpa():
    b, h, s, d, g = 1, 2, 64, 16, 8
    q, k, v = (torch.randn(b, h, s, d, requires_grad=True) for _ in range(3))
    out, _ = sparse_attention(q, k, v, random_index(b, h, s, g, s))
    ref = F.scaled_dot_product_attention(q, k, v)
    assert rel_err(out, ref) < 1e-5
    g1 = torch.autograd.grad(out.square().sum(), (q, k, v))
    g2 = torch.autograd.grad(ref.square().sum(), (q, k, v))
    for a, c in zip(g1, g2):
        assert rel_err(a, c) < 1e-5


def test_k_one_returns_that_value():
    b, h, s, d, g = 1, 1, 16, 16, 4
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    index = random_index(b, h, s, g, 1)
    out, lse = sparse_attention(q, k, v, index)
    for gi in range(s // g):
        j = int(index.kv_idx[0, 0, gi, 0])
        torch.testing.assert_close(out[0, 0, gi * g : (gi + 1) * g], v[0, 0, j].expand(g, d))
        torch.testing.assert_close(lse[0, 0, gi * g : (gi + 1) * g], (q[0, 0, gi * g : (gi + 1) * g] @ k[0, 0, j]) / 4)


def test_cross_length_keys():
    b, h, s, s_kv, d, g = 1, 2, 32, 48, 16, 8
    q, k, v = torch.randn(b, h, s, d), torch.randn(b, h, s_kv, d), torch.randn(b, h, s_kv, d)
    index = random_index(b, h, s, g, [5, 48], s_kv=s_kv)
    out, lse = sparse_attention(q, k, v, index)
    ref, ref_lse = masked_dense_attention(q, k, v, index.to_dense_mask(), 0.25)
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(lse, ref_lse)


def _args(**kw):
    b, h, s, d = 1, 2, 32, 16
    a = dict(q=torch.randn(b, h, s, d), k=torch.randn(b, h, s, d), v=torch.randn(b, h, s, d))
    a["index"] = random_index(b, h, s, 8, 4)
    a.update(kw)
    return a


@pytest.mark.parametrize(
    "kw,exc,msg",
    [
        (dict(q=torch.randn(1, 2, 32, 20), k=torch.randn(1, 2, 32, 20), v=torch.randn(1, 2, 32, 20)), ValueError, "head dim 20"),
        (dict(q=torch.randn(1, 2, 32, 16).double()), TypeError, "share a dtype"),
        (dict(q=torch.ones(1, 2, 32, 16, dtype=torch.int32)), TypeError, "fp32, fp16 or bf16"),
        (dict(k=torch.randn(1, 3, 32, 16), v=torch.randn(1, 3, 32, 16)), ValueError, "multiple of key/value heads"),
        (dict(q=torch.randn(1, 2, 40, 16)), ValueError, "S_q=32"),
        (dict(q=torch.randn(1, 4, 32, 16)), ValueError, "H=2"),
        (dict(q=torch.randn(2, 16)), ValueError, r"\[B, H, S, D\]"),
    ],
)
def test_bad_inputs_raise(kw, exc, msg):
    with pytest.raises(exc, match=msg):
        sparse_attention(**_args(**kw))


def test_sparse_index_validation():
    idx = random_index(1, 2, 32, 8, [2, 4])
    idx.validate()
    bad = idx.kv_idx.clone()
    bad[0, 0, 0, 1] = bad[0, 0, 0, 0]
    with pytest.raises(ValueError, match="distinct and ascending"):
        SparseIndex(bad, idx.kv_count, 8, 1, 32, 32).validate()
    with pytest.raises(ValueError, match="-1 exactly"):
        SparseIndex(idx.kv_idx, torch.tensor([[1, 4]], dtype=torch.int32), 8, 1, 32, 32).validate()
    with pytest.raises(TypeError, match="int32"):
        SparseIndex(idx.kv_idx.long(), idx.kv_count, 8, 1, 32, 32)
    with pytest.raises(ValueError, match="Gq\\*group_size"):
        SparseIndex(idx.kv_idx, idx.kv_count, 4, 1, 32, 32)
    with pytest.raises(ValueError, match="Kmax"):
        SparseIndex(torch.zeros(1, 2, 4, 9, dtype=torch.int32), idx.kv_count, 8, 4, 32, 32)
    assert torch.allclose(idx.density(), torch.tensor([[2 / 32, 4 / 32]]))
    assert idx.computed_pairs() == (2 + 4) * 32
