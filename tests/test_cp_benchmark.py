"""benchmarks/cp.py end to end on 2 gloo ranks (tiny, fp32), and its cost-model re-fit on
synthetic measurements with known bandwidth, latency and compute scale."""

from __future__ import annotations

import json
import math

import pytest

from tests.cp.distributed import run_ranks


def _rank(rank, world, argv):
    from benchmarks import cp

    cp.run(rank, world, cp.parse_args(argv))


def test_cp_benchmark_cpu_smoke(tmp_path):
    from megatron_dsv.cp.cost_model import Calibration, Link

    out, cal = tmp_path / "cp.json", tmp_path / "cal.json"
    Calibration(links={"intra_a2a": Link(33.0, 0.04, True), "intra_p2p": Link(44.0, 0.05, True)},
                env={"world_size": 2, "nodes": 1, "backend": "gloo", "device": "cpu"}).save(str(cal))
    argv = ["--device", "cpu", "--tiny", "--seqlens", "64,128", "--check-max-tokens", "64", "--out", str(out),
            "--calibration", str(cal)]
    run_ranks(_rank, 2, argv)
    res = json.loads(out.read_text())
    # the planner's cost model runs on the calibration's links
    assert res["calibration"] == str(cal) and res["cost_model"]["links"]["measured"] == ["intra_a2a", "intra_p2p"]
    assert res["cost_model"]["links"]["intra_a2a"]["gbps"] == 33.0 and res["refit"]["before"]["intra_node_gbps"] == 33.0
    assert res["world"] == 2 and res["env"]["gpu"].startswith("none")
    assert res["args"]["seqlens"] == "64,128"
    assert [(r["S"], r["profile"]) for r in res["rows"]] == [(64, "hetero"), (64, "uniform"), (128, "hetero"), (128, "uniform")]
    for r in res["rows"]:
        v = r["variants"]
        assert set(v) == {"planner", "autotune", "head", "seq", "dense", "planner_prior"}
        for name in ("planner", "autotune", "head", "seq", "dense"):
            assert v[name]["block"]["ms"] > 0 and v[name]["attn"]["ms"] > 0
            assert math.isfinite(v[name]["plan"]["predicted_attn_ms"])
            assert ("correct" in v[name]) == (r["S"] == 64)
            if r["S"] == 64:
                c = v[name]["correct"]
                assert c["passed"] and c["out_err"] <= c["out_bound"] == 1e-4 and c["dx_err"] <= 1e-4
        assert v["head"]["plan"]["head_size"] == 2 and v["seq"]["plan"]["seq_size"] == 2
        assert v["dense"]["plan"]["head_size"] * v["dense"]["plan"]["seq_size"] == 2
        # autotune: both splits timed (the pure ones), its pick the faster of them, timed again as a variant
        tuned = r["autotune"]
        assert [c["split"] for c in tuned["candidates"]] == ["1x2", "2x1"] and tuned["seconds"] > 0
        fastest = min(tuned["candidates"], key=lambda c: (c["measured_ms"], -int(c["split"][0])))
        assert tuned["best"] == fastest["split"] == "{head_size}x{seq_size}".format(**v["autotune"]["plan"])
        assert all(c["measured_ms"] > 0 and math.isfinite(c["predicted_ms"]) for c in tuned["candidates"])
        assert len(r["union_measured"]) == 4 and all(0 < u <= 1 for u in r["union_measured"])
        if r["profile"] == "hetero":
            assert len(set(r["density"])) > 1  # heterogeneous K per head
            assert v["head"]["plan"]["heads_per_slot"] == [1, 3]  # LPT: the dense-ish head alone
    assert res["correctness"] == {
        "passed": True, "checked_seqlens": [64], "note": res["correctness"]["note"]} and res["correctness"]["note"]
    assert [d["S"] for d in res["dit"]] == [64, 128]
    assert all(d["variants"]["planner"]["correct"]["passed"] for d in res["dit"][:1])
    assert "correct" not in res["dit"][1]["variants"]["planner"]
    fit = res["refit"]
    assert fit["cases"] == len(fit["per_case"]) >= 4
    for k in ("before", "bandwidth_latency", "with_compute_scale"):
        assert all(math.isfinite(fit[k][f]) for f in ("intra_node_gbps", "latency_ms", "median_abs_rel_err"))
    assert fit["with_compute_scale"]["rms_log_err"] <= fit["bandwidth_latency"]["rms_log_err"] + 1e-9
    assert fit["bandwidth_latency"]["rms_log_err"] <= fit["before"]["rms_log_err"] + 1e-9
    assert isinstance(res["target"]["target_met"], bool)
    for r in res["rows"]:
        best = min(r["variants"]["head"]["block"]["ms"], r["variants"]["seq"]["block"]["ms"])
        assert r["target_met"] == (r["variants"]["planner"]["block"]["ms"] <= 1.02 * best)
        assert r["autotune_target_met"] == (r["variants"]["autotune"]["block"]["ms"] <= 1.02 * best)
    for d in res["dit"]:
        assert d["target_met"] == (d["variants"]["planner"]["step"]["ms"] <= 1.02 * d["best_pure_ms"])
        assert d["autotune_target_met"] == (d["variants"]["autotune"]["step"]["ms"] <= 1.02 * d["best_pure_ms"])
    t = res["target"]
    assert t["as_fast_target_met"] == (all(r["target_met"] for r in res["rows"]) and all(d["target_met"] for d in res["dit"]))
    assert t["autotune_target_met"] == (all(r["autotune_target_met"] for r in res["rows"])
                                        and all(d["autotune_target_met"] for d in res["dit"]))


