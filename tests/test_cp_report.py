"""benchmarks/cp_report.py on synthetic inputs with known answers: cp.py rows and DiT steps,
a calibration, Megatron logs of four pretraining runs and DSV stats logs with exchange bytes."""

from __future__ import annotations

import json
import statistics

import pytest

from benchmarks import cp_report


def _variant(block_ms, attn_ms, pred_ms, split=(2, 1), passed=True):
    return {"block": {"ms": block_ms}, "attn": {"ms": attn_ms}, "correct": {"passed": passed},
            "plan": {"head_size": split[0], "seq_size": split[1], "predicted_attn_ms": pred_ms}}


def _row(S, profile, planner, head, seq, dense, split):
    best = min(head, seq)
    return {"S": S, "profile": profile, "correctness_checked": S == 65536,
            "block_planner_speedup_vs_best_pure": best / planner, "target_met": planner <= 1.02 * best,
            "variants": {"planner": _variant(planner, planner / 2, planner / 2.5, split),
                         "head": _variant(head, head / 2, head / 2.5, (2, 1)),
                         "seq": _variant(seq, seq / 2, seq / 2.5, (1, 2)),
                         "dense": _variant(dense, dense / 2, dense / 3, (1, 2))}}


def _log(path, losses, ms, val=(), switch=None):
    lines = ["some start-up line"]
    for i, (loss, t) in enumerate(zip(losses, ms), 1):
        lines.append(f"[2026-11-30 04:04:31] iteration {i:8d}/ {len(losses):7d} | consumed samples: {i:12d} | "
                     f"elapsed time per iteration (ms): {t:.1f} | learning rate: 1.0E-04 | global batch size:     1 | "
                     f"flow loss: {loss:.6E} | loss scale: 1.0 | grad norm: 1.0 |")
        if switch == i:
            lines.append(f"DSV stage switch at iteration {i}: reached --dsv-switch-max-iters {i}")
        for it, v in val:
            if it == i:
                lines.append(f" validation loss at iteration {it} | flow loss value: {v:.6E} | flow loss PPL: 2.0 | ")
    lines.append(f" validation loss at iteration {len(losses)} on validation set | flow loss value: 9.0E+00 |")
    path.write_text("\n".join(lines) + "\n")


def _stats(path, exchanges, plans):
    with open(path, "w") as f:
        for it, ex in exchanges:
            layers = [{"layer": n + 1, "sparse": e is not None, "cp_plan": plans[n], "cp_exchange": e}
                      for n, e in enumerate(ex)]
            f.write(json.dumps({"iteration": it, "stage": 2, "layers": layers}) + "\n")


