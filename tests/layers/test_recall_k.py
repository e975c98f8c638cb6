"""K for a target recall: ranked unit mass, per-row needs, quantiles and relative recall."""

import pytest
import torch

import megatron_dsv.layers.profiler as profiler_mod
from megatron_dsv.layers.predictor import LowRankPredictor
from megatron_dsv.layers.profiler import RecallCurve, recall_curve, sample_rows, sampled_attention_stats
from megatron_dsv.ops.selection import select_topk


def hand_built_curve():
    # Dyadic masses, so cumulative sums are exact and the critical mass 0.75 is hit exactly.
    mass = torch.tensor([
        [[0.5, 0.25, 0.125, 0.125], [0.125, 0.125, 0.25, 0.5]],
        [[0.25, 0.25, 0.25, 0.25], [2.0, 0.0, 0.0, 0.0]],  # second row unnormalised: read as fractions
    ]).unsqueeze(0)
    scores = torch.tensor([
        [[4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0]],  # row 1: the predictor ranks its mass last
        [[4.0, 3.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]],
    ]).unsqueeze(0)
    exact = scores.clone()
    exact[0, 0, 1] = torch.tensor([1.0, 2.0, 3.0, 4.0])
    return RecallCurve.from_unit_mass(mass, scores, exact, 0.75)


def test_hand_built_needs_recalls_and_k():
    curve = hand_built_curve()
    # head 0: predictor needs 2 and 4 units, exact 2 and 2; head 1 (predictor == exact): 3 and 4.
    want_count = torch.tensor([[0, 1, 0, 1], [0, 0, 1, 1]], dtype=torch.float64)
    torch.testing.assert_close(curve.need_count, want_count)
    torch.testing.assert_close(curve.need_count_exact, torch.tensor([[0, 2, 0, 0], [0, 0, 1, 1]], dtype=torch.float64))
    torch.testing.assert_close(
        curve.mass_by_rank, torch.tensor([[0.625, 0.375, 0.375, 0.625], [0.25, 0.25, 0.25, 1.25]], dtype=torch.float64)
    )
    assert curve.units_needed("mean").tolist() == [3, 4]  # ceil(3), ceil(3.5)
    assert curve.units_needed("p75").tolist() == [4, 4]
    assert curve.units_needed(0.5).tolist() == [2, 3]
    assert curve.units_needed("mean", exact=True).tolist() == [2, 4]
    choice = curve.choose("mean")
    assert choice.k.tolist() == [3, 4] and choice.k_exact.tolist() == [2, 4]
    torch.testing.assert_close(choice.recall, torch.tensor([0.6875, 1.0]))  # (0.875 + 0.5) / 2
    torch.testing.assert_close(choice.recall_exact, torch.tensor([0.875, 1.0]))
    torch.testing.assert_close(choice.relative_recall, torch.tensor([0.6875 / 0.875, 1.0]))
    torch.testing.assert_close(choice.density(), torch.tensor([0.75, 1.0]))
    torch.testing.assert_close(curve.recall(1), torch.tensor([0.3125, 0.125]))
    torch.testing.assert_close(curve.recall_exact(torch.tensor([1, 2])), torch.tensor([0.5, 0.25]))


def test_curve_sums_and_errors():
    curve = hand_built_curve()
    both = curve + curve.scaled(0.5)
    torch.testing.assert_close(both.need_count, curve.need_count * 1.5)
    assert both.choose("mean").k.tolist() == curve.choose("mean").k.tolist()
    torch.testing.assert_close(both.recall(3), curve.recall(3))
    with pytest.raises(ValueError, match=r"\[1, 4\]"):
        curve.recall(5)
    with pytest.raises(ValueError, match="quantile"):
        curve.units_needed("p90")
    with pytest.raises(ValueError, match="no sampled rows"):
        curve.scaled(0.0).choose()
    with pytest.raises(ValueError, match="combine"):
        curve + RecallCurve.from_unit_mass(*[torch.rand(1, 2, 3, 4)] * 3, 0.5)


