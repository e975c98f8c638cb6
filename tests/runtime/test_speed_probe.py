"""The in-situ speed probe (``--dsv-speed-table measure``): the decision follows the measured times,
the cache per (shape, K), the slowest rank's times on every rank, a real CPU probe end to end, and
``assume`` keeping the density <= 0.5 rule.

Injected timers run each step once (so the synthetic sparse and dense paths run) and return a
chosen time per arm.
"""

from __future__ import annotations

import math

import pytest
import torch

from megatron_dsv.config import DSVConfig
from megatron_dsv.runtime.controller import DSVController
from megatron_dsv.runtime.speed_probe import ProbeShape, SpeedProbe, probe_layer
from tests.cp.distributed import run_ranks
from tests.runtime.test_controller import _curve_state, build, make_task, train

# 4 heads of 16 (2 key/value heads), 64 tokens, 8-token query groups, 4-token key blocks
SHAPE = ProbeShape(batch=2, seq_len=64, num_heads=4, num_kv_heads=2, head_dim=16, dtype=torch.float32,
                   device="cpu", group_size=8, kv_block=4, predictor_rank=4, backend="reference",
                   selection_backend="reference")


def _fake(times, calls):
    """A timer giving ``arm -> ms`` after running the step once."""

    def timer(arm, step):
        step()
        calls.append(arm)
        return times[arm]

    return timer


def _stage2(speed_probe, **cfg):
    """A controller in stage 2 whose layers hold a recall curve with K = 10 of 128 units per head
    (density 0.078, recall 0.95): only the speed check decides whether they go sparse."""
    model, opt = build(dsv_min_sparsity=0.5, dsv_min_keys=1, **cfg)
    ctl = DSVController(model, optimizer=opt, log=lambda s: None, speed_probe=speed_probe)
    train(model, opt, ctl, make_task(), 0, 1)  # a forward, so the layers know their length (128)
    for layer in ctl.layers:
        layer.apply(layer.state.replace(stats_ema=_curve_state(layer, good=True)))
    ctl.stage = 2
    ctl.model = model
    return ctl


@pytest.mark.parametrize("times, sparse, verdict", [
    ({"sparse": 1.0, "dense": 2.0}, True, "sparse is faster"),
    ({"sparse": 1.21, "dense": 1.05}, False, "dense is faster"),
    ({"sparse": 1.0, "dense": 1.04}, False, "sparse is less than 5% faster (--dsv-speed-margin): dense"),  # 3.8% faster: within the margin
])
def test_decision_follows_the_measurement(megatron_state, times, sparse, verdict):
    calls, lines = [], []
    ctl = _stage2(SpeedProbe(timer=_fake(times, calls), log=lines.append))
    events = ctl._redecide(100, switching=True)  # the stage switch logs every layer's decision
    want = f"sparse {times['sparse']:.2f} ms (reference) vs dense {times['dense']:.2f} ms at density 0.08: {verdict}"
    for layer in ctl.layers:
        assert layer.sparse is sparse and want in layer.decision, layer.decision
        assert (layer.kv_units_global is not None) is sparse
    assert all(want in e for e in events) and len(events) == len(ctl.layers)
    # both layers share the shape and K: measured (and logged) once
    assert calls == ["sparse", "dense"] and len(lines) == 1 and want in lines[0]
    assert lines[0].startswith("DSV speed probe layer 1 (S=128, batch 2, 4 heads (4 kv) of 16, float32")
    assert ctl.summary(100)["layers"][0]["speed_probe"] == {
        "sparse_ms": times["sparse"], "dense_ms": times["dense"], "density": 10 / 128, "kernels": "reference"}


def test_cache_per_shape_and_k(megatron_state):
    calls = []
    probe = SpeedProbe(timer=_fake({"sparse": 1.0, "dense": 2.0}, calls))
    ctl = _stage2(probe)
    ctl._redecide(100)
    ctl._redecide(104)
    assert (probe.misses, probe.hits, len(calls)) == (1, 3, 2)
    assert all(l.sparse for l in ctl.layers)
    # another K (a fresh layer whose recall is spread over more units): measured again, once for both layers
    for layer in ctl.layers:
        layer.apply(layer.state.replace(sparse=False, kv_units=None, changed_at=None))
        ema = _curve_state(layer, good=True)
        mass = torch.full_like(ema["mass_by_rank"], 0.05 / (128 - 16))
        mass[:, :16] = 0.95 / 16
        need = torch.zeros_like(mass)
        need[:, 15] = 16.0
        ema.update(mass_by_rank=mass * 16, mass_by_rank_exact=mass * 16, need_count=need, need_count_exact=need)
        layer.apply(layer.state.replace(stats_ema=ema))
    ctl._redecide(108)
    assert (probe.misses, probe.hits, len(calls)) == (2, 4, 4)
    assert ctl.layers[0].kv_units_global.tolist() == [16] * 4
    # a forward with bf16 activations and fp32 parameters (as under autocast): the probe times bf16
    with torch.no_grad():
        ctl.layers[0](*torch.randn(3, 128, 2, 4, 16, dtype=torch.bfloat16), None)
    assert ctl.layers[0].last_dtype is torch.bfloat16 and ctl.layers[0].config.params_dtype is torch.float32
    ctl._redecide(112)
    assert probe.misses == 3 and probe.hits == 5 and sorted(str(key[0].dtype) for key in probe.cache) == ["torch.bfloat16"] + ["torch.float32"] * 2
    # K rounded up to the K multiple: 9 and 10 units share a signature with a multiple of 2
    rounded = SpeedProbe(k_multiple=2)
    assert rounded.signature(SHAPE, [9, 10, 1, 2], "sdpa") == rounded.signature(SHAPE, [10, 10, 2, 2], "sdpa")
    assert rounded.signature(SHAPE, [9, 10, 1, 2], "sdpa") != rounded.signature(SHAPE, [9, 10, 1, 2], "te")