def test_report_tables_ratios_agreement_and_exchange(tmp_path):
    rows = [_row(65536, "hetero", 80.0, 78.0, 100.0, 286.0, (2, 1)),  # 2.6% slower than head: missed
            _row(65536, "uniform", 70.0, 71.0, 72.0, 286.0, (1, 2))]
    # the autotuner timed the candidates and kept head (hetero) and the planner's 1x2 (uniform)
    for r, (ms, split) in zip(rows, ((78.0, (2, 1)), (70.0, (1, 2)))):
        r["variants"]["autotune"] = _variant(ms, ms / 2, ms / 2.5, split)
        r["block_autotune_speedup_vs_best_pure"] = min(r["variants"]["head"]["block"]["ms"],
                                                       r["variants"]["seq"]["block"]["ms"]) / ms
        r["autotune_target_met"] = True
    dits = [{"S": 65536, "variants": {"planner": {"step": {"ms": 200.0}, "split": "2x1"},
                                      "autotune": {"step": {"ms": 200.0}, "split": "2x1"},
                                      "head": {"step": {"ms": 200.0}}, "seq": {"step": {"ms": 230.0}}},
             "planner_speedup_vs_best_pure": 1.0, "target_met": True,
             "autotune_speedup_vs_best_pure": 1.0, "autotune_target_met": True},
            {"S": 262144, "skipped": "not T x 64 x 64"}]
    refit = {"cases": 6, **{k: {"intra_node_gbps": g, "latency_ms": 0.05, "compute_scale": 1.0,
                                "median_abs_rel_err": e, "max_abs_rel_err": 2 * e}
                            for k, g, e in (("before", 150.0, 0.24), ("bandwidth_latency", 42.0, 0.11),
                                            ("with_compute_scale", 40.0, 0.1))}}
    cp = tmp_path / "cp.json"
    cp.write_text(json.dumps({"rows": rows, "dit": dits, "refit": refit, "world": 2, "sizes": {"layers": 2},
                              "cost_model": {"links": {}}}))
    cal = tmp_path / "cal.json"
    cal.write_text(json.dumps({"format": "megatron_dsv.cp.calibration/1",
                               "links": {"intra_a2a": {"gbps": 123.4, "latency_ms": 0.031}},
                               "samples": {"intra_a2a": [[65536, 0.03], [2**28, 2.2]]},
                               "env": {"world_size": 2, "nodes": 1, "backend": "nccl", "device": "NVIDIA H200"}}))
    n = 30
    ref = [2.0 - 0.01 * i + (0.05 if i % 2 else -0.05) for i in range(n)]  # a zig-zag: 0.1 change per iteration
    cp2 = [x * (1.002 if i % 3 else 0.999) for i, x in enumerate(ref)]  # 0.1..0.2% off the reference
    _log(tmp_path / "cp2.log", cp2, [300.0] * 5 + [100.0] * (n - 5), val=[(20, 1.5)], switch=15)
    _log(tmp_path / "cp1.log", ref, [900.0] * 5 + [180.0] * (n - 5), val=[(20, 1.503)])
    _log(tmp_path / "dense.log", ref[:20], [900.0] * 5 + [125.0] * 15)
    _log(tmp_path / "sparse.log", ref[:20], [900.0] * 5 + [50.0] * 15)
    mib = 2**20
    ex = lambda f, a: {"fetched_bytes": f * mib, "allgather_bytes": a * mib, "ratio": f / a, "ranks": 2}  # noqa: E731
    _stats(tmp_path / "sparse.jsonl", [(0, [ex(10, 100), ex(30, 100)]), (10, [ex(20, 100), ex(30, 100)]),
                                       (20, [ex(40, 100), ex(30, 100)])], ["1x2", "1x2"])
    _stats(tmp_path / "cp2.jsonl", [(15, [None, None])], ["2x1", "2x1"])
    out = tmp_path / "rep"
    res = cp_report.main([
        "--cp", str(cp), "--calibration", str(cal), "--out", str(out), "--note", "synthetic",
        "--run", f"cp2_auto={tmp_path / 'cp2.log'}:{tmp_path / 'cp2.jsonl'}", "--run", f"cp1_auto={tmp_path / 'cp1.log'}",
        "--run", f"cp2_dense={tmp_path / 'dense.log'}", "--run", f"cp2_sparse_seq={tmp_path / 'sparse.log'}:{tmp_path / 'sparse.jsonl'}",
    ])
    assert res["target_met_every_case"] is False  # the hetero row misses by 2.6%
    assert res["autotune_target_met_every_case"] is True
    pre = res["pretrain"]
    assert pre["steps"]["cp2_auto"]["median_step_ms"] == 100.0 and pre["steps"]["cp2_auto"]["switch_iteration"] == 15
    assert pre["steps"]["cp2_auto"]["cp_plans_at_end"] == ["2x1", "2x1"]
    assert pre["ratios_to_dense"] == {"cp2_auto": 0.8, "cp1_auto": 1.44, "cp2_sparse_seq": 0.4}
    agree = pre["loss_agreement"]
    want = [abs(a - b) / b for a, b in zip(cp2, ref)]
    assert agree["common_iterations"] == n and agree["median_rel_diff"] == pytest.approx(statistics.median(want))
    assert agree["max_rel_diff"] == pytest.approx(max(want))
    noise = statistics.median(abs(ref[i] - ref[i - 1]) / ref[i] for i in range(1, n))
    assert agree["median_iteration_to_iteration_rel_change_of_reference"] == pytest.approx(noise)
    assert agree["within_noise"] is True
    assert agree["validation"] == [{"iteration": 20, "a": 1.5, "b": 1.503, "rel_diff": pytest.approx(0.003 / 1.503)}]
    e = pre["exchange"]["cp2_sparse_seq"]
    assert [(l["layer"], l["fetched_mib"], l["allgather_mib"], l["ratio"], l["measurements"]) for l in e["layers"]] == [
        (1, 20.0, 100.0, pytest.approx(0.2), 3), (2, 30.0, 100.0, pytest.approx(0.3), 3)]
    assert e["ratio_all_layers"] == pytest.approx(0.25) and "cp2_auto" not in pre["exchange"]
    md = (tmp_path / "rep.md").read_text()
    assert "| 65536 | hetero | 2x1 | 80.00 | 78.00 (2x1) | 78.00 | 100.00 | 286.00 | x0.975 / x1.000 | NO / yes |" in md
    assert "| 65536 | uniform | 1x2 | 70.00 | 70.00 (1x2) | 71.00 | 72.00 | 286.00 | x1.014 / x1.014 | yes / yes |" in md
    assert "| 65536 | 200.00 (2x1) | 200.00 (2x1) | 200.00 | 230.00 | x1.000 / x1.000 | yes / yes |" in md
    assert "skipped: not T x 64 x 64" in md
    assert "| intra_a2a (measured) | 123.4 | 0.031 | 2 |" in md and "| bandwidth_latency | 42 |" in md
    assert "| cp2_sparse_seq | 20 | 50.0 | x0.400 |" in md and "| 1 | 20.00 | 100.00 | 0.200 | 3 |" in md
    assert (tmp_path / "rep.png").stat().st_size > 1000
    assert json.loads((tmp_path / "rep.json").read_text())["pretrain"]["ratios_to_dense"]["cp2_auto"] == 0.8


def test_report_refuses_malformed_arguments(tmp_path):
    with pytest.raises(SystemExit):
        cp_report.main(["--out", str(tmp_path / "x"), "--compare", "a,b,c"])
    with pytest.raises(SystemExit):
        cp_report.main(["--out", str(tmp_path / "x"), "--run", "no-equals-sign"])
