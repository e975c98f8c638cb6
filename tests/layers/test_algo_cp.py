"""The closed-form fit and the recall curve over a context-parallel group (2 gloo ranks) equal
the single-process results: sequence chunks (rows and keys split) and head slots (heads split)."""

import torch

from megatron_dsv.layers.predictor import LowRankPredictor
from megatron_dsv.layers.profiler import RecallCurve, recall_curve, sample_rows
from tests.cp.distributed import run_ranks

B, H, S, D, R, G, KVB = 2, 4, 64, 8, 2, 8, 4


def _inputs():
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(B, H, S, D, generator=gen, dtype=torch.float64) * 2 + 0.3
    k = torch.randn(B, H, S, D, generator=gen, dtype=torch.float64) - 0.2
    return q, k


def _single(q, k, rows):
    pred = LowRankPredictor(H, D, R, dtype=torch.float64, seed=1)
    pred.accumulate_moments(q[:, :, rows], k)
    pred.refit()
    curve = recall_curve(q.float(), k.float(), *pred.project(q.float(), k.float()), rows, group_size=G,
                         kv_block=KVB, scale=0.3, critical_mass=0.9)
    return pred, curve


def _ranks(rank, world):
    q, k = _inputs()
    rows = sample_rows(S, 3, 1)
    want, want_curve = _single(q, k, rows)
    # Sequence chunks: each rank holds a contiguous chunk of tokens, its rows and its keys.
    lo, hi = rank * S // world, (rank + 1) * S // world
    mine = rows[(rows >= lo) & (rows < hi)] - lo
    seq = LowRankPredictor(H, D, R, dtype=torch.float64, seed=1)
    seq.accumulate_moments(q[:, :, lo:hi][:, :, mine], k[:, :, lo:hi], group=torch.distributed.group.WORLD)
    seq.refit(group=torch.distributed.group.WORLD)
    torch.testing.assert_close(seq.weight_q, want.weight_q, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(seq.weight_k, want.weight_k, rtol=1e-8, atol=1e-10)
    # Head slots: each rank holds half the heads over the whole sequence.
    heads = list(range(rank * H // world, (rank + 1) * H // world))
    slot = LowRankPredictor(H, D, R, dtype=torch.float64, seed=1)
    slot.accumulate_moments(q[:, heads][:, :, rows], k[:, heads], heads=heads)
    slot.refit(group=torch.distributed.group.WORLD)
    torch.testing.assert_close(slot.weight_q, want.weight_q, rtol=1e-8, atol=1e-10)
    # Recall curve of this rank's rows (keys gathered), summed over the ranks.
    qf, kf = q.float(), k.float()
    q_lr, k_lr = want.project(qf, kf)
    part = recall_curve(qf[:, :, lo:hi], kf, q_lr[:, :, lo:hi], k_lr, mine, group_size=G, kv_block=KVB,
                        scale=0.3, critical_mass=0.9)
    got = part.all_reduce()
    assert isinstance(got, RecallCurve)
    for a, c in zip(got._fields(), want_curve._fields()):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-9)
    assert got.choose("p75").k.tolist() == want_curve.choose("p75").k.tolist()


def test_closed_form_and_recall_curve_over_two_ranks():
    run_ranks(_ranks, 2)