def test_real_cpu_probe_end_to_end(megatron_state):
    """No injected timer: the reference sparse path and the layer's own dense path are timed."""
    res = probe_layer(SHAPE, [2, 12, 3, 16], warmup=1, reps=2)
    assert math.isfinite(res.sparse_ms) and res.sparse_ms > 0 and math.isfinite(res.dense_ms) and res.dense_ms > 0
    assert res.kernels == "reference" and res.density == pytest.approx(33 / 64)
    # through the controller, built from the config (measure is the default): the layer's dense path
    model, opt = build(dsv_min_sparsity=0.5)
    assert model["block"].layers[0].self_attention.core_attention.dsv.dsv_speed_table == "measure"
    lines = []
    ctl = DSVController(model, optimizer=opt, log=lines.append)
    assert ctl.speed_probe is not None and ctl.speed_probe.margin == 0.05
    train(model, opt, ctl, make_task(), 0, 1)
    for layer in ctl.layers:
        layer.apply(layer.state.replace(stats_ema=_curve_state(layer, good=True)))
    ctl.stage = 2
    ctl._redecide(100)
    probed = ctl.summary(100)["layers"][0]["speed_probe"]
    assert probed["sparse_ms"] > 0 and probed["dense_ms"] > 0 and probed["kernels"] == "reference"
    layer = ctl.layers[0]
    assert layer.sparse is (probed["sparse_ms"] < 0.95 * probed["dense_ms"]) and "measured sparse" in layer.decision
    assert sum("DSV speed probe" in line for line in lines) == 1


def test_assume_keeps_the_density_rule_and_cp_layers_are_not_probed(megatron_state, monkeypatch):
    model, opt = build(dsv_min_sparsity=0.5, dsv_speed_table="assume")
    ctl = DSVController(model, optimizer=opt, log=lambda s: None)
    assert ctl.speed_probe is None and ctl.speed_table.default_max_density == 0.5
    train(model, opt, ctl, make_task(), 0, 1)
    for layer in ctl.layers:
        layer.apply(layer.state.replace(stats_ema=_curve_state(layer, good=True)))
    ctl.stage = 2
    ctl._redecide(100)
    assert all(l.sparse and "measured" not in l.decision for l in ctl.layers)
    # measure, but the layer has a CP plan: no probe (the CP autotuner times its path), density rule
    calls = []
    ctl = _stage2(SpeedProbe(timer=_fake({"sparse": 9.0, "dense": 1.0}, calls)))
    monkeypatch.setattr(type(ctl.layers[0]), "cp_groups", property(lambda self: object()))
    ctl._redecide(100)
    assert calls == [] and all(l.sparse for l in ctl.layers)


def test_bad_values_are_refused():
    with pytest.raises(ValueError, match="measure .* assume .* or the path"):
        DSVConfig(dsv_speed_table="")
    with pytest.raises(ValueError, match=r"dsv_speed_margin \(--dsv-speed-margin\) must be a number in \[0, 1\)"):
        DSVConfig(dsv_speed_margin=1.0)
    assert DSVConfig().speed_table_file is None and DSVConfig(dsv_speed_table="t.json").speed_table_file == "t.json"
    with pytest.raises(ValueError, match="K per query head of this rank: 4 values in \\[1, 16\\]"):
        probe_layer(SHAPE, [0, 1, 1, 1], timer=_fake({"sparse": 1.0, "dense": 1.0}, []))
    with pytest.raises(ValueError, match="whole query groups"):
        probe_layer(ProbeShape(**{**SHAPE.__dict__, "seq_len": 60}), [1] * 4)
    with pytest.raises(ValueError, match="speed margin must be in \\[0, 1\\)"):
        SpeedProbe(margin=-0.1)
    with pytest.raises(RuntimeError, match="non-finite or negative time"):
        probe_layer(SHAPE, [1] * 4, timer=_fake({"sparse": math.nan, "dense": 1.0}, []))


def _ranks(rank, world):
    import torch.distributed as dist

    group = dist.new_group(list(range(world)))
    mine = {"sparse": 1.0 + rank, "dense": 3.0 - rank}  # rank 0: 1 vs 3, rank 1: 2 vs 2
    res = probe_layer(SHAPE, [2, 3, 4, 5], groups=(None, group), timer=_fake(mine, []))
    assert (res.sparse_ms, res.dense_ms) == (2.0, 3.0)  # each arm's slowest rank
    bad = {"sparse": math.nan, "dense": 1.0} if rank == 0 else {"sparse": 1.0, "dense": 1.0}
    with pytest.raises(RuntimeError, match="non-finite or negative time on some rank"):  # both raise, none hangs
        probe_layer(SHAPE, [2, 3, 4, 5], groups=(group,), timer=_fake(bad, []))


def test_every_rank_gets_the_slowest_times():
    run_ranks(_ranks, 2)
