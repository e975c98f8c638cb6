"""CP planner: LPT head balancing, plan choice, re-plan cadence, rank agreement, synced key unions."""

import itertools
import json
import os
import random

import pytest

from megatron_dsv.cp.cost_model import AttentionShape, CostModel, KernelFit, Links
from megatron_dsv.cp.plan import LayerPlan, balance_heads, even_slots, head_unit
from megatron_dsv.cp.planner import (
    ReplanPolicy,
    check_plans_agree,
    compare_plans,
    feasible_head_sizes,
    plan_layer,
    plans_digest,
    synced_union_density,
)
from megatron_dsv.tools.simulate_cp import synthetic_profile
from tests.cp.distributed import run_ranks

TOY = CostModel(
    fits=(KernelFit(64, dense_ms_per_gpair=2.0, dense_fwd_fraction=0.25, sparse_ms_per_mquery=1.0,
                    sparse_ms_per_gpair=3.0, select_ms_per_gpair=0.01),),
    links=Links.assumed(100.0, 10.0, 0.0),
)


@pytest.fixture(scope="module")
def h100():
    return CostModel.from_benchmark()


def makespan(work, slots):
    return max(sum(work[h] for h in s) for s in slots)


def optimum(work, m):
    """Exact minimum makespan over every assignment of heads to ``m`` slots (empty slots allowed):
    exhaustive search with slot-relabelling symmetry removed and branches that cannot beat the
    best found cut."""
    order = sorted(work, reverse=True)
    best = [sum(order)]
    load = [0.0] * m

    def rec(i, used):
        if i == len(order):
            best[0] = min(best[0], max(load))
            return
        for j in range(min(used + 1, m)):
            if load[j] + order[i] >= best[0]:
                continue
            load[j] += order[i]
            rec(i + 1, max(used, j + 1))
            load[j] -= order[i]

    rec(0, 0)
    return best[0]


def test_optimum_matches_plain_enumeration():
    rng = random.Random(1)
    for _ in range(20):
        h, m = rng.randint(2, 6), rng.randint(2, 3)
        work = [rng.uniform(0.01, 1.0) for _ in range(h)]
        brute = min(max(sum(w for w, a in zip(work, asg) if a == j) for j in range(m))
                    for asg in itertools.product(range(m), repeat=h))
        assert optimum(work, m) == pytest.approx(brute)


def test_lpt_within_four_thirds_of_optimum_and_deterministic():
    rng = random.Random(0)
    worst = 1.0
    for _ in range(300):
        h = rng.randint(2, 10)
        m = rng.randint(2, min(4, h))
        kind = rng.random()
        if kind < 0.3:  # heterogeneous: mostly sparse heads, a few dense-ish
            work = [rng.uniform(0.3, 0.5) if rng.random() < 0.2 else rng.uniform(0.01, 0.1) for _ in range(h)]
        elif kind < 0.6:  # ties
            work = [rng.choice([0.05, 0.1, 0.2]) for _ in range(h)]
        else:
            work = [rng.uniform(0.0, 1.0) for _ in range(h)]
        slots = balance_heads(work, m)
        assert slots == balance_heads(list(work), m)
        assert sorted(x for s in slots for x in s) == list(range(h)) and all(slots)
        ratio = makespan(work, slots) / optimum(work, m)
        assert ratio <= 4 / 3 - 1 / (3 * m) + 1e-9, (work, m, slots)
        worst = max(worst, ratio)
    assert worst > 1.0  # the cases do exercise LPT's suboptimality, so the bound is really tested