def brute_force_needs(q, k, q_lr, k_lr, rows, g, kvb, scale, mass):
    """Per-row units to reach ``mass`` and mass by rank, row by row in fp64 (the definition)."""
    b, h, _, _ = q.shape
    rep = h // k.shape[1]
    k = k.repeat_interleave(rep, 1)
    n_units = k.shape[2] // kvb
    need = {"pred": torch.zeros(h, n_units, dtype=torch.float64), "exact": torch.zeros(h, n_units, dtype=torch.float64)}
    by_rank = {key: torch.zeros(h, n_units, dtype=torch.float64) for key in need}
    for bi in range(b):
        for hi in range(h):
            for row in rows.tolist():
                p = torch.softmax(q[bi, hi, row].double() @ k[bi, hi].double().T * scale, -1)
                unit_mass = p.view(n_units, kvb).sum(-1)
                grp = slice(row // g * g, row // g * g + g)
                for key, (qq, kk) in {"pred": (q_lr, k_lr), "exact": (q, k)}.items():
                    proxy = qq[bi, hi, grp].double().mean(0)
                    score = kk[bi, hi].double().view(n_units, kvb, -1).mean(1) @ proxy
                    ranked = unit_mass[score.argsort(descending=True)]
                    by_rank[key][hi] += ranked
                    acc, n = 0.0, 0
                    while acc < mass and n < n_units:
                        acc += float(ranked[n])
                        n += 1
                    need[key][hi, n - 1] += 1
    return need, by_rank


@pytest.mark.parametrize("h_kv,kvb", [(4, 1), (2, 4), (1, 8)])
def test_recall_curve_equals_row_by_row(h_kv, kvb, monkeypatch):
    monkeypatch.setattr(profiler_mod, "_CHUNK_ELEMS", 1600)  # chunks of 3 rows
    b, h, s, d, r, g = 2, 4, 64, 16, 4, 8
    q, k = torch.randn(b, h, s, d) * 2, torch.randn(b, h_kv, s, d)
    q_lr, k_lr = torch.randn(b, h, s, r), torch.randn(b, h, s, r)
    rows = sample_rows(s, 5, 3)
    curve = recall_curve(q, k, q_lr, k_lr, rows, group_size=g, kv_block=kvb, scale=0.3, critical_mass=0.8)
    need, by_rank = brute_force_needs(q, k, q_lr, k_lr, rows, g, kvb, 0.3, 0.8)
    torch.testing.assert_close(curve.need_count, need["pred"])
    torch.testing.assert_close(curve.need_count_exact, need["exact"])
    torch.testing.assert_close(curve.mass_by_rank, by_rank["pred"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(curve.mass_by_rank_exact, by_rank["exact"], rtol=1e-5, atol=1e-5)
    assert not torch.equal(curve.need_count, curve.need_count_exact)  # a random predictor ranks differently


@pytest.mark.parametrize("kvb", [1, 4])
def test_recall_at_k_equals_selected_mass(kvb):
    """The curve's recall at K is the mass select_topk's index at K keeps (the existing recall)."""
    b, h, s, d, r, g = 2, 3, 64, 16, 8, 8
    q, k = torch.randn(b, h, s, d) * 2, torch.randn(b, h, s, d)
    pred = LowRankPredictor(h, d, r)
    q_lr, k_lr = pred.project(q, k)
    rows = sample_rows(s, 3, 1)
    curve = recall_curve(q, k, q_lr, k_lr, rows, group_size=g, kv_block=kvb, scale=0.25, critical_mass=0.9)
    choice = curve.choose("p75")
    index = select_topk(q_lr, k_lr, g, choice.k, kv_block=kvb, backend="reference")
    stats = sampled_attention_stats(q[:, :, rows], k, 0.25, 0.9, row_groups=rows // g, index=index)
    torch.testing.assert_close(choice.recall, stats["recall"].mean(0), rtol=1e-5, atol=1e-6)
    assert bool((choice.k < s // kvb).all())  # a real choice, not "all units"


def test_relative_recall_is_one_for_exact_predictor():
    b, h, s, d, g, kvb = 1, 2, 64, 8, 8, 4
    q, k = torch.randn(b, h, s, d) * 2, torch.randn(b, h, s, d)
    pred = LowRankPredictor(h, d, d)
    with torch.no_grad():
        pred.weight_q.copy_(torch.eye(d).expand(h, d, d))
        pred.weight_k.copy_(torch.eye(d).expand(h, d, d))
    q_lr, k_lr = pred.project(q, k)
    rows = sample_rows(s, 4, 0)
    curve = recall_curve(q, k, q_lr, k_lr, rows, group_size=g, kv_block=kvb, scale=0.35, critical_mass=0.9)
    choice = curve.choose("mean")
    torch.testing.assert_close(choice.relative_recall, torch.ones(h), rtol=1e-6, atol=0)
    assert choice.k.tolist() == choice.k_exact.tolist()
    assert bool((choice.recall >= 0.9 - 0.1).all()) and bool((choice.k < s // kvb).all())


def test_recall_curve_rejects_bad_input():
    q, k = torch.randn(1, 2, 32, 8), torch.randn(1, 2, 32, 8)
    lr = torch.randn(1, 2, 32, 4)
    rows = torch.arange(0, 32, 4)
    with pytest.raises(ValueError, match="kv_block"):
        recall_curve(q, k, lr, lr, rows, group_size=8, kv_block=5, scale=1.0, critical_mass=0.9)
    with pytest.raises(ValueError, match="rows"):
        recall_curve(q, k, lr, lr, rows + 1000, group_size=8, kv_block=4, scale=1.0, critical_mass=0.9)
    with pytest.raises(ValueError, match="critical_mass"):
        recall_curve(q, k, lr, lr, rows, group_size=8, kv_block=4, scale=1.0, critical_mass=1.5)
    with pytest.raises(ValueError, match="GQA"):
        recall_curve(q, k, lr, lr[:, :1], rows, group_size=8, kv_block=4, scale=1.0, critical_mass=0.9)
