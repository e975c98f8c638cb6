"""Predictor statistics under causal masks (issue 19): closed-form moments, gradient loss and the
profiler's recall / K rule count only the (query, key) pairs the mask allows."""

import math

import pytest
import torch
import torch.utils._python_dispatch

from megatron_dsv.layers import predictor as predictor_mod
from megatron_dsv.layers.predictor import (
    LowRankPredictor,
    centered_gram,
    predictor_loss,
    predictor_loss_reference,
    prefix_centered_grams,
    score_moments,
)
from megatron_dsv.layers.profiler import recall_curve, sample_rows, sampled_attention_stats
from megatron_dsv.ops.mask import CausalMask
from megatron_dsv.ops.sparse_index import SparseIndex

MASKS = [pytest.param(CausalMask("causal"), id="causal"), pytest.param(CausalMask("chunk_causal", 16), id="chunk16")]


def problem(b, h, h_kv, s, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, s, d, generator=g, dtype=torch.float64) + 0.3
    k = torch.randn(b, h_kv, s, d, generator=g, dtype=torch.float64) * torch.linspace(2, 0.2, d, dtype=torch.float64) - 0.5
    # later keys drift: a prefix's Gram differs from the whole sequence's
    k = k + torch.linspace(0, 3, s, dtype=torch.float64).view(1, 1, s, 1) * torch.randn(d, generator=g, dtype=torch.float64)
    return q, k


