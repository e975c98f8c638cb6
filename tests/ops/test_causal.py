"""Causal and chunk-causal masks: the mask model, masked selection and masked reference attention
against dense attention with the boolean mask (torch SDPA, fp64)."""

import math

import pytest
import torch
import torch.nn.functional as F

import megatron_dsv.ops.sparse_attention.naive as naive
from megatron_dsv.ops.layout import cube_major_positions
from megatron_dsv.ops.mask import CausalMask
from megatron_dsv.ops.selection import group_proxies, pool_keys, select_topk
from megatron_dsv.ops.sparse_attention import sparse_attention, sparse_attention_bwd, sparse_attention_fwd

MASKS = [CausalMask("causal"), CausalMask("chunk_causal", 16), CausalMask("chunk_causal", 12)]


def rel_err(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("mask", MASKS + [CausalMask("chunk_causal", 5)])
@pytest.mark.parametrize("g,kvb", [(4, 1), (4, 4), (6, 4), (8, 3), (4, 8)])
def test_unit_classes_match_token_mask(mask, g, kvb):
    s = 48
    units = s // kvb
    dense = mask.dense(s).view(s // g, g, units, kvb)
    any_ = dense.any(-1).any(1)
    all_ = dense.all(-1).all(1)
    own = torch.zeros(s // g, units, dtype=torch.bool)
    for gi in range(s // g):
        own[gi, gi * g // kvb : ((gi + 1) * g - 1) // kvb + 1] = True
    allowed, forced = mask.unit_classes(torch.arange(s // g), g, kvb, units)
    assert torch.equal(allowed, any_)
    assert torch.equal(forced, (any_ & ~all_) | own)
    assert torch.equal(mask.forced_count(s, g, kvb), forced.sum(-1))


@pytest.mark.parametrize("mask", MASKS + [CausalMask("chunk_causal", 5), CausalMask("chunk_causal", 8)])
@pytest.mark.parametrize("g,kvb", [(4, 1), (4, 4), (6, 4), (8, 3), (4, 8), (8, 8), (8, 16)])
def test_rows_with_choice_match_the_forced_units(mask, g, kvb):
    """A row has a choice iff it may read a key in a unit outside its group's forced units (the
    definition, from the token mask and unit_classes, row by row)."""
    s = 48
    units = s // kvb
    rows = torch.arange(s)
    allowed, forced = mask.unit_classes(rows // g, g, kvb, units)
    readable = mask.dense(s)[:, : units * kvb].view(s, units, kvb).any(-1)
    assert torch.equal(readable & ~allowed, torch.zeros_like(readable))
    want = (readable & ~forced).any(-1)
    assert torch.equal(mask.rows_with_choice(rows, g, kvb, s), want)


def test_rows_without_choice_by_hand():
    rows = torch.arange(64)
    causal = CausalMask("causal")
    # groups of 8, blocks of 4: group 0 reads only its own units 0, 1; group 1 reads 0, 1 whole
    assert torch.equal(causal.rows_with_choice(rows, 8, 4, 64), rows >= 8)
    # blocks of 16: groups 0 and 1 share unit 0, their own; group 2 (tokens 16..23) may skip it
    assert torch.equal(causal.rows_with_choice(rows, 8, 16, 64), rows >= 16)
    # blocks of 1 (single keys): group 0 has no key before its own
    assert torch.equal(causal.rows_with_choice(rows, 8, 1, 64), rows >= 8)
    # chunk-causal, chunks = groups = blocks of 8: chunk 0 reads its own unit only
    assert torch.equal(CausalMask("chunk_causal", 8).rows_with_choice(rows, 8, 8, 64), rows >= 8)
    # chunks of 16, groups of 8, blocks of 4: group 0 may skip units 2, 3 of its chunk: every row has a choice
    assert bool(CausalMask("chunk_causal", 16).rows_with_choice(rows, 8, 4, 64).all())
    with pytest.raises(ValueError, match=r"lie in \[0, 64\)"):
        causal.rows_with_choice(torch.tensor([64]), 8, 4, 64)
    with pytest.raises(ValueError, match="int64"):
        causal.rows_with_choice(rows.int(), 8, 4, 64)


def test_mask_arguments_are_checked():
    with pytest.raises(ValueError, match="kind"):
        CausalMask("sliding")
    with pytest.raises(ValueError, match="chunk_tokens >= 1"):
        CausalMask("chunk_causal", 0)
    with pytest.raises(ValueError, match="no chunks"):
        CausalMask("causal", 8)
    with pytest.raises(ValueError, match="multiple of 2"):
        CausalMask.from_frames(3, 16, 2)


def test_frame_chunks_are_contiguous_in_cube_major_order():
    thw, cube, frames = (6, 4, 8), (2, 2, 4), 2
    mask = CausalMask.from_frames(frames, thw[1] * thw[2], cube[0])
    frame = cube_major_positions(thw, cube)[:, 0]
    chunk_of_token = torch.arange(frame.numel()) // mask.chunk_tokens
    assert torch.equal(chunk_of_token, frame // frames)


def brute_force_selection(q_lr, k_lr, g, k, kvb, mask):
    """Per group: forced units, then the best allowed units, then disallowed ones by position."""
    s = q_lr.shape[2]
    scores = torch.einsum("bhgr,bhur->bhgu", group_proxies(q_lr, g), pool_keys(k_lr, kvb))
    allowed, forced = mask.unit_classes(torch.arange(s // g), g, kvb, s // kvb)
    out = []
    for bi in range(q_lr.shape[0]):
        for hi in range(q_lr.shape[1]):
            for gi in range(s // g):
                f = forced[gi].nonzero().flatten().tolist()
                rest = (allowed[gi] & ~forced[gi]).nonzero().flatten()
                rest = rest[scores[bi, hi, gi, rest].argsort(descending=True)].tolist()
                fill = (~allowed[gi]).nonzero().flatten().tolist()
                out.append(sorted((f + rest + fill)[: k[hi]]))
    return out


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("kvb", [1, 4])
def test_selection_keeps_top_k_among_allowed_units(mask, kvb):
    b, h, s, g = 2, 3, 48, 4
    units = s // kvb
    need = mask.max_forced(s, g, kvb)
    k = [need, need + 2, units]  # the last head: K larger than every group's allowed units but the last
    q_lr, k_lr = torch.randn(b, h, s, 6), torch.randn(b, h, s, 6)
    index = select_topk(q_lr, k_lr, g, k, kv_block=kvb, mask=mask)
    assert index.mask == mask and index.verified
    index.validate(check_values=True)
    got = [sorted(r[r >= 0].tolist()) for r in index.kv_idx.flatten(0, 2)]
    assert got == brute_force_selection(q_lr, k_lr, g, k, kvb, mask)
    # a group with fewer allowed units than K keeps all of them
    allowed, _ = mask.unit_classes(torch.arange(s // g), g, kvb, units)
    kept = torch.zeros(b, h, s // g, units + 1, dtype=torch.bool).scatter_(-1, index.kv_idx.long() % (units + 1), True)
    assert torch.equal(kept[:, 2, :, :units] & allowed, allowed.expand(b, -1, -1))


def test_selection_refuses_k_below_the_forced_units():
    q_lr = torch.randn(1, 2, 32, 4)
    mask = CausalMask("causal")
    need = mask.max_forced(32, 8, 1)
    with pytest.raises(ValueError, match=f"at least {need}"):
        select_topk(q_lr, q_lr, 8, need - 1, mask=mask)
    with pytest.raises(ValueError, match=r"q_offset=40, S_q=32, S_kv=64"):
        select_topk(q_lr, torch.randn(1, 2, 64, 4), 8, need, mask=mask, q_offset=40)


def sdpa_reference(q, k, v, keep, scale):
    """SDPA with the boolean keep-mask, and the LSE of the same masked scores (fp64)."""
    rep = q.shape[1] // k.shape[1]
    kr, vr = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    out = F.scaled_dot_product_attention(q, kr, vr, attn_mask=keep, scale=scale)
    lse = torch.logsumexp((q @ kr.transpose(-1, -2) * scale).masked_fill(~keep, float("-inf")), -1)
    return out, lse


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("kvb,hkv", [(1, 4), (4, 2), (3, 4)])
def test_masked_sparse_attention_matches_sdpa(mask, kvb, hkv, monkeypatch):
    monkeypatch.setattr(naive, "_CHUNK_ELEMS", 4096)  # several group chunks
    b, h, s, d, g = 2, 4, 48, 16, 4
    units = s // kvb
    need = mask.max_forced(s, g, kvb)
    k_per_head = [need, need + 1, units // 2 + 1, units]
    q, k, v = (torch.randn(b, n, s, d, dtype=torch.float64, requires_grad=True) for n in (h, hkv, hkv))
    index = select_topk(torch.randn(b, h, s, 6), torch.randn(b, h, s, 6), g, k_per_head, kv_block=kvb, mask=mask)
    keep = index.to_dense_mask()
    assert torch.equal(keep[:, 3], mask.dense(s).expand(b, s, s))  # K = all units: exactly the mask
    assert not keep[:, 0].equal(keep[:, 3])  # the sparsest head really drops allowed pairs
    scale = 1 / math.sqrt(d)
    out, lse = sparse_attention(q, k, v, index, backend="reference")
    ref, ref_lse = sdpa_reference(q, k, v, keep, scale)
    do = torch.randn_like(out)
    grads = torch.autograd.grad((out * do).sum(), (q, k, v))
    ref_grads = torch.autograd.grad((ref * do).sum(), (q, k, v))
    assert rel_err(out, ref) < 1e-12 and rel_err(lse, ref_lse) < 1e-12
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-12
    # the forward/backward building blocks (context parallelism's) give the same values
    with torch.no_grad():
        out2, lse2 = sparse_attention_fwd(q, k, v, index, scale, backend="reference")
        split = sparse_attention_bwd(q, k, v, out2, lse2, do, index, scale, backend="reference")
    assert rel_err(out2, ref) < 1e-12
    for got, want in zip(split, ref_grads):
        assert rel_err(got, want) < 1e-12


def test_masked_index_refuses_kernels_that_ignore_the_mask():
    """cuDNN's block-sparse attention takes no mask (the Triton kernels do:
    tests/ops/test_causal_triton.py; the selective CP exchange too: tests/cp/test_cp_attention.py)."""
    q = torch.randn(1, 2, 32, 16)
    index = select_topk(torch.randn(1, 2, 32, 4), torch.randn(1, 2, 32, 4), 8, 8, mask=CausalMask("causal"))
    with pytest.raises(ValueError, match="no token-wise mask"):
        sparse_attention(q, q, q, index, backend="cudnn")


@pytest.mark.parametrize("mask", [CausalMask("causal"), CausalMask("chunk_causal", 48)], ids=["causal", "chunk48"])
@pytest.mark.parametrize("g,kvb", [(16, 16), (16, 8), (32, 16)])
def test_selected_fraction_counts_allowed_units_per_group(mask, g, kvb):
    """allowed_count equals the allowed units of unit_classes; selected_fraction is the mean over
    heads of sum_g min(K_h, allowed_g) / sum_g allowed_g (all units: 1; one unit: a small share)."""
    s = 192
    units = s // kvb
    groups = torch.arange(s // g)
    allowed, _ = mask.unit_classes(groups, g, kvb, units)
    count = mask.allowed_count(s, g, kvb)
    assert count.tolist() == allowed.sum(-1).tolist()
    k = torch.tensor([1, 5, units])
    want = sum(float(allowed.sum(-1).clamp(max=int(kh)).sum()) / float(allowed.sum()) for kh in k) / len(k)
    assert mask.selected_fraction(k, s, g, kvb) == pytest.approx(want, abs=1e-12)
    assert mask.selected_fraction(torch.tensor([units]), s, g, kvb) == 1.0