def test_lpt_keeps_gqa_groups_and_rejects_too_many_slots():
    work = [0.5, 0.4, 0.05, 0.02, 0.3, 0.3, 0.01, 0.01]
    slots = balance_heads(work, 3, unit=2)
    for s in slots:
        assert len(s) % 2 == 0 and all(s[i] // 2 == s[i + 1] // 2 and s[i] % 2 == 0 for i in range(0, len(s), 2))
    with pytest.raises(ValueError, match="head-parallel size <= 4"):
        balance_heads(work, 5, unit=2)
    with pytest.raises(ValueError, match="units of 3"):
        balance_heads(work, 2, unit=3)
    assert even_slots(8, 4) == ((0, 4), (1, 5), (2, 6), (3, 7))


def random_layer(rng):
    kv = rng.choice([1, 2, 4, 8])
    h = kv * rng.choice([1, 2]) if kv < 8 else 8
    d = rng.choice([64, 128])
    n = rng.choice([2, 4, 8, 12, 16])
    gpn = rng.choice([2, 4, 8])
    shape = AttentionShape(n * 64 * rng.choice([16, 64, 256]), h, d, kv, batch=rng.choice([1, 2]))
    density = None if rng.random() < 0.25 else [
        rng.uniform(0.2, 0.5) if rng.random() < 0.2 else rng.uniform(0.01, 0.1) for _ in range(h)]
    return shape, density, n, gpn


def test_plan_layer_is_the_argmin_and_beats_fixed_strategies(h100):
    rng = random.Random(0)
    for _ in range(60):
        shape, density, n, gpn = random_layer(rng)
        costs = {}
        for g in range(1, n + 1):
            unit = shape.q_per_kv if shape.num_kv_heads >= g else 1
            if n % g or g > shape.num_heads // unit:
                continue
            slots = even_slots(shape.num_heads, g, unit) if density is None else balance_heads(density, g, unit)
            costs[g] = h100.plan_cost(shape, LayerPlan(g, n // g, slots), density, gpus_per_node=gpn).total_ms
        assert sorted(costs) == feasible_head_sizes(shape, n)
        plan = plan_layer(h100, shape, density, cp_size=n, gpus_per_node=gpn)
        best = min(costs.values())
        assert plan.predicted_ms == pytest.approx(best, rel=1e-12)
        assert plan.head_size == max(g for g, t in costs.items() if round(t, 9) == round(best, 9))
        assert plan.cp_size == n and plan.num_heads == shape.num_heads
        cmp = compare_plans(h100, shape, density, cp_size=n, gpus_per_node=gpn)
        assert cmp.best.plan == plan
        assert plan.predicted_ms <= min(cmp.pure_head.total_ms, cmp.pure_seq.total_ms)
        assert cmp.pure_seq.plan.head_size == 1 and cmp.pure_head.plan.head_size == max(costs)


def test_ties_prefer_the_larger_head_split():
    # zero bandwidth cost and uniform heads: every split costs the same compute
    free = CostModel(fits=TOY.fits, links=Links.assumed(1e12, 1e12, 0.0))
    plan = plan_layer(free, AttentionShape(4096, 4, 64), [0.1] * 4, cp_size=4, gpus_per_node=4)
    assert plan.head_size == 4


def test_lpt_beats_even_head_count_on_heterogeneous_sparsity(h100):
    shape = AttentionShape(8 * 64 * 128, 8, 128)
    density = [0.4, 0.03, 0.35, 0.03, 0.04, 0.05, 0.03, 0.04]  # even_slots puts heads 0 and 2 together
    cmp = compare_plans(h100, shape, density, cp_size=8, gpus_per_node=8, head_sizes=[2])
    assert cmp.best.plan.slots != cmp.even_count.plan.slots
    assert cmp.best.total_ms < 0.8 * cmp.even_count.total_ms
    assert cmp.best.work_imbalance < cmp.even_count.work_imbalance


def test_infeasible_requests_say_what_to_change(h100):
    shape = AttentionShape(1000, 4, 64)
    with pytest.raises(ValueError, match=r"multiple of cp_size \* granule = 512; pad it to 1024"):
        plan_layer(h100, shape, None, cp_size=8, gpus_per_node=8)
    shape = AttentionShape(4096, 4, 64)
    with pytest.raises(ValueError, match=r"feasible sizes: \[1, 2, 4\]"):
        plan_layer(h100, shape, None, cp_size=8, gpus_per_node=8, head_sizes=[8])
    with pytest.raises(ValueError, match="memory budget"):
        plan_layer(h100, shape, None, cp_size=8, gpus_per_node=8, memory_budget_gib=1e-6)
    with pytest.raises(ValueError, match="density needs 4 values"):
        plan_layer(h100, shape, [0.1] * 3, cp_size=8, gpus_per_node=8)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        AttentionShape(4096, 6, 64, num_kv_heads=4)


def test_gqa_units_and_memory_budget(h100):
    shape = AttentionShape(16 * 64 * 64, 8, 128, num_kv_heads=2)
    assert head_unit(8, 2, 2) == 4 and head_unit(8, 2, 4) == 1
    assert feasible_head_sizes(shape, 16) == [1, 2, 4, 8]
    cmp = compare_plans(h100, shape, [0.05] * 8, cp_size=16, gpus_per_node=8, head_sizes=[2])
    assert sorted(map(len, cmp.best.plan.slots)) == [4, 4]
    assert {h // 4 for h in cmp.best.plan.slots[0]} == {cmp.best.plan.slots[0][0] // 4}
    assert [st.kv_heads for st in cmp.best.slots] == [1, 1]  # a whole group: its key/value head once
    # 4 slots > 2 key/value heads: single query heads, one key/value copy per query head (runtime rule)
    dup = compare_plans(h100, shape, [0.05] * 8, cp_size=16, gpus_per_node=8, head_sizes=[4]).best
    assert [st.kv_heads for st in dup.slots] == [2, 2, 2, 2]
    free = compare_plans(h100, shape, [0.05] * 8, cp_size=16, gpus_per_node=8)
    need = {c.plan.head_size: max(s.kv_bytes for s in c.slots) / 2**30 for c in free.candidates}
    budget = sorted(need.values())[len(need) // 2]
    tight = compare_plans(h100, shape, [0.05] * 8, cp_size=16, gpus_per_node=8, memory_budget_gib=budget)
    assert all(need[c.plan.head_size] <= budget for c in tight.candidates)
    assert len(tight.candidates) < len(free.candidates)


def sparsity_of(dens):
    return [1.0 - x for x in dens]


def test_replan_cadence_and_threshold(h100):
    shape = AttentionShape(8 * 64 * 64, 8, 128)
    pol = ReplanPolicy(h100, [shape, shape], cp_size=8, gpus_per_node=8, head_sizes=[2], threshold=0.02,
                       min_interval=100)
    # multiples of 1/256: 1 - (1 - d) is exact, so the policy sees exactly these densities
    d0 = [x / 256 for x in (100, 8, 90, 9, 11, 13, 7, 12)]
    d1 = [x / 256 for x in (8, 9, 7, 100, 90, 13, 11, 12)]  # the dense-ish heads moved: a different LPT split
    prof0 = [sparsity_of(d0), None]
    assert pol.maybe_replan(0, prof0) == [0, 1]  # first plans
    first = list(pol.plans)
    assert pol.replans == 2 and pol.last_replan == [0, 0]
    # a large move, but within min_interval: nothing
    assert pol.maybe_replan(50, [sparsity_of(d1), None]) == [] and pol.plans == first and pol.replans == 2
    # after the interval, a move below the threshold: nothing
    small = [x + (0.015 if i % 2 else -0.015) for i, x in enumerate(d0)]
    assert pol.maybe_replan(150, [sparsity_of(small), None]) == [] and pol.replans == 2
    # both conditions hold: re-plan (the dense layer 1 never re-plans on sparsity)
    assert pol.maybe_replan(150, [sparsity_of(d1), None]) == [0]
    assert pol.last_replan == [150, 0] and pol.plans[0].key() != first[0].key() and pol.plans[1] == first[1]
    assert pol.plans[0] == plan_layer(h100, shape, d1, cp_size=8, gpus_per_node=8, head_sizes=[2])
    # the interval counts from the last re-plan
    assert pol.maybe_replan(200, [sparsity_of(d0), None]) == []
    assert pol.maybe_replan(250, [sparsity_of(d0), None]) == [0]
    # a re-plan that lands on the same plan is not reported as a change
    assert pol.maybe_replan(400, [sparsity_of([x * 1.5 for x in d0]), None]) == [] and pol.last_replan[0] == 400
    # dense <-> sparse switches re-plan at once
    assert pol.maybe_replan(401, [sparsity_of(d0), sparsity_of(d0)], sparse=[False, True]) == [0, 1]
    state = pol.state_dict()
    other = ReplanPolicy(h100, [shape, shape], cp_size=8, gpus_per_node=8, head_sizes=[2])
    other.load_state_dict(json.loads(json.dumps(state)))
    assert other.plans == pol.plans and other.last_replan == pol.last_replan


def test_digest_is_stable_and_float_free():
    a = LayerPlan(2, 4, ((0, 3), (1, 2)), predicted_ms=1.0)
    b = LayerPlan(2, 4, ((0, 3), (1, 2)), predicted_ms=2.0)
    assert plans_digest([a, None]) == plans_digest([b, None])
    assert plans_digest([a]) != plans_digest([LayerPlan(2, 4, ((0, 1), (2, 3)))])
    # fixed values, computed once: the digest must not depend on the process (no salted hash())
    assert plans_digest([LayerPlan(1, 1, ((0,),))]) == "fac49cdec3a4715e6bb512a052a53a86611c504eae7d2a4bc17ad08b3a5edeab"
    assert plans_digest([b, None]) == "fc36d5a1bfc39c689d638afe8742ceb26bf7dd0525f22879fd5059372947be00"
    assert len(plans_digest([a])) == 64


def _agree_worker(rank, world, out_dir):
    cost = CostModel.from_benchmark()
    shape = AttentionShape(8 * 64 * 64, 8, 128)
    prof = synthetic_profile(4, 8, seed=3)
    pol = ReplanPolicy(cost, [shape] * 4, cp_size=8, gpus_per_node=4, min_interval=10, head_sizes=[2])
    pol.maybe_replan(0, prof)
    same = check_plans_agree(pol.plans)
    # rank 1's statistics were not synchronised: one head's sparsity differs
    bad = [list(p) if p is not None else None for p in prof]
    if rank == 1:
        bad[1][0] = 0.3
    pol.maybe_replan(20, bad)
    try:
        check_plans_agree(pol.plans)
        err = ""
    except RuntimeError as e:
        err = str(e)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"digest": same, "error": err}, f)


def test_plans_agree_across_ranks_gloo(tmp_path):
    run_ranks(_agree_worker, 2, str(tmp_path))
    res = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert res[0]["digest"] == res[1]["digest"]
    for r in res:
        assert "plans differ across ranks" in r["error"] and "ranks [0]" in r["error"] and "ranks [1]" in r["error"]


def _union_worker(rank, world):
    import torch.distributed as dist

    from megatron_dsv.cp.seq_parallel import ExchangeStats

    mine = [0.25, 0.5] if rank == 0 else [0.75, 0.125]  # multiples of 1/8: exact in float32 and 64
    got = synced_union_density(ExchangeStats(10, 20, remote_union_density=mine), None)
    assert got == [0.75, 0.5]  # per key/value head maximum, on every rank
    assert synced_union_density(mine, None) == got
    everyone = [None] * world
    dist.all_gather_object(everyone, got)
    assert everyone[0] == everyone[1]
    with pytest.raises(ValueError, match="in \\[0, 1\\] per key/value head"):
        synced_union_density([1.5, 0.5], None)
    try:
        synced_union_density([0.5] * (2 + rank), None)
    except ValueError as e:
        assert "ranks hold 2 to 3 key/value heads" in str(e)
    else:
        raise AssertionError("different head counts across ranks were accepted")


def test_synced_union_density_agrees_across_ranks():
    run_ranks(_union_worker, 2)


def test_pair_fractions_of_masked_shards():
    from megatron_dsv.ops.mask import CausalMask

    s, n = 4096, 4
    assert AttentionShape(s, 8, 64).pair_fractions(n) == (1.0,) * n
    causal = AttentionShape(s, 8, 64, mask=CausalMask("causal")).pair_fractions(n)
    share = [f / sum(causal) for f in causal]  # of the allowed pairs: about (2r + 1) / N^2
    assert share == pytest.approx([(2 * r + 1) / n**2 for r in range(n)], abs=1e-3)
    assert causal[-1] == pytest.approx((2 * n - 1) / (2 * n), abs=1e-3)
    # chunk-causal, chunks of one shard: shard r reads r + 1 whole shards
    by_shard = AttentionShape(s, 8, 64, mask=CausalMask("chunk_causal", s // n)).pair_fractions(n)
    assert by_shard == tuple((r + 1) / n for r in range(n))
    # a chunk of two shards: both read up to the chunk's end
    spanning = AttentionShape(s, 8, 64, mask=CausalMask("chunk_causal", 2 * s // n)).pair_fractions(n)
    assert spanning == (0.5, 0.5, 1.0, 1.0)
    with pytest.raises(ValueError, match="do not divide"):
        AttentionShape(s, 8, 64).pair_fractions(3)


@pytest.mark.parametrize("density", [None, 0.2])
def test_masked_plan_cost_is_the_most_loaded_shards_work(density):
    """A slot's attention time under a causal mask is its unmasked time at the last shard's
    share of allowed pairs (sequence split), or at the whole sequence's (head split)."""
    from megatron_dsv.ops.mask import CausalMask

    s, h, cp = 4096, 8, 4
    dens = None if density is None else [density] * h
    plain, masked = AttentionShape(s, h, 64), AttentionShape(s, h, 64, mask=CausalMask("causal"))
    fit = TOY.fit_for(64)
    for g_h in (1, cp):
        g_s = cp // g_h
        plan = LayerPlan(g_h, g_s, even_slots(h, g_h, 1))
        got = TOY.plan_cost(masked, plan, dens, gpus_per_node=cp).slots
        want = TOY.plan_cost(plain, plan, dens, gpus_per_node=cp).slots
        load = max(masked.pair_fractions(g_s))
        assert load == pytest.approx((2 * g_s - 1) / (2 * g_s) if g_s > 1 else 0.5, abs=1e-3)
        sq = s / g_s
        for a, b in zip(got, want):
            if density is None:
                assert a.compute_ms == pytest.approx(b.compute_ms * load, rel=1e-12)
            else:
                per_head = fit.sparse_ms(sq, s, density * load) + fit.select_ms(sq, s)
                assert a.compute_ms == pytest.approx(len(a.heads) * per_head, rel=1e-12)
                assert a.compute_ms < b.compute_ms
            assert a.work == pytest.approx(b.work * load, rel=1e-12)


def test_causal_mask_changes_the_plan(h100):
    """65k tokens, 8 heads, 8 GPUs of one node, dense: the sequence split wins bidirectional;
    causal, its last shard does 15/16 of the unmasked work while a head split does 1/2."""
    from megatron_dsv.ops.mask import CausalMask

    plain = compare_plans(h100, AttentionShape(65536, 8, 128), None, cp_size=8, gpus_per_node=8)
    causal = compare_plans(h100, AttentionShape(65536, 8, 128, mask=CausalMask("causal")), None, cp_size=8,
                           gpus_per_node=8)
    assert plain.best.plan.head_size == 1 and causal.best.plan.head_size == 8
    assert causal.best.total_ms < plain.best.total_ms


def test_chunk_causal_splits_that_cut_chunks_are_infeasible():
    from megatron_dsv.ops.mask import CausalMask

    shape = AttentionShape(4096, 8, 64, mask=CausalMask("chunk_causal", 768))  # no shard of 4096 / 2^k fits
    assert feasible_head_sizes(shape, 8) == [8]  # the head split alone keeps the whole sequence
    assert feasible_head_sizes(AttentionShape(4096, 8, 64, mask=CausalMask("chunk_causal", 1024)), 8) == [1, 2, 4, 8]
    with pytest.raises(ValueError, match="chunks whole"):
        compare_plans(TOY, shape, None, cp_size=8, gpus_per_node=8, head_sizes=[1, 2])