def brute_moments(q_rows, k, rows, mask):
    """ScoreMoments' fields from one prefix Gram per row, built from the allowed keys directly."""
    b, h, n, d = q_rows.shape
    rep = h // k.shape[1]
    c_q = torch.zeros(h, d, d, dtype=torch.float64)
    c_k = torch.zeros(h, d, d, dtype=torch.float64)
    k_energy, keys = torch.zeros(h, dtype=torch.float64), torch.zeros(h, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i, pos in enumerate(rows.tolist()):
                allowed = mask.allowed(torch.tensor(pos), torch.arange(k.shape[2]))
                kc = k[bi, hi // rep, allowed]
                kc = kc - kc.mean(0)
                gram = kc.T @ kc
                tr = gram.trace()
                qi = q_rows[bi, hi, i]
                energy = qi @ gram @ qi
                if energy > 1e-12 * tr * (qi @ qi):
                    c_q[hi] += tr / energy * torch.outer(qi, qi)
                if tr > 0:
                    c_k[hi] += gram / tr / n
                k_energy[hi] += tr / n
                keys[hi] += int(allowed.sum()) / n
    return c_q, c_k, k_energy, keys


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("h_kv", [2, 1])
def test_masked_moments_equal_brute_force_over_allowed_pairs(mask, h_kv):
    b, h, s, d = 2, 2, 64, 6
    q, k = problem(b, h, h_kv, s, d)
    rows = sample_rows(s, 5, 3)  # includes rows of several chunks
    got = score_moments(q[:, :, rows], k, mask=mask, rows=rows)
    c_q, c_k, k_energy, keys = brute_moments(q[:, :, rows], k, rows, mask)
    for a, e in ((got.c_q, c_q), (got.c_k, c_k), (got.k_energy, k_energy), (got.keys, keys)):
        torch.testing.assert_close(a, e, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got.rows, torch.full((h,), float(b * rows.numel()), dtype=torch.float64))
    plain = score_moments(q[:, :, rows], k)
    assert (got.c_q - plain.c_q).norm() > 0.05 * plain.c_q.norm()
    assert (got.c_k - plain.c_k).norm() > 0.05 * plain.c_k.norm()
    assert float(got.keys[0]) < float(plain.keys[0])  # rows read fewer keys than the sequence holds


def test_unmasked_rows_reading_every_key_give_the_plain_moments():
    """Rows of the last chunk read every key: the masked path is the plain one."""
    b, h, s, d = 2, 2, 64, 6
    q, k = problem(b, h, 1, s, d)
    rows = torch.arange(48, 64, 3)
    got = score_moments(q[:, :, rows], k, mask=CausalMask("chunk_causal", 16), rows=rows)
    plain = score_moments(q[:, :, rows], k)
    for a, e in zip(got._fields(), plain._fields()):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-10)


def prefix_grams_by_end(*args, **kw):
    """prefix_centered_grams' blocks as {end: [Gram per pair]}, checking that the blocks cover
    the ends once, in order."""
    ends = list(args[2])
    got, covered = {}, 0
    for j0, j1, grams in prefix_centered_grams(*args, **kw):
        assert j0 == covered and j1 > j0, (j0, j1, covered)
        assert all(g.shape[2] == j1 - j0 for g in grams)
        for j in range(j0, j1):
            got[ends[j]] = [g[:, :, j - j0] for g in grams]
        covered = j1
    assert covered == len(ends)
    return got


# (piece, max_elems): the default runs; runs of at most 3 tokens; blocks of one run, each
# carrying the prefix before it into the next
BLOCKINGS = [pytest.param(None, 1 << 24, id="default"), pytest.param(3, 1 << 24, id="piece3"),
             pytest.param(None, 200, id="block1")]


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("piece,max_elems", BLOCKINGS)
def test_prefix_grams_equal_the_grams_of_each_prefix(dtype, tol, piece, max_elems):
    """Each prefix's Gram to ``tol`` of its own size, even where the prefix's keys sit far from the
    sequence's mean (a drift of 40 over the sequence against a spread of 0.5); one key: exactly 0."""
    b, g, s, d = 2, 3, 50, 5
    drift = torch.linspace(0, 40, s).view(1, 1, s, 1) * torch.randn(d)
    a = (torch.randn(b, g, s, d) * 0.5 + 40.0 + drift).to(dtype)
    x = torch.randn(b, 1, s, 7, dtype=dtype)
    ends = [1, 2, 7, 8, 33, 50]
    got = prefix_grams_by_end([a, x], [(0, 0), (0, 1), (1, 1)], ends, dtype, piece=piece, max_elems=max_elems)
    for end in ends:
        grams = got[end]
        want = [centered_gram(a[:, :, :end].double(), a[:, :, :end].double()),
                centered_gram(a[:, :, :end].double(), x[:, :, :end].double()),
                centered_gram(x[:, :, :end].double(), x[:, :, :end].double())]
        for gg, w in zip(grams, want):
            assert gg.dtype == dtype and gg.shape == w.shape
            if end == 1:
                assert not gg.any()
                continue
            scale = float(w.abs().max())
            torch.testing.assert_close(gg.double() / scale, w / scale, rtol=0, atol=tol)
    with pytest.raises(ValueError, match="ascending"):
        prefix_centered_grams([a], [(0, 0)], [5, 5], dtype)
    with pytest.raises(ValueError, match="piece must be"):
        prefix_centered_grams([a], [(0, 0)], [5], dtype, piece=0)


def test_mask_segments_group_rows_by_prefix():
    """Segments against a plain grouping: distinct ends ascending, every row once, in its
    prefix's segment; one device end per segment."""
    rows = torch.tensor([40, 3, 17, 16, 63, 31, 0, 47, 32], dtype=torch.int64)
    for mask in (CausalMask("causal"), CausalMask("chunk_causal", 16)):
        seg = predictor_mod.mask_segments(mask, rows, 64)
        ends = (mask.limit(rows) + 1).tolist()
        assert list(seg.ends) == sorted(set(ends))
        assert torch.equal(seg.device_ends, torch.tensor(seg.ends))
        assert sorted(seg.order.tolist()) == list(range(rows.numel()))
        for j, end in enumerate(seg.ends):
            members = seg.order[seg.starts[j]:seg.starts[j + 1]].tolist()
            assert sorted(members) == [i for i, e in enumerate(ends) if e == end]
            assert (seg.segment[seg.starts[j]:seg.starts[j + 1]] == j).all()
        assert seg.rows_per_segment_times_end() == sum(ends)
    empty = predictor_mod.mask_segments(CausalMask("causal"), rows[:0], 64)
    assert len(empty) == 0 and empty.starts == (0,)
    with pytest.raises(ValueError, match=r"in \[0, 64\)"):
        predictor_mod.mask_segments(CausalMask("causal"), rows + 30, 64)


class _CountOps(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mask", MASKS)
def test_masked_statistics_run_a_fixed_number_of_ops(mask):
    """The masked loss (with its backward) and moments run the same ops for 8 and for 32 sampled
    rows (one block: no Python step per segment), and no nonzero / item (host syncs on CUDA).
    Before: one nonzero and about 90 ops per token-causal segment."""
    b, h, s, d, r = 1, 2, 64, 8, 3
    q, k = problem(b, h, h, s, d, seed=2)
    pred = LowRankPredictor(h, d, r, dtype=torch.float64)
    counts = []
    for stride in (8, 2):
        rows = sample_rows(s, stride, 1)
        pred.zero_grad(set_to_none=True)
        with _CountOps() as mode:
            u = pred.project_queries(q[:, :, rows])
            predictor_loss(pred, q[:, :, rows], u, k, 0.4, mask=mask, rows=rows).backward()
            score_moments(q[:, :, rows], k, mask=mask, rows=rows)
        assert not {"aten.nonzero", "aten._local_scalar_dense", "aten.item"} & set(mode.ops)
        counts.append(len(mode.ops))
    assert counts[0] == counts[1], counts


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("variant", ["qk_gqa", "hidden"])
def test_masked_statistics_do_not_depend_on_the_blocking(mask, variant, monkeypatch):
    """Blocks of a few elements (one run per prefix block, a few padded rows per row block, rows of
    uneven segments padded together) give the loss, its gradient and the moments of one block."""
    b, h, hkv, s, d, r, hid = 2, 4, 2, 64, 8, 3, 10
    q, k = problem(b, h, hkv, s, d, seed=6)
    x = torch.randn(b, s, hid, dtype=torch.float64) + 0.7 if variant == "hidden" else None
    rows = torch.cat([torch.arange(1, 20, 1), torch.arange(21, s, 7)])  # dense rows, then sparse ones
    results = []
    for elems in (None, 150):
        if elems is not None:
            monkeypatch.setattr(predictor_mod, "block_elems", lambda device: elems)
        pred = LowRankPredictor(h, d, r, num_kv_heads=hkv, input_dim=hid if x is not None else None, dtype=torch.float64)
        u = pred.project_queries(q[:, :, rows] if x is None else x[:, rows])
        loss = predictor_loss(pred, q[:, :, rows], u, k, 0.4, x=x, mask=mask, rows=rows)
        grads = torch.autograd.grad(loss, (pred.weight_q, pred.weight_k))
        moments = score_moments(q[:, :, rows], k, mask=mask, rows=rows)._fields() if x is None else ()
        results.append((loss.detach(), *grads, *moments))
    for a, e in zip(*results):
        torch.testing.assert_close(a, e, rtol=1e-10, atol=1e-12)


def brute_loss(q_lr_rows, k_lr, q_rows, k, rows, mask, scale, w):
    """Mean row loss, each row's scores sliced to its allowed keys."""
    total, count = 0.0, 0
    for i, pos in enumerate(rows.tolist()):
        allowed = mask.allowed(torch.tensor(pos), torch.arange(k.shape[2]))
        e = q_rows[:, :, i : i + 1] @ k[:, :, allowed].transpose(-1, -2) * scale
        p = q_lr_rows[:, :, i : i + 1] @ k_lr[:, :, allowed].transpose(-1, -2) * scale
        e, p = e - e.mean(-1, keepdim=True), p - p.mean(-1, keepdim=True)
        pe, ee, pp = (p * e).sum(-1), (e * e).sum(-1), (p * p).sum(-1)
        total = total + predictor_mod.row_loss_from_sums(pe, ee, pp, w).sum()
        count += pe.numel()
    return total / count


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("variant", ["qk", "qk_gqa", "hidden"])
def test_masked_gram_loss_equals_the_masked_definition(mask, variant, monkeypatch):
    monkeypatch.setattr(predictor_mod, "_LOSS_CHUNK_ELEMS", 512)  # several checkpointed chunks
    b, h, s, d, r, hid = 2, 4, 64, 8, 3, 10
    hkv = 2 if variant == "qk_gqa" else h
    q, k = problem(b, h, hkv, s, d, seed=1)
    x = torch.randn(b, s, hid, dtype=torch.float64) + 0.7 if variant == "hidden" else None
    pred = LowRankPredictor(h, d, r, num_kv_heads=hkv, input_dim=hid if x is not None else None, dtype=torch.float64)
    rows = sample_rows(s, 3, 1)
    q_lr, k_lr = pred.project_hidden(x) if x is not None else pred.project(q, k)
    k_full = k.repeat_interleave(h // hkv, dim=1)
    scale = 1 / math.sqrt(d)
    want = brute_loss(q_lr[:, :, rows], k_lr, q[:, :, rows], k_full, rows, mask, scale, 0.95)
    ref = predictor_loss_reference(q_lr[:, :, rows], k_lr, q[:, :, rows], k_full, scale, mask=mask, rows=rows)
    got = predictor_loss(pred, q[:, :, rows], q_lr[:, :, rows], k, scale, x=x, mask=mask, rows=rows)
    plain = predictor_loss(pred, q[:, :, rows], q_lr[:, :, rows], k, scale, x=x)
    torch.testing.assert_close(ref.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    params = (pred.weight_q, pred.weight_k)
    g_want = torch.autograd.grad(want, params, retain_graph=True)
    g_got = torch.autograd.grad(got, params, retain_graph=True)
    for a, e in zip(g_got, g_want):
        torch.testing.assert_close(a, e, rtol=1e-7, atol=1e-9)
    assert abs(float(got.detach()) - float(plain.detach())) > 0.01  # the mask changes the loss
    summed = predictor_loss(pred, q[:, :, rows], q_lr[:, :, rows], k, scale, x=x, mask=mask, rows=rows, reduction="sum")
    torch.testing.assert_close(summed / (b * h * rows.numel()), got)


def test_masked_refit_fits_the_keys_the_rows_read():
    """Planted: chunk 0's keys span a rank-2 subspace, chunk 1's keys vary (much more) in other
    directions. Rows of chunk 0 read only chunk 0, so the masked fit is exact; the unmasked fit
    spends its rank on chunk 1's directions and leaves a large masked loss."""
    b, h, s, d, r = 1, 2, 64, 8, 2
    g = torch.Generator().manual_seed(3)
    basis = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))[0]
    k = torch.empty(b, h, s, d, dtype=torch.float64)
    k[:, :, :32] = torch.randn(b, h, 32, 2, generator=g, dtype=torch.float64) @ basis[:2] + 1.0
    k[:, :, 32:] = 10 * torch.randn(b, h, 32, d - 2, generator=g, dtype=torch.float64) @ basis[2:]
    q = torch.randn(b, h, s, d, generator=g, dtype=torch.float64)
    mask = CausalMask("chunk_causal", 32)
    rows = torch.arange(0, 32, 2)
    scale = 1 / math.sqrt(d)

    def masked_loss(pred):
        with torch.no_grad():
            u = pred.project_queries(q[:, :, rows])
            return float(predictor_loss(pred, q[:, :, rows], u, k, scale, 0.0, mask=mask, rows=rows))

    fits = {}
    for name, kw in (("masked", dict(mask=mask, rows=rows)), ("plain", {})):
        pred = LowRankPredictor(h, d, r, dtype=torch.float64)
        pred.accumulate_moments(q[:, :, rows], k, **kw)
        fits[name] = (pred.refit(eps=1e-12), masked_loss(pred))
    assert float(fits["masked"][0].max()) < 1e-10 and fits["masked"][1] < 1e-8
    assert fits["plain"][1] > 0.3


def test_masked_statistics_reject_bad_input():
    q, k = problem(1, 2, 2, 32, 4)
    rows = torch.arange(0, 32, 4)
    mask = CausalMask("causal")
    pred = LowRankPredictor(2, 4, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="positions of the 8 sampled rows"):
        score_moments(q[:, :, rows], k, mask=mask)
    with pytest.raises(ValueError, match="shard boundary"):
        prefix_centered_grams([k], [(0, 0)], [8, 40], torch.float64)  # past the (one) shard's 32 tokens
    with pytest.raises(ValueError, match=r"in \[0, 32\)"):
        score_moments(q[:, :, rows], k, mask=mask, rows=rows + 8)
    u = pred.project_queries(q[:, :, rows])
    with pytest.raises(ValueError, match="positions of the 8 sampled rows"):
        predictor_loss(pred, q[:, :, rows], u, k, 0.5, mask=mask, rows=rows[:3])
    with pytest.raises(ValueError, match="reduction"):
        predictor_loss(pred, q[:, :, rows], u, k, 0.5, reduction="none")


def test_recall_of_a_selection_counts_allowed_keys_only():
    """A planted selection of disallowed units holds no mass; the recall is the softmax over the
    allowed keys on the selected ones (not the bidirectional softmax's share)."""
    b, h, s, d, g = 1, 2, 32, 8, 8
    torch.manual_seed(0)
    q, k = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    mask = CausalMask("chunk_causal", 16)
    # head 0: every group keeps units {own chunk's first group, 3}; head 1: group's own unit only
    idx = torch.tensor([[0, 3], [0, 3], [2, 3], [2, 3]], dtype=torch.int32)
    kv_idx = torch.stack([idx, torch.cat([torch.arange(4).view(4, 1), torch.zeros(4, 1, dtype=torch.long)], 1).int()])
    index = SparseIndex(kv_idx.unsqueeze(0), torch.tensor([[2, 1]], dtype=torch.int32), group_size=g, kv_block=8,
                        seq_len_q=s, seq_len_kv=s, mask=mask)
    rows = torch.arange(1, s, 3)
    got = sampled_attention_stats(q[:, :, rows], k, 0.3, 0.9, row_groups=rows // g, index=index, mask=mask, rows=rows)
    logits = (q @ k.transpose(-1, -2) * 0.3).masked_fill(~mask.dense(s), float("-inf"))
    p = torch.softmax(logits, -1)[:, :, rows]
    keep = index.to_dense_mask()[:, :, rows]
    want = (p * keep).sum(-1).mean(-1)
    torch.testing.assert_close(got["recall"], want)
    # rows of chunk 0 select unit 3 (disallowed to them): it holds nothing, so head 0's recall is
    # chunk 0's share of unit 0 only, below 1, and a bidirectional measure would differ
    plain = sampled_attention_stats(q[:, :, rows], k, 0.3, 0.9, row_groups=rows // g, index=index)
    assert (got["recall"] - plain["recall"]).abs().max() > 0.05


@pytest.mark.parametrize("kvb", [1, 4])
def test_k_rule_counts_allowed_units_only(kvb):
    """Rows of the first chunk read 16 of 64 keys: the curve never ranks a disallowed unit before
    their mass is complete, so full recall, the critical mass and every row's need are reached
    within the chunk's units, and the mass past them is zero."""
    b, h, s, d, r = 2, 2, 64, 8, 4
    torch.manual_seed(1)
    q, k = torch.randn(b, h, s, d), torch.randn(b, h, s, d)
    q_lr, k_lr = torch.randn(b, h, s, r), torch.randn(b, h, s, r)
    mask = CausalMask("chunk_causal", 16)
    rows = torch.arange(0, 16, 3)
    chunk_units = 16 // kvb
    curve = recall_curve(q, k, q_lr, k_lr, rows, group_size=8, kv_block=kvb, scale=0.35, critical_mass=0.9, mask=mask)
    assert curve.num_units == s // kvb
    assert int(curve.k_for_recall(1.0).max()) <= chunk_units
    assert int(curve.units_needed(quantile=1.0).max()) <= chunk_units
    assert float(curve.need_count[:, chunk_units:].sum()) == 0.0
    assert float(curve.mass_by_rank[:, chunk_units:].abs().sum()) == 0.0
    torch.testing.assert_close(curve.recall(chunk_units), torch.ones(h))
    plain = recall_curve(q, k, q_lr, k_lr, rows, group_size=8, kv_block=kvb, scale=0.35, critical_mass=0.9)
    assert int(plain.units_needed(quantile=1.0).max()) > chunk_units  # unmasked rows spread over all keys


@pytest.mark.parametrize("spec", [dict(causal=True), dict(causal=False, dsv_causal_chunk=2)], ids=["causal", "chunk"])
def test_layer_learns_from_allowed_pairs_only(megatron_state, monkeypatch, spec):
    """A profiled training forward of a masked layer hands its mask and the sampled rows'
    positions to the predictor loss and the closed-form moments, whose stored moments are then the
    masked ones."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_dsv.layers import attention as attention_mod
    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.specs import get_dsv_gpt_layer_spec
    from tests.megatron_shim import tiny_config

    calls = {"loss": [], "moments": []}
    real_loss, real_acc = attention_mod.predictor_loss, LowRankPredictor.accumulate_moments

    def spy_loss(*args, **kw):
        calls["loss"].append(kw)
        return real_loss(*args, **kw)

    def spy_acc(self, q_rows, k, *args, **kw):
        calls["moments"].append((q_rows.detach().double(), k.detach().double(), kw))
        return real_acc(self, q_rows, k, *args, **kw)

    monkeypatch.setattr(attention_mod, "predictor_loss", spy_loss)
    monkeypatch.setattr(LowRankPredictor, "accumulate_moments", spy_acc)
    chunk = spec.pop("dsv_causal_chunk", 0)
    torch.manual_seed(0)
    block = TransformerBlock(tiny_config(dsv_mode="auto", dsv_causal_chunk=chunk, dsv_kv_block=1),
                             get_dsv_gpt_layer_spec(**spec))
    layers = dsv_attention_layers(block)
    for a in layers:
        if chunk:
            a.set_frame_tokens(8)
    s = 64
    block(torch.randn(s, 2, 128), attention_mask=None).sum().backward()
    assert len(calls["loss"]) == len(calls["moments"]) == len(layers)
    for a, kw, (q_rows, k, mkw) in zip(layers, calls["loss"], calls["moments"]):
        sampled = sample_rows(s, a.dsv.dsv_profile_stride, 7 * a.layer_number)
        # groups of 8, single-key units: token-causal group 0 reads only its own keys (no choice);
        # chunk-causal (chunks of 16) group 0 may skip keys 8..15, so every row stays
        want_rows = sampled[sampled >= 8] if chunk == 0 else sampled
        assert want_rows.numel() < sampled.numel() or chunk
        assert kw["mask"] == mkw["mask"] == a.causal_mask() is not None
        assert torch.equal(kw["rows"], want_rows) and torch.equal(mkw["rows"], want_rows)
        # the recall curve counts the same rows (batch 2, every head)
        curve_rows = a.pending_stats[0].curve.rows
        assert torch.equal(curve_rows, torch.full_like(curve_rows, 2.0 * want_rows.numel())), curve_rows
        masked = score_moments(q_rows, k, mask=a.causal_mask(), rows=want_rows)
        torch.testing.assert_close(a.predictor.moments.c_q, masked.c_q)
        assert (masked.c_k - score_moments(q_rows, k).c_k).norm() > 1e-3 * masked.c_k.norm()


CP_MASKS = [CausalMask("causal"), CausalMask("chunk_causal", 16), CausalMask("chunk_causal", 64)]


def _masked_statistics_cp_rank(rank, world):
    """Each rank holds one 32-token shard of the keys and its sampled rows (positions in the whole
    sequence); the loss (and its gradient), the moments and the prefix Grams summed over the group
    equal the single-process ones on the whole sequence, in fp64. Chunk 16: shards hold chunks;
    chunk 64: a chunk spans both shards (its rows read keys up to a shard boundary)."""
    import torch.distributed as dist

    b, h, h_kv, s, d, r = 2, 4, 2, 64, 8, 3
    q, k = problem(b, h, h_kv, s, d, seed=3)
    shard = s // world
    lo, hi = rank * shard, (rank + 1) * shard
    all_rows = torch.arange(1, s, 3)
    rows = all_rows[(all_rows >= lo) & (all_rows < hi)]
    for mask in CP_MASKS:
        pred = LowRankPredictor(h, d, r, dtype=torch.float64, seed=5)
        one = LowRankPredictor(h, d, r, dtype=torch.float64, seed=5)
        u = pred.project_queries(q[:, :, rows], torch.float64)
        loss = predictor_loss(pred, q[:, :, rows], u, k[:, :, lo:hi], 0.5, group=dist.group.WORLD, mask=mask,
                              rows=rows, reduction="sum")
        loss.backward()
        want = predictor_loss(one, q[:, :, all_rows], one.project_queries(q[:, :, all_rows], torch.float64), k, 0.5,
                              mask=mask, rows=all_rows, reduction="sum")
        want.backward()
        got = torch.cat([loss.detach().reshape(1), pred.weight_q.grad.flatten(), pred.weight_k.grad.flatten()])
        dist.all_reduce(got)
        ref = torch.cat([want.detach().reshape(1), one.weight_q.grad.flatten(), one.weight_k.grad.flatten()])
        assert (got - ref).abs().max() < 1e-10 * ref.abs().max(), (mask, (got - ref).abs().max())
        moments = score_moments(q[:, :, rows], k[:, :, lo:hi], group=dist.group.WORLD, mask=mask, rows=rows)
        moments = moments.all_reduce(dist.group.WORLD)
        ref_m = score_moments(q[:, :, all_rows], k, mask=mask, rows=all_rows)
        for name, a, w in zip(("c_q", "c_k", "q_energy", "rows", "k_energy", "keys"), moments._fields(), ref_m._fields()):
            assert (a - w).abs().max() <= 1e-10 * w.abs().max(), (mask, name)
        ends = sorted({int(e) for e in (mask.limit(rows) + 1).clamp(max=s)})
        for blocking in (dict(), dict(piece=2, max_elems=300)):  # one block; blocks of 2 runs of 2 tokens
            grams = prefix_grams_by_end([k[:, :, lo:hi]], [(0, 0)], ends, torch.float64, group=dist.group.WORLD,
                                        **blocking)
            for end in ends:
                want = centered_gram(k[:, :, :end], k[:, :, :end], dtype=torch.float64)
                assert (grams[end][0] - want).abs().max() < 1e-9, (mask, end, blocking)
    with pytest.raises(ValueError, match="shard boundary"):
        prefix_centered_grams([k[:, :, lo:hi]], [(0, 0)], [lo + shard + 1 if rank == 0 else 7], torch.float64,
                              group=dist.group.WORLD)


def test_masked_statistics_under_cp_match_single_process():
    from tests.cp.distributed import run_ranks

    assert CP_MASKS[1].chunk_tokens < 32 < CP_MASKS[2].chunk_tokens  # both kinds of shard / chunk relation
    run_ranks(_masked_statistics_cp_rank, 2)


def test_recall_curve_of_shards_with_q_offset_sums_to_the_whole():
    """A sequence shard's rows (shard-local, with the shard's first token as q_offset) against the
    gathered keys give the single-process curve of those rows: the shards' curves sum to it."""
    b, h, s, d, r, g = 1, 2, 64, 8, 4, 8
    q, k = problem(b, h, h, s, d, seed=4)
    q_lr, k_lr = q[..., :r].contiguous(), k[..., :r].contiguous()
    rows = torch.arange(2, s, 5)
    kw = dict(group_size=g, kv_block=4, scale=0.5, critical_mass=0.9)
    for mask in CP_MASKS:
        whole = recall_curve(q, k, q_lr, k_lr, rows, mask=mask, **kw)
        parts = None
        for lo in (0, 32):
            local = rows[(rows >= lo) & (rows < lo + 32)] - lo
            part = recall_curve(q[:, :, lo:lo + 32], k, q_lr[:, :, lo:lo + 32], k_lr, local, mask=mask, q_offset=lo, **kw)
            parts = part if parts is None else parts + part
        for a, w in zip(parts._fields(), whole._fields()):
            torch.testing.assert_close(a, w, rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="query group"):
        recall_curve(q[:, :, 4:36], k, q_lr[:, :, 4:36], k_lr, rows[:2], mask=CP_MASKS[0], q_offset=4, **kw)
    with pytest.raises(ValueError, match="pass mask="):
        recall_curve(q[:, :, :32], k, q_lr[:, :, :32], k_lr, rows[:2], q_offset=32, **kw)


def _predictor_grads(dtype):
    """Predictor gradients (one [W_q, W_k] pair per layer, fp64) of a token-causal block in stage
    1 (gradient fit) at iteration 3, where layer 2 samples row 1 (2 readable keys)."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.layers.state import StepControl
    from megatron_dsv.specs import get_dsv_gpt_layer_spec
    from tests.megatron_shim import tiny_config

    torch.manual_seed(7)
    cfg = tiny_config(dsv_mode="auto", num_query_groups=2, dsv_fixed_sparsity=0.8, dsv_predictor_fit="gradient",
                      dsv_kv_block=1)
    block = TransformerBlock(cfg, get_dsv_gpt_layer_spec(causal=True)).to(dtype)
    layers = dsv_attention_layers(block)
    for layer in layers:
        layer.begin_iteration(StepControl(iteration=3))
    gen = torch.Generator().manual_seed(11)
    x, w = (torch.randn(64, 2, 128, generator=gen).to(dtype) for _ in range(2))
    block.config.experimental_attention_variant_loss_scale_func(torch.tensor(1.0))
    (block(x, attention_mask=None) * w).sum().backward()
    return [[p.grad.double() for p in (a.predictor.weight_q, a.predictor.weight_k)] for a in layers]


def test_rows_without_choice_leave_the_predictor_loss(megatron_state):
    """Token-causal rows whose keys all lie in their group's forced units leave the predictor's
    loss, so its first rows no longer dominate the gradient. Measured here (layer 2 samples row
    1, which reads 2 keys): before, layer 2's largest predictor gradient entry was 33x layer 1's
    (W_q; 29x W_k) and fp32 moved it by 3.2e-4 of that entry against fp64; now 1.18x (1.02x) and
    6.5e-7 (at most, over both layers and weights)."""
    g64, g32 = _predictor_grads(torch.float64), _predictor_grads(torch.float32)
    for w in range(2):
        big = [float(layer[w].abs().max()) for layer in g64]
        assert min(big) > 0 and max(big) / min(big) < 3, big
    for layer64, layer32 in zip(g64, g32):
        for a, b in zip(layer32, layer64):
            err = float((a - b).abs().max() / b.abs().max())
            assert err < 1e-5, err


def test_no_row_with_a_choice_is_refused(megatron_state):
    """16 tokens in one key block of 16: no query group can skip a unit, so no sampled row has a
    choice and the predictor would fit nothing: a clear error, not a NaN loss."""
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_dsv.specs import get_dsv_gpt_layer_spec
    from tests.megatron_shim import tiny_config

    torch.manual_seed(0)
    block = TransformerBlock(tiny_config(dsv_mode="auto", dsv_kv_block=16), get_dsv_gpt_layer_spec(causal=True))
    with pytest.raises(ValueError, match="has a ranking choice under the causal mask.*--dsv-profile-stride"):
        block(torch.randn(16, 2, 128), attention_mask=None)
