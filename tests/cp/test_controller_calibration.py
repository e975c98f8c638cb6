"""The controller's CP planner on calibrated links and the measured key union (gloo, 2 ranks).

A megatron-core TransformerBlock with CP = 2, ``--dsv-cp-split auto`` and ``dsv_mode="sparse"``:
the first plan measures the links of the real CP group once (logged with positive bandwidths),
plans agree across ranks, a calibration file given by ``--dsv-cp-calibration`` replaces the
measurement, and the key union handed to the planner is the per-head maximum over the CP group
of what each rank's selective exchange fetched. ``synced_union_densities`` is checked on hybrid
head slots; ``ReplanPolicy.due`` without processes.
"""

from __future__ import annotations

import math
import re

import pytest
import torch

from megatron_dsv.cp.cost_model import AttentionShape, CostModel
from megatron_dsv.cp.planner import ReplanPolicy
from tests.cp.distributed import run_ranks

S, BATCH, HIDDEN = 64, 2, 128
GBPS = re.compile(r"(intra_a2a|intra_p2p) ([0-9.eE+-]+) GB/s \+ ([0-9.eE+-]+) ms")


def _block(world, **overrides):
    from megatron.core.transformer.transformer_block import TransformerBlock

    from megatron_dsv.layers.context_parallel import apply_dsv_context_parallel
    from megatron_dsv.specs import dsv_gpt_layer_spec
    from tests.megatron_shim import tiny_config

    torch.manual_seed(7)
    # the cost model's own choice (timing on this CPU would pick by noise; tests/cp/test_autotune.py covers it)
    overrides.setdefault("dsv_cp_autotune", "off")
    cfg = tiny_config(context_parallel_size=world, dsv_mode="sparse", dsv_cp_split="auto", num_query_groups=2,
                      **overrides)
    block = TransformerBlock(cfg, dsv_gpt_layer_spec)
    apply_dsv_context_parallel(block)
    return block


def _controller(block, log):
    from megatron.core import parallel_state as ps

    from megatron_dsv.runtime.controller import DSVController

    return DSVController(block, stats_group=ps.get_data_parallel_group(with_context_parallel=True), log=log)


