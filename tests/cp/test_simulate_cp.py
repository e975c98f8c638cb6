"""The planner simulator CLI (python -m megatron_dsv.tools.simulate_cp): profiles, output, calibration."""

import json

import pytest

from megatron_dsv.cp.cost_model import Calibration, Link
from megatron_dsv.tools.simulate_cp import load_profile, main, synthetic_profile


def test_synthetic_profile_is_deterministic_and_heterogeneous():
    a, b = synthetic_profile(32, 16, seed=0), synthetic_profile(32, 16, seed=0)
    assert a == b and a != synthetic_profile(32, 16, seed=1)
    assert a[0] is None and a[31] is None and all(p is not None for p in a[1:31])
    flat = [x for p in a if p for x in p]
    assert all(0.5 <= x <= 0.99 for x in flat)
    assert any(x < 0.8 for x in flat) and sum(x >= 0.9 for x in flat) > 0.7 * len(flat)



def test_cli_writes_the_simulation(tmp_path, capsys):
    out = tmp_path / "sim.json"
    res = main(["--gpus", "16", "--gpus-per-node", "8", "--seq-len", "100000", "--heads", "8", "--head-dim", "64",
                "--layers", "6", "--out", str(out)])
    text = capsys.readouterr().out
    assert "pure head-parallel = the largest feasible head split (8)" in text and "total: planner" in text
    data = json.loads(out.read_text())
    assert data["shape"]["seq_len"] == 100352 and data["shape"]["seq_len_requested"] == 100000
    assert data["benchmark"] == "benchmarks/results/attention_h100_20261124_pass4.json"
    assert {"fits", "links", "union_factor", "env", "provenance"} <= set(data["cost_model"])
    assert data["cost_model"]["links"]["measured"] == [] and "assumed: intra_a2a 150 GB/s + 0.01 ms" in text
    assert len(data["layers"]) == 6
    for e in data["layers"]:
        assert {"best", "pure_head", "pure_seq", "even_count", "candidates", "mode"} <= set(e)
        assert e["best"]["predicted_ms"] <= min(e["pure_head"]["predicted_ms"], e["pure_seq"]["predicted_ms"])
    t = data["totals"]
    assert t["target_met"] and t["planner_ms"] == pytest.approx(sum(e["best"]["predicted_ms"] for e in data["layers"]))
    assert res["totals"] == t
    # a profile file in the controller's stats-log format (dense layers flagged)
    stats = tmp_path / "stats.jsonl"
    line = {"iteration": 5, "layers": [{"layer": 1, "sparse": True, "sparsity": [0.9] * 4},
                                       {"layer": 2, "sparse": False, "sparsity": [0.5] * 4}]}
    stats.write_text(json.dumps({"iteration": 0, "layers": []}) + "\n" + json.dumps(line) + "\n")
    assert load_profile(stats) == [[0.9] * 4, None]
    res = main(["--gpus", "4", "--gpus-per-node", "4", "--seq-len", "4096", "--heads", "4", "--head-dim", "64",
                "--profile", str(stats)])
    assert [e["mode"] for e in res["layers"]] == ["sparse", "dense"]


def test_cli_takes_a_calibration(tmp_path, capsys):
    cal = tmp_path / "cal.json"
    Calibration(links={"intra_a2a": Link(5.0, 0.2), "intra_p2p": Link(5.0, 0.2)},
                env={"world_size": 2, "nodes": 1, "backend": "nccl"}).save(cal)
    argv = ["--gpus", "8", "--gpus-per-node", "8", "--seq-len", "65536", "--heads", "8", "--head-dim", "128",
            "--layers", "4"]
    assumed = main(argv)
    capsys.readouterr()
    slow = main(argv + ["--calibration", str(cal)])
    text = capsys.readouterr().out
    assert "links measured: intra_a2a 5 GB/s + 0.2 ms, intra_p2p 5 GB/s + 0.2 ms (calibration" in text
    assert "assumed: inter_a2a 40 GB/s + 0.01 ms, inter_p2p 40 GB/s + 0.01 ms" in text
    assert slow["cost_model"]["links"]["measured"] == ["intra_a2a", "intra_p2p"]
    assert slow["calibration"]["links"]["intra_a2a"] == {"gbps": 5.0, "latency_ms": 0.2}
    # 30x slower links inside the node: every communicating split costs more
    assert slow["totals"]["pure_head_ms"] > assumed["totals"]["pure_head_ms"]
    assert slow["totals"]["pure_seq_ms"] > assumed["totals"]["pure_seq_ms"]
