"""CP cost model: kernel fits (shipped as package data), link kinds, calibration data."""

import dataclasses
import json
import math
from pathlib import Path

import pytest

from megatron_dsv.cp.cost_model import (
    DEFAULT_FITS,
    AttentionShape,
    Calibration,
    CostModel,
    KernelFit,
    Link,
    Links,
    fit_document,
    fit_link,
)
from megatron_dsv.cp.plan import LayerPlan

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks" / "results" / "attention_h100_20261124_pass4.json"
RING = REPO / "benchmarks" / "results" / "cp_chunk_h100_20261124_privops.json"

# round numbers so that hand-computed communication times are exact
TOY = CostModel(
    fits=(KernelFit(64, dense_ms_per_gpair=2.0, dense_fwd_fraction=0.25, sparse_ms_per_mquery=1.0,
                    sparse_ms_per_gpair=3.0, select_ms_per_gpair=0.01),),
    links=Links.assumed(100.0, 10.0, 0.0),
)
# four different links, so a test sees which one each transfer uses
KINDS = Links(intra_a2a=Link(100.0, 0.5), intra_p2p=Link(50.0, 0.25), inter_a2a=Link(10.0, 2.0),
              inter_p2p=Link(5.0, 1.0))


@pytest.fixture(scope="module")
def h100():
    return CostModel.from_benchmark()


def test_fits_reproduce_the_benchmark(h100):
    data = json.loads(BENCH.read_text())
    heads = data["args"]["heads"]
    assert [f.head_dim for f in h100.fits] == [64, 128]
    for row in data["rows"]:
        fit = h100.fit_for(row["D"])
        s = row["S"]
        if row["kind"] == "cudnn_dense":
            assert heads * fit.dense_ms(s, s) == pytest.approx(row["fwd_bwd_ms"], rel=1e-9)
        else:
            assert heads * fit.sparse_ms(s, s, 1 - row["sparsity"]) == pytest.approx(row["fwd_bwd_ms"], rel=0.05)
            assert heads * fit.select_ms(s, s) == pytest.approx(row["select_ms"], rel=0.25)
    f64, f128, f96 = h100.fit_for(64), h100.fit_for(128), h100.fit_for(96)
    assert f96.dense_ms_per_gpair == pytest.approx((f64.dense_ms_per_gpair + f128.dense_ms_per_gpair) / 2)
    assert h100.fit_for(256).sparse_ms_per_gpair == pytest.approx(2 * f128.sparse_ms_per_gpair)
    assert h100.fit_for(32).dense_ms_per_gpair == pytest.approx(f64.dense_ms_per_gpair / 2)
    assert h100.fit_for(256).select_ms_per_gpair == f128.select_ms_per_gpair