def _step(ctl, block, it, rank, world):
    x = torch.randn(S // world, BATCH, HIDDEN, generator=torch.Generator().manual_seed(100 * it + rank))
    ctl.on_iteration_start(it)
    block(x, attention_mask=None).sum().backward()


def _gather(obj, world):
    import torch.distributed as dist

    out = [None] * world
    dist.all_gather_object(out, obj)
    return out


def _rank(rank, world, cal_path):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    import megatron_dsv.cp.calibration as calibration
    from megatron_dsv.cp.cost_model import Calibration, Link
    from megatron_dsv.cp.plan import LayerPlan
    from megatron_dsv.cp.planner import check_plans_agree
    from megatron_dsv.layers.attention import dsv_attention_layers
    from tests.megatron_shim import init_megatron_state

    init_megatron_state(cp=world, rank=rank, world_size=world, seed=7)
    cp_group = ps.get_context_parallel_group()
    measured, passed = [], []
    real_measure, real_replan = calibration.measure_links, ReplanPolicy.maybe_replan

    def measure_spy(*args, **kwargs):
        measured.append(kwargs["message_bytes"])
        return real_measure(*args, **kwargs)

    def replan_spy(self, iteration, sparsity, sparse=None, union_density=None):
        passed.append(union_density)
        return real_replan(self, iteration, sparsity, sparse=sparse, union_density=union_density)

    calibration.measure_links, ReplanPolicy.maybe_replan = measure_spy, replan_spy
    try:
        # measured at the first plan, on the CP group, once
        block = _block(world)
        layers = dsv_attention_layers(block)
        for l in layers:  # start sequence-parallel, so the first forward runs the selective exchange
            l.apply(l.state.replace(cp_plan=LayerPlan(1, world, (tuple(range(l.num_heads)),))))
        lines = []
        ctl = _controller(block, lines.append)
        _step(ctl, block, 0, rank, world)
        local = [l.cp_exchange for l in layers]
        for ex in local:  # the remote union is what was fetched: bytes = sum_h u_h x remote K/V bytes per head
            assert ex.kv_heads == (0, 1) and len(ex.remote_union_density) == 2
            assert ex.fetched_bytes == pytest.approx(sum(ex.remote_union_density) * ex.allgather_bytes / 2, rel=1e-9)
        summary = ctl.on_iteration_end(0)
        # the summary (stats log) carries each layer's exchange bytes, summed over the CP group
        fetched = _gather([(ex.fetched_bytes, ex.allgather_bytes) for ex in local], world)
        for i, entry in enumerate(summary["layers"]):
            want_f, want_a = (sum(r[i][j] for r in fetched) for j in (0, 1))
            assert entry["cp_exchange"] == {"fetched_bytes": want_f, "allgather_bytes": want_a,
                                            "ratio": pytest.approx(want_f / want_a), "ranks": world}, entry
            assert entry["cp_plan"] == f"1x{world}"
        assert 0 < want_f < want_a and fetched[0] != fetched[1]
        assert any(" | CP exchange " in m and "of an all-gather of K/V" in m for m in lines), lines
        for it in (1, 2):
            _step(ctl, block, it, rank, world)
            ctl.on_iteration_end(it)
        cal_lines = [m for m in lines if m.startswith("DSV CP calibration")]
        assert len(cal_lines) == 1 and len(measured) == 1, (cal_lines, measured)
        assert "measured on the CP group (2 ranks, 1 node(s), gloo, cpu" in cal_lines[0], cal_lines[0]
        assert "inter_a2a unused" in cal_lines[0] and "inter_p2p unused" in cal_lines[0], cal_lines[0]
        links = {k: (float(g), float(t)) for k, g, t in GBPS.findall(cal_lines[0])}
        assert sorted(links) == ["intra_a2a", "intra_p2p"], cal_lines[0]
        assert all(math.isfinite(g) and g > 0 and math.isfinite(t) and t >= 0 for g, t in links.values()), links
        cost_links = ctl.cp_policy.cost.links
        assert cost_links.measured == ("intra_a2a", "intra_p2p")
        assert cost_links.intra_a2a.gbps == pytest.approx(links["intra_a2a"][0], rel=1e-3)
        # the sizes measured are the layer's messages (fp32 activations here)
        from megatron_dsv.cp.calibration import layer_message_bytes

        shape = AttentionShape(S, 4, 32, 2, batch=BATCH, bytes_per_elem=4)
        assert measured[0] == layer_message_bytes(shape, world)
        # the union passed at the first plan is every rank's fetched union, per head maximum over the CP group
        mine = [ex.remote_union_density for ex in local]
        everyone = _gather(mine, world)
        want = [[max(r[i][h] for r in everyone) for h in range(2)] for i in range(len(layers))]
        assert passed[0] == want, (passed[0], want)
        assert _gather(passed[0], world)[0] == _gather(passed[0], world)[1]
        assert any(m != w for r in everyone for m, w in zip(r, want)), "ranks fetched equal unions: nothing synced"
        assert passed[1:] == [None, None]  # nothing due after the first plan: no union gathered
        # plans agree across ranks and are the layers' plans
        plans = [l.cp_plan for l in layers]
        assert plans == ctl.cp_policy.plans and all(p is not None and math.isfinite(p.predicted_ms) for p in plans)
        check_plans_agree(plans, group=cp_group)
        assert len(set(_gather(repr([p.key() for p in plans]), world))) == 1

        # a calibration file replaces the measurement
        if rank == 0:
            Calibration(links={"intra_a2a": Link(77.0, 0.02, True), "intra_p2p": Link(55.0, 0.03, True)},
                        env={"world_size": 2, "nodes": 1, "backend": "nccl", "device": "file"}).save(cal_path)
        dist.barrier()
        block = _block(world, dsv_cp_calibration=cal_path)
        lines = []
        ctl = _controller(block, lines.append)
        _step(ctl, block, 0, rank, world)
        ctl.on_iteration_end(0)
        assert len(measured) == 1, "the links were measured although --dsv-cp-calibration names a file"
        cal_lines = [m for m in lines if m.startswith("DSV CP calibration")]
        assert len(cal_lines) == 1 and f"from {cal_path}" in cal_lines[0], cal_lines
        assert "intra_a2a 77 GB/s + 0.02 ms" in cal_lines[0] and "intra_p2p 55 GB/s + 0.03 ms" in cal_lines[0]
        assert ctl.cp_policy.cost.links.intra_a2a.gbps == 77.0 and ctl.cp_policy.cost.links.intra_p2p.gbps == 55.0
        check_plans_agree([l.cp_plan for l in dsv_attention_layers(block)], group=cp_group)

        # bad inputs: a missing file, a node layout the planner would misplace
        block = _block(world, dsv_cp_calibration=cal_path + ".missing")
        ctl = _controller(block, lambda m: None)
        _step(ctl, block, 0, rank, world)
        with pytest.raises(ValueError, match="--dsv-cp-calibration .*calibrate_cp"):
            ctl.on_iteration_end(0)
        block = _block(world, dsv_cp_gpus_per_node=1)
        ctl = _controller(block, lambda m: None)
        _step(ctl, block, 0, rank, world)
        with pytest.raises(ValueError, match="set --dsv-cp-gpus-per-node 2"):
            ctl.on_iteration_end(0)
    finally:
        calibration.measure_links, ReplanPolicy.maybe_replan = real_measure, real_replan


def test_controller_plans_on_measured_links_and_union(tmp_path):
    run_ranks(_rank, 2, str(tmp_path / "cal.json"))


def _union_rank(rank, world):
    import torch.distributed as dist

    from megatron_dsv.cp.planner import synced_union_densities
    from megatron_dsv.cp.seq_parallel import ExchangeStats

    # layer 0: a 2x1 hybrid split of 4 key/value heads (each rank's slot holds two of them);
    # layer 1: GQA group split over slots (key/value head 0 on both ranks); layer 2: one rank has no exchange
    ex0 = ExchangeStats(remote_union_density=[0.25, 0.5] if rank == 0 else [0.125, 0.75],
                        kv_heads=(0, 1) if rank == 0 else (2, 3))
    ex1 = ExchangeStats(remote_union_density=[0.375, 0.5] if rank == 0 else [0.625, 0.25],
                        kv_heads=(0, 0) if rank == 0 else (0, 1))
    ex2 = ExchangeStats(remote_union_density=[0.5]) if rank == 0 else None
    got = synced_union_densities([ex0, ex1, ex2, None], [4, 2, 1, 3], None)
    assert got == [[0.25, 0.5, 0.125, 0.75], [0.625, 0.25], None, None], got
    everyone = [None] * world
    dist.all_gather_object(everyone, got)
    assert everyone[0] == everyone[1]
    # heads no rank covered: the layer is left to the cost model's assumption
    assert synced_union_densities([ExchangeStats(remote_union_density=[0.5], kv_heads=(0,))], [2], None) == [None]
    with pytest.raises(ValueError, match="kv_heads name the layer's key/value heads"):
        synced_union_densities([ExchangeStats(remote_union_density=[0.5], kv_heads=(3,))], [2], None)


def test_synced_union_densities_places_heads_and_agrees():
    run_ranks(_union_rank, 2)


def test_due_is_what_maybe_replan_plans():
    shape = AttentionShape(4096, 4, 64)
    pol = ReplanPolicy(CostModel.from_benchmark(), [shape, shape], cp_size=2, gpus_per_node=8, threshold=0.05,
                       min_interval=10)
    sp = [[0.9] * 4, None]
    assert pol.due(0, sp) == [0, 1]
    pol.maybe_replan(0, sp)
    assert pol.due(5, [[0.8] * 4, None]) == []  # moved, but within the interval
    assert pol.due(10, [[0.88] * 4, None]) == []  # past the interval, moved less than the threshold
    assert pol.due(10, [[0.8] * 4, None]) == [0]
    assert pol.due(1, sp, sparse=[False, False]) == [0]  # a sparse layer turning dense is re-planned at once
    before = pol.replans
    assert pol.maybe_replan(10, [[0.8] * 4, None], union_density=[[0.3] * 4, None]) in ([], [0])
    assert pol.replans == before + 1
    with pytest.raises(ValueError, match="one union_density entry"):
        pol.maybe_replan(11, sp, union_density=[[0.3] * 4])
