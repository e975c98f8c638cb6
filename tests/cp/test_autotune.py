"""The CP autotuner: candidates from the planner, measured on the real path, the slowest rank's
time, a cache per signature, and the runtime's ``--dsv-cp-autotune`` (gloo, 2 ranks).

Injected timers give each plan a chosen time (after running its step once, so the synthetic
path runs too); one test times the real path end to end.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from megatron_dsv.cp.autotune import candidates
from megatron_dsv.cp.cost_model import AttentionShape, CostModel
from megatron_dsv.cp.planner import compare_plans
from megatron_dsv.ops.mask import CausalMask
from tests.cp.distributed import run_ranks

# 4 heads of 16, 2 key/value heads, 64 tokens over 2 ranks, 8-token query groups, 4-token key blocks
SHAPE = AttentionShape(64, 4, 16, 2, batch=2, bytes_per_elem=4, predictor_rank=4)
GROUP, BLOCK = 8, 4
KV = [2, 12, 3, 2]  # key units per head (of 16): one heavy head, like the heterogeneous profile


def _comparison(cp_size=2, margin_shape=SHAPE):
    density = [k / (margin_shape.seq_len // BLOCK) for k in KV]
    return compare_plans(CostModel.from_benchmark(), margin_shape, density, cp_size=cp_size, gpus_per_node=8,
                         granule=GROUP)


def test_candidates_within_margin_plus_pure_splits():
    cmp = compare_plans(CostModel.from_benchmark(), AttentionShape(65536, 16, 128), [0.05] * 16, cp_size=8,
                        gpus_per_node=8)
    best = cmp.best.total_ms
    sizes = {c.plan.head_size: c.total_ms for c in cmp.candidates}
    for margin in (0.0, 0.25, 10.0):
        got = [c.plan.head_size for c in candidates(cmp, margin)]
        want = sorted({g for g, t in sizes.items() if t <= best * (1 + margin)} | {1, 8})
        assert got == want, (margin, got, sizes)
    assert [c.plan.head_size for c in candidates(cmp, 10.0)] == [1, 2, 4, 8]
    assert len(candidates(cmp, 0.0)) < 4, "every split within 0% of the best: the margin test checks nothing"
    with pytest.raises(ValueError, match="margin must be a finite number >= 0"):
        candidates(cmp, -0.1)


def _fake(times, calls):
    """A timer giving plan ``head_size -> ms``; runs the step once (the synthetic path must work)."""

    def timer(plan, step):
        step()
        calls.append(plan.head_size)
        return times[plan.head_size]

    return timer


def _gather(obj, world):
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _kw(**over):
    kw = dict(dtype=torch.float32, device="cpu", group_size=GROUP, kv_block=BLOCK, backend="reference")
    kw.update(over)
    return kw


def _injected_rank(rank, world):
    import torch.distributed as dist

    from megatron_dsv.cp.autotune import Autotuner, autotune_layer
    from megatron_dsv.cp.groups import build_cp_groups

    groups = build_cp_groups(dist.group.WORLD)
    cmp = _comparison()
    model, other = cmp.best.plan.head_size, ({1, 2} - {cmp.best.plan.head_size}).pop()

    # the measured-fastest wins although the model ranks it second
    calls = []
    res = autotune_layer(groups, SHAPE, KV, cmp, timer=_fake({model: 10.0, other: 4.0}, calls), **_kw())
    assert res.best.head_size == other and res.model_best.head_size == model
    assert sorted(calls) == [1, 2]
    assert {c.plan.head_size: c.measured_ms for c in res.table} == {model: 10.0, other: 4.0}
    assert {c.plan.head_size: c.predicted_ms for c in res.table} == {c.plan.head_size: c.total_ms
                                                                      for c in cmp.candidates}
    assert res.best.key() == next(c.plan for c in cmp.candidates if c.plan.head_size == other).key()
    assert "the cost model preferred" in res.describe()

    # one rank's timer differs: the slowest rank's time decides, identically on both ranks
    mine = {1: 5.0, 2: 8.0} if rank == 0 else {1: 9.0, 2: 6.0}  # rank 0 alone would pick 1x2
    res = autotune_layer(groups, SHAPE, KV, cmp, timer=_fake(mine, []), **_kw())
    assert {c.plan.head_size: c.measured_ms for c in res.table} == {1: 9.0, 2: 8.0}
    assert res.best.head_size == 2
    assert len(set(_gather(repr(res.to_dict()), world))) == 1

    # a tie goes to the larger head split
    res = autotune_layer(groups, SHAPE, KV, cmp, timer=_fake({1: 3.0, 2: 3.0}, []), **_kw())
    assert res.best.head_size == 2

    # the cache: a repeated signature (K rounded to the K multiple) is not measured again
    calls, lines = [], []
    tuner = Autotuner(k_multiple=2, timer=_fake({model: 10.0, other: 4.0}, calls), log=lines.append, **_kw())
    first = tuner.choose(groups, SHAPE, KV, cmp, what="layer 1")
    again = tuner.choose(groups, SHAPE, [k + (k % 2) for k in KV], cmp, what="layer 2")  # rounds alike
    assert again is first and tuner.hits == 1 and tuner.misses == 1 and len(calls) == 2
    assert len(lines) == 1 and lines[0].startswith("DSV CP autotune layer 1 (S=64, batch 2, K/head [2, 12, 4, 2])")
    assert f"{other}x{2 // other} measured 4.000 ms" in lines[0], lines[0]
    tuner.choose(groups, SHAPE, [k + 2 for k in KV], cmp)  # another K: measured
    assert tuner.misses == 2 and len(calls) == 4 and len(lines) == 2

    # bad inputs are refused before anything is timed
    with pytest.raises(ValueError, match="K per query head: 4 values in \\[1, 16\\]"):
        autotune_layer(groups, SHAPE, [0, 1, 1, 1], cmp, timer=_fake({1: 1.0, 2: 1.0}, calls), **_kw())
    with pytest.raises(ValueError, match="whole query groups"):
        autotune_layer(groups, AttentionShape(40, 4, 16, 2), KV, cmp, timer=_fake({1: 1.0, 2: 1.0}, calls), **_kw())
    bad = {1: math.nan, 2: 1.0} if rank == 0 else {1: 1.0, 2: 1.0}  # one rank: both must raise, none hang
    with pytest.raises(RuntimeError, match="non-finite or negative time on some CP rank"):
        autotune_layer(groups, SHAPE, KV, cmp, timer=_fake(bad, []), **_kw())
    assert len(calls) == 4


def test_autotune_picks_measured_best_agrees_and_caches():
    run_ranks(_injected_rank, 2)


def _real_rank(rank, world):
    import torch.distributed as dist

    from megatron_dsv.cp.autotune import autotune_layer
    from megatron_dsv.cp.groups import build_cp_groups

    groups = build_cp_groups(dist.group.WORLD)
    for kv in (KV, None):  # sparse (selection + selective exchange / local) and dense (ring / SDPA)
        density = None if kv is None else [k / (SHAPE.seq_len // BLOCK) for k in kv]
        cmp = compare_plans(CostModel.from_benchmark(), SHAPE, density, cp_size=2, gpus_per_node=8, granule=GROUP)
        res = autotune_layer(groups, SHAPE, kv, cmp, warmup=1, reps=2, **_kw())
        ms = [c.measured_ms for c in res.table]
        assert [c.plan.head_size for c in res.table] == [1, 2]
        assert all(math.isfinite(x) and x > 0 for x in ms), ms
        assert res.best.key() == min(res.table, key=lambda c: (c.measured_ms, -c.plan.head_size)).plan.key()
        assert len(set(_gather(repr(res.to_dict()), world))) == 1


def test_autotune_times_the_real_path():
    run_ranks(_real_rank, 2)


MASKS = (CausalMask("causal"), CausalMask("chunk_causal", 16))  # 32-token shards hold 2 chunks of 16


def _masked_reference(step, rank, world):
    """The single-process masked dense attention of the gathered synthetic inputs, this rank's
    token shard ``[s_local, b, H, D]``."""
    import torch.distributed as dist

    full = []
    for t in step.inputs[:3]:
        parts = [torch.empty_like(t) for _ in range(world)]
        dist.all_gather(parts, t.detach().contiguous())
        full.append(torch.cat(parts).permute(1, 2, 0, 3))
    q, k, v = full
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=step.mask.dense(q.shape[2]), scale=step.scale,
                                         enable_gqa=True)
    s_local = step.inputs[0].shape[0]
    return out.permute(2, 0, 1, 3)[rank * s_local:(rank + 1) * s_local]


def _masked_rank(rank, world):
    import torch.distributed as dist

    from megatron_dsv.cp.autotune import Autotuner, autotune_layer
    from megatron_dsv.cp.groups import build_cp_groups

    groups = build_cp_groups(dist.group.WORLD)
    s_local = SHAPE.seq_len // world
    for mask in MASKS:
        shape = dataclasses.replace(SHAPE, mask=mask)
        for kv in (KV, None):
            density = None if kv is None else [k / (SHAPE.seq_len // BLOCK) for k in kv]
            cmp = compare_plans(CostModel.from_benchmark(), shape, density, cp_size=2, gpus_per_node=8, granule=GROUP)
            seen = []

            def timer(plan, step):
                step()
                assert step.mask == mask
                if kv is None:  # the dense step is the masked one: ring (1x2) or local SDPA (2x1)
                    assert step.index is None
                    want = _masked_reference(step, rank, world)
                    assert (step.out - want).abs().max() < 1e-5 * want.abs().max(), (mask, plan.head_size)
                    seen.append(plan.head_size)
                else:  # masked selection of this rank's chunk at its place in the sequence
                    idx = step.index
                    seen.append((plan.head_size, idx.mask, idx.q_offset, idx.seq_len_q, idx.seq_len_kv))
                return 1.0

            autotune_layer(groups, shape, kv, cmp, timer=timer, **_kw())
            if kv is None:
                assert seen == [1, 2], seen
            else:
                assert seen == [(1, mask, rank * s_local, s_local, SHAPE.seq_len),
                                (2, mask, 0, SHAPE.seq_len, SHAPE.seq_len)], seen

        # the mask is part of the cache signature: a masked and an unmasked layer alike measure apart
        calls = []
        tuner = Autotuner(timer=_fake({1: 2.0, 2: 1.0}, calls), **_kw())
        tuner.choose(groups, SHAPE, KV, _comparison())
        tuner.choose(groups, shape, KV, _comparison(margin_shape=shape))
        tuner.choose(groups, shape, KV, _comparison(margin_shape=shape))
        assert (tuner.misses, tuner.hits, len(calls)) == (2, 1, 4)

        # K below the mask's forced units (2 per group here) is refused before anything is timed
        with pytest.raises(ValueError, match="K per head = 1 is too small"):
            autotune_layer(groups, shape, [1, 12, 3, 2], _comparison(margin_shape=shape), timer=_fake({}, []), **_kw())

    # shards that cut the chunks (32-token shards, chunks of 24 tokens) are not timed; a
    # comparison made without the mask offers 1x2 all the same
    cut = dataclasses.replace(SHAPE, mask=CausalMask("chunk_causal", 24))
    calls = []
    res = autotune_layer(groups, cut, KV, _comparison(), timer=_fake({1: 1.0, 2: 5.0}, calls), **_kw())
    assert calls == [2] and [c.plan.head_size for c in res.table] == [2] and res.best.head_size == 2
    seq_only = compare_plans(CostModel.from_benchmark(), SHAPE, None, cp_size=2, gpus_per_node=8, granule=GROUP,
                             head_sizes=[1])
    with pytest.raises(ValueError, match="cut the chunk_causal mask's chunks of 24 tokens"):
        autotune_layer(groups, cut, None, seq_only, timer=_fake({1: 1.0}, calls), **_kw())
    assert calls == [2]

    # a real timing of the masked path (token-causal): finite times, agreed by both ranks
    shape = dataclasses.replace(SHAPE, mask=MASKS[0])
    for kv in (KV, None):
        density = None if kv is None else [k / (SHAPE.seq_len // BLOCK) for k in kv]
        cmp = compare_plans(CostModel.from_benchmark(), shape, density, cp_size=2, gpus_per_node=8, granule=GROUP)
        res = autotune_layer(groups, shape, kv, cmp, warmup=1, reps=2, **_kw())
        assert [c.plan.head_size for c in res.table] == [1, 2]
        assert all(math.isfinite(c.measured_ms) and c.measured_ms > 0 for c in res.table), res.table
        assert len(set(_gather(repr(res.to_dict()), world))) == 1


def test_autotune_times_the_masked_path():
    """Under the layer's causal mask the timed step is the masked one (masked selection at the
    shard's q_offset, the masked ring / local dense), the mask is in the cache signature, K below
    the forced units is refused, and splits whose shards cut chunks are skipped."""
    run_ranks(_masked_rank, 2)


S, BATCH, HIDDEN = 64, 2, 128


def _runtime_rank(rank, world):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_dsv.cp.autotune import Autotuner
    from megatron_dsv.cp.planner import check_plans_agree
    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.layers.context_parallel import apply_dsv_context_parallel
    from megatron_dsv.runtime.controller import DSVController
    from megatron_dsv.specs import dsv_gpt_layer_spec, get_dsv_gpt_layer_spec
    from tests.megatron_shim import init_megatron_state, tiny_config

    init_megatron_state(cp=world, rank=rank, world_size=world, seed=7)
    stats_group = ps.get_data_parallel_group(with_context_parallel=True)

    def run(autotune, timer=None, spec=dsv_gpt_layer_spec):
        torch.manual_seed(7)
        cfg = tiny_config(context_parallel_size=world, dsv_mode="sparse", dsv_cp_split="auto", num_query_groups=2,
                          dsv_cp_autotune=autotune, dsv_cp_replan_interval=1)
        block = TransformerBlock(cfg, spec)
        apply_dsv_context_parallel(block)
        lines = []
        ctl = DSVController(block, stats_group=stats_group, log=lines.append)
        if timer is not None:
            real = ctl._cp_autotuner

            def with_timer(layer):
                tuner = real(layer)
                return Autotuner(timer=timer, log=tuner.log, k_multiple=tuner.k_multiple,
                                 **{k: v for k, v in tuner.kw.items() if k != "timer"})

            ctl._cp_autotuner = with_timer

        def step(it):
            x = torch.randn(S // world, BATCH, HIDDEN, generator=torch.Generator().manual_seed(100 * it + rank))
            ctl.on_iteration_start(it)
            block(x, attention_mask=None).sum().backward()
            return ctl.on_iteration_end(it)

        return ctl, block, lines, step

    # off: today's behaviour, the cost model's choice, nothing timed
    ctl, block, lines, step = run("off")
    step(0)
    off = [l.cp_plan for l in dsv_attention_layers(block)]
    assert ctl.cp_autotuner is None and ctl.cp_policy.choose is None
    assert not any(m.startswith("DSV CP autotune") for m in lines)
    model = off[0].head_size
    other = ({1, 2} - {model}).pop()

    # on: the measured-fastest split (the model's second) is taken by every layer; one signature, measured once
    calls = []
    ctl, block, lines, step = run("on", _fake({model: 10.0, other: 2.0}, calls))
    summary = step(0)
    plans = [l.cp_plan for l in dsv_attention_layers(block)]
    assert all(p.head_size == other for p in plans), (plans, off)
    assert plans == ctl.cp_policy.plans
    check_plans_agree(plans, group=ps.get_context_parallel_group())
    assert len(set(_gather(repr([p.key() for p in plans]), world))) == 1
    tuned = [m for m in lines if m.startswith("DSV CP autotune")]
    assert len(tuned) == 1 and "the cost model preferred" in tuned[0], lines
    assert sorted(calls) == [1, 2] and (ctl.cp_autotuner.misses, ctl.cp_autotuner.hits) == (1, 1), calls
    assert any(f"CP plan {other}x{2 // other}" in m and "measured 2.00 ms" in m for m in lines), lines
    entry = summary["layers"][0]["cp_autotune"]
    assert entry["best"] == f"{other}x{2 // other}" and entry["model_best"] == f"{model}x{2 // model}"
    # a later re-plan of the same signature (the density it was planned at moved, K did not) reuses it
    n_plans = ctl.cp_policy.replans
    ctl.cp_policy.planned_density = [tuple(0.0 for _ in d) for d in ctl.cp_policy.planned_density]
    step(1)
    assert ctl.cp_policy.replans == n_plans + 2, "nothing re-planned: the cache is not exercised"
    assert sorted(calls) == [1, 2] and (ctl.cp_autotuner.misses, ctl.cp_autotuner.hits) == (1, 3), calls
    assert len([m for m in lines if m.startswith("DSV CP autotune")]) == 1

    # a token-causal model: the runtime hands the layer's mask to the autotuner, whose steps run masked
    masks = []

    def masked_timer(plan, step):
        step()
        masks.append((plan.head_size, step.index.mask, step.index.q_offset))
        return {model: 10.0, other: 2.0}[plan.head_size]

    ctl, block, lines, step = run("on", masked_timer, get_dsv_gpt_layer_spec(causal=True))
    step(0)
    causal = CausalMask("causal")
    assert sorted(masks) == [(1, causal, rank * S // world), (2, causal, 0)], masks
    assert all(l.cp_plan.head_size == other for l in dsv_attention_layers(block))
    dist.barrier()


def test_runtime_autotune_on_and_off():
    run_ranks(_runtime_rank, 2)
