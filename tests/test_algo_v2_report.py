"""benchmarks/algo_v2_report.py on synthetic logs with known answers: the switch, the per-layer
table's lowest recall at K while sparse, and the stage step-time windows."""

from __future__ import annotations

import json

from benchmarks import algo_v2_report
from tests.test_cp_report import _log


def _layer(n, sparse, recall, exact):
    return {"layer": n, "sparse": sparse, "k": [4, 4] if sparse else None, "loss": 0.1, "sparsity": [0.8, 0.8],
            "density": 0.2, "recall_at_k": recall, "recall_exact_at_k": exact, "relative_recall": [0.99, 0.99]}


def test_switch_lowest_recall_while_sparse_and_step_windows(tmp_path):
    n = 200
    _log(tmp_path / "pretrain_dense.log", [1.0] * n, [100.0] * n)
    _log(tmp_path / "pretrain_auto.log", [1.0] * n, [120.0] * 100 + [90.0] * 100, switch=100)
    stats = [
        {"iteration": 50, "stage": 1, "switch_iteration": None,
         "layers": [_layer(1, False, [0.9, 0.9], [0.91, 0.91]), _layer(2, False, [0.9, 0.9], [0.9, 0.9])]},
        {"iteration": 100, "stage": 2, "switch_iteration": 100,
         "layers": [_layer(1, True, [0.92, 0.90], [0.93, 0.93]), _layer(2, False, [0.9, 0.9], [0.9, 0.9])]},
        {"iteration": 150, "stage": 2, "switch_iteration": 100,
         "layers": [_layer(1, True, [0.90, 0.89], [0.95, 0.91]), _layer(2, False, [0.9, 0.9], [0.9, 0.9])]},
    ]
    (tmp_path / "dsv_stats_auto.jsonl").write_text("\n".join(json.dumps(s) for s in stats) + "\n")
    res = algo_v2_report.build(str(tmp_path))
    assert res["switch_iteration"] == 100 and res["switch_on_its_own"] is False  # the log names max-iters
    one, two = res["layers"]
    assert one["first_sparse_iteration"] == 100 and one["sparse_profiles"] == 2
    assert abs(one["min_recall_at_k_while_sparse"] - 0.895) < 1e-12
    assert abs(one["min_recall_exact_at_k_while_sparse"] - 0.93) < 1e-12
    assert two["first_sparse_iteration"] is None and two["min_recall_at_k_while_sparse"] is None
    assert res["step_time"]["stage1"]["ratio"] == 1.2 and res["step_time"]["stage2"]["ratio"] == 0.9
    # layer 1 went sparse at 100 (the switch): no stage-2 iterations before it in this log
    assert res["stage2_before_vs_after_sparse"] is None


def test_step_before_and_after_going_sparse(tmp_path):
    n = 300
    _log(tmp_path / "pretrain_dense.log", [1.0] * n, [100.0] * n)
    _log(tmp_path / "pretrain_auto.log", [1.0] * n, [120.0] * 100 + [100.0] * 100 + [110.0] * 100, switch=100)
    stats = [{"iteration": it, "stage": 1 if it < 100 else 2, "switch_iteration": None if it < 100 else 100,
              "layers": [_layer(1, it >= 200, [0.9, 0.9], [0.9, 0.9])]} for it in (50, 100, 150, 200, 250)]
    (tmp_path / "dsv_stats_auto.jsonl").write_text("\n".join(json.dumps(s) for s in stats) + "\n")
    eff = algo_v2_report.build(str(tmp_path))["stage2_before_vs_after_sparse"]
    assert eff["before"]["iterations"] == [151, 200] and eff["before"]["dsv_ms"] == 100.0
    assert eff["after"]["iterations"] == [211, 300] and eff["after"]["dsv_ms"] == 110.0 and eff["ratio"] == 1.1