def test_communication_terms_by_hand():
    e, d, s = 2, 64, 2048
    shard = s // 2 * d * e  # bytes of one head on one rank's S/N tokens
    # head all-to-all, 2 ranks in one node, 2 heads: send/receive 3 heads of q,k,v and 1 of out, x2 for bwd
    shape = AttentionShape(s, 2, d)
    pc = TOY.plan_cost(shape, LayerPlan(2, 1, ((0,), (1,))), None, gpus_per_node=8)
    assert pc.head_link == "intra" and pc.seq_link == "none"
    assert pc.slots[0].head_a2a_ms == pytest.approx(2 * (3 + 1) * shard / 100e6)
    # same across two nodes: InfiniBand
    pc = TOY.plan_cost(shape, LayerPlan(2, 1, ((0,), (1,))), None, gpus_per_node=1)
    assert pc.head_link == "inter" and pc.slots[0].head_a2a_ms == pytest.approx(2 * 4 * shard / 10e6)
    # sparse sequence split over 2 nodes: predictor keys + union of remote keys (fwd) + dK,dV (bwd)
    shape1 = AttentionShape(s, 1, d)
    pc = TOY.plan_cost(shape1, LayerPlan(1, 2, ((0,),)), [0.1], gpus_per_node=1)
    lowrank = s // 2 * 16 * e
    fetch = 0.2 * (s // 2) * d * 2 * e  # union = min(1, 2.0 * 0.1)
    slot = pc.slots[0]
    assert pc.seq_link == "inter"
    assert slot.seq_exposed_ms == pytest.approx((lowrank + 2 * fetch) / 10e6)
    assert slot.compute_ms == pytest.approx(TOY.fits[0].sparse_ms(s / 2, s, 0.1) + TOY.fits[0].select_ms(s / 2, s))
    assert pc.total_ms == pytest.approx(slot.compute_ms + slot.seq_exposed_ms)
    # a measured union replaces the factor
    pc = TOY.plan_cost(shape1, LayerPlan(1, 2, ((0,),)), [0.1], gpus_per_node=1, union_density=[0.5])
    assert pc.slots[0].seq_exposed_ms == pytest.approx((lowrank + 2 * 0.5 * (s // 2) * d * 2 * e) / 10e6)
    # dense ring over 2 nodes, transfer-bound: one step of compute fwd and bwd + one transfer each
    pc = TOY.plan_cost(shape1, LayerPlan(1, 2, ((0,),)), None, gpus_per_node=1)
    step = TOY.fits[0].dense_ms(s / 2, s / 2)
    chunk = 2 * (s // 2) * d * e
    tf, tb = chunk / 10e6, 2 * chunk / 10e6
    want = 0.25 * step + max(0.25 * step, tf) + 0.75 * step + max(0.75 * step, tb)
    assert tf > 0.25 * step and pc.total_ms == pytest.approx(want)


def test_shipped_fits_are_the_fit_of_the_recorded_benchmarks():
    shipped = json.loads(DEFAULT_FITS.read_text())
    again = fit_document(BENCH, RING, name_relative_to=REPO, fitted_at_commit=shipped["provenance"]["fitted_at_commit"])
    assert again == shipped  # regenerate the package data with fit_document when the benchmarks change
    prov = shipped["provenance"]
    assert prov["kernels"] == {"file": "benchmarks/results/attention_h100_20261124_pass4.json",
                               "gpu": "NVIDIA H100 80GB HBM3", "commit": "72c9fc1",
                               "date_utc": "2026-11-24T19:42:27+00:00"}
    assert prov["ring_step"]["file"] == "benchmarks/results/cp_chunk_h100_20261124_privops.json"
    assert prov["ring_step"]["commit"] == "c415107"
    # the raw benchmark, fitted here, gives the same model as the shipped fits
    raw = CostModel.from_benchmark(BENCH)
    default = CostModel.from_benchmark()
    assert raw.fits == default.fits and raw.ring_compute_factor == default.ring_compute_factor
    assert default.ring_compute_factor == pytest.approx(0.971, abs=1e-3)
    assert "72c9fc1" in default.provenance and "c415107" in default.provenance


def test_from_benchmark_rejects_what_it_cannot_read(tmp_path):
    bad = tmp_path / "x.json"
    bad.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ValueError, match="neither a kernel-fits JSON"):
        CostModel.from_benchmark(bad)
    with pytest.raises(ValueError, match="not both"):
        CostModel.from_benchmark(links=KINDS, intra_node_gbps=10.0)
    with pytest.raises(ValueError, match="Link.gbps must be a finite number > 0"):
        Link(0.0, 0.1)
    with pytest.raises(ValueError, match="latency_ms must be a finite number >= 0"):
        Link(1.0, math.nan)
    # the assumed-bandwidth keywords the controller passes build assumed links
    legacy = CostModel.from_benchmark(intra_node_gbps=60.0, inter_node_gbps=20.0)
    assert legacy.links == Links.assumed(60.0, 20.0, 0.01) and legacy.links.measured == ()


def test_each_transfer_uses_its_link_kind():
    cost = dataclasses.replace(TOY, links=KINDS)
    e, d, s = 2, 64, 2048
    shard = s // 2 * d * e
    # head all-to-all in one node: 4 collectives, each latency + bytes over intra_a2a
    shape = AttentionShape(s, 2, d)
    pc = cost.plan_cost(shape, LayerPlan(2, 1, ((0,), (1,))), None, gpus_per_node=8)
    assert pc.slots[0].head_a2a_ms == pytest.approx(2 * ((0.5 + 3 * shard / 100e6) + (0.5 + shard / 100e6)))
    # across two nodes: inter_a2a
    pc = cost.plan_cost(shape, LayerPlan(2, 1, ((0,), (1,))), None, gpus_per_node=1)
    assert pc.slots[0].head_a2a_ms == pytest.approx(2 * ((2.0 + 3 * shard / 10e6) + (2.0 + shard / 10e6)))
    # dense ring steps: p2p of the node class
    shape1 = AttentionShape(s, 1, d)
    chunk = 2 * (s // 2) * d * e
    step = TOY.fits[0].dense_ms(s / 2, s / 2)
    for gpn, link in ((1, KINDS.inter_p2p), (2, KINDS.intra_p2p)):
        slot = cost.plan_cost(shape1, LayerPlan(1, 2, ((0,),)), None, gpus_per_node=gpn).slots[0]
        tf, tb = link.ms(chunk), link.ms(2 * chunk)
        assert slot.seq_comm_ms == pytest.approx(tf + tb)
        assert slot.seq_exposed_ms == pytest.approx(max(0.0, tf - 0.25 * step) + max(0.0, tb - 0.75 * step))
    # sparse sequence split over 4 ranks, 2 per node: one peer in the node, two in the other, both
    # classes at once; the slower one sets each of the 3 collectives (key all-gather, fetch, return)
    shape4 = AttentionShape(4 * 512, 1, d)
    lowrank = 512 * 16 * e
    fetch = 0.2 * 512 * d * 2 * e

    def sparse_seq(links):
        return dataclasses.replace(TOY, links=links).plan_cost(
            shape4, LayerPlan(1, 4, ((0,),)), [0.1], gpus_per_node=2).slots[0].seq_exposed_ms

    want = sum(max(0.5 + pp / 100e6, 2.0 + 2 * pp / 10e6) for pp in (lowrank, fetch, fetch))
    assert sparse_seq(KINDS) == pytest.approx(want)
    slow_intra = dataclasses.replace(KINDS, intra_a2a=Link(0.001, 0.5), inter_a2a=Link(1000.0, 0.0))
    want = sum(0.5 + pp / 0.001e6 for pp in (lowrank, fetch, fetch))
    assert sparse_seq(slow_intra) == pytest.approx(want)


def test_fit_link_recovers_a_known_link():
    truth = Link(42.0, 0.03)
    sizes = [65536, 2**20, 2**24, 2**28]
    got = fit_link([(b, truth.ms(b)) for b in sizes])
    assert got.measured and got.gbps == pytest.approx(42.0, rel=1e-9) and got.latency_ms == pytest.approx(0.03, rel=1e-6)
    # noise that makes the latency negative refits through zero
    through0 = fit_link([(1e6, 0.01), (2e6, 0.03)])
    assert through0.latency_ms == 0.0 and through0.gbps > 0
    with pytest.raises(ValueError, match=">= 2 distinct byte counts"):
        fit_link([(1e6, 0.1), (1e6, 0.2)])
    with pytest.raises(ValueError, match="finite times > 0"):
        fit_link([(1e6, 0.1), (2e6, math.inf)])


def test_calibration_replaces_measured_links_only(tmp_path):
    cal = Calibration(links={"intra_a2a": Link(42.0, 0.03), "intra_p2p": Link(120.0, 0.02)},
                      samples={"intra_a2a": [[65536.0, 0.0316], [2.0**20, 0.055]]},
                      env={"world_size": 2, "nodes": 1, "backend": "nccl", "device": "NVIDIA H200"})
    path = tmp_path / "cal.json"
    cal.save(path)
    back = Calibration.load(path)
    assert back.to_dict() == cal.to_dict() and back.links["intra_a2a"].measured
    cost = CostModel.from_benchmark(calibration=path)
    assert cost.links.measured == ("intra_a2a", "intra_p2p")
    assert (cost.links.intra_a2a.gbps, cost.links.intra_a2a.latency_ms) == (42.0, 0.03)
    assert cost.links.inter_a2a == Links.assumed().inter_a2a  # not measured on one node: still assumed
    assert "nodes=1" in cost.links.source and "NVIDIA H200" in cost.links.source
    assert CostModel.from_benchmark().with_calibration(cal).links == cost.links
    # the calibration moves the prediction of a plan that uses the measured link
    shape = AttentionShape(2 * 64 * 256, 16, 128)
    plan = LayerPlan(2, 1, ((0, 2, 4, 6, 8, 10, 12, 14), (1, 3, 5, 7, 9, 11, 13, 15)))
    before = CostModel.from_benchmark().plan_cost(shape, plan, None, gpus_per_node=8).slots[0].head_a2a_ms
    after = cost.plan_cost(shape, plan, None, gpus_per_node=8).slots[0].head_a2a_ms
    assert after == pytest.approx(before * 150.0 / 42.0, rel=0.05) and after > before
    with pytest.raises(ValueError, match="calibrate_cp --out cal.json"):
        Calibration.from_dict({"format": "something else"})
    with pytest.raises(ValueError, match="unknown"):
        Calibration(links={"nvlink": Link(1.0, 0.0)})