def _synthetic_rows(truth, gpn):
    """Rows as benchmarks/cp.py writes them, with attention times predicted by ``truth``."""
    from dataclasses import asdict

    from benchmarks.cp import profile_sparsity
    from megatron_dsv.cp.planner import AttentionShape, compare_plans

    rows = []
    for n in (4, 8):
        for s in (65536, 262144):
            shape = AttentionShape(s, 16, 128)
            for prof in ("hetero", "uniform"):
                density = [1 - x for x in profile_sparsity(prof, 16)]
                union = [min(1.0, 4 * d) for d in density]
                cmp = compare_plans(truth, shape, density, cp_size=n, gpus_per_node=gpn, granule=64, union_density=union)
                dense = compare_plans(truth, shape, None, cp_size=n, gpus_per_node=gpn, granule=64)
                variants = {}
                for name, c in (("planner", cmp.candidates[1]), ("head", cmp.pure_head), ("seq", cmp.pure_seq),
                                ("dense", dense.pure_seq)):
                    p = c.plan
                    variants[name] = {"plan": {"head_size": p.head_size, "seq_size": p.seq_size,
                                               "slots": [list(x) for x in p.slots]}, "attn": {"ms": c.total_ms}}
                rows.append({"S": s, "N": n, "profile": prof, "shape": asdict(shape), "density": density,
                             "union_measured": union, "granule": 64, "variants": variants})
    return rows


def test_refit_recovers_known_parameters():
    from benchmarks.cp import _scaled, refit
    from megatron_dsv.cp.planner import CostModel

    prior = CostModel.from_benchmark()
    truth = _scaled(prior, 60.0, 0.05, 1.3)
    res = refit(prior, _synthetic_rows(truth, 8), gpus_per_node=8)
    assert res["before"]["median_abs_rel_err"] > 0.05  # the prior is off ...
    full = res["with_compute_scale"]
    assert full["intra_node_gbps"] == pytest.approx(60.0, rel=1e-3)  # ... the fit finds the truth
    assert full["latency_ms"] == pytest.approx(0.05, rel=1e-3)
    assert full["compute_scale"] == pytest.approx(1.3, rel=1e-3)
    assert full["max_abs_rel_err"] < 1e-3
    assert res["bandwidth_latency"]["rms_log_err"] < res["before"]["rms_log_err"]
