"""benchmarks/causal_gpt_report.py on synthetic pretrain_gpt.py logs with known answers: losses,
their DSV-vs-dense differences before and after the switch, step-time windows, DSV status lines
(written by the runtime's own formatter), per-layer decisions, and a run cut short."""

from __future__ import annotations

import json

import pytest

from benchmarks import causal_gpt_report as report
from megatron_dsv.runtime.writers import status_line


def _it(i, n, ms, loss, tflops=12.5):
    # Megatron-LM f8837c04 training_log's format, --log-throughput on
    return (f" [2026-12-01 10:00:00.000000] iteration {i:8d}/{n:8d} | consumed samples: {i:12d} | "
            f"elapsed time per iteration (ms): {ms:.1f} | throughput per GPU (TFLOP/s/GPU): {tflops:.1f} | "
            f"learning rate: 3.000000E-04 | global batch size:     1 | lm loss: {loss:.6E} | loss scale: 1.0 | "
            f"grad norm: 0.750 | number of skipped iterations:   0 | number of nan iterations:   0 |")


def _val(i, loss, suffix=""):
    return f" validation loss at iteration {i}{suffix} | lm loss value: {loss:.6E} | lm loss PPL: 2.0E+00 | "


def _summary(it, stage, sparse):
    layers = [{"sparse": s, "loss": 0.02, "recall": [0.91, 0.93], "sparsity": 0.75,
               "relative_recall": [0.97, 0.99], "density": 0.125} for s in sparse]
    return {"iteration": it, "stage": stage, "layers": layers}


def _write(path, losses, ms, switch=None, extra=(), tail=("[after training is done] 2026-12-01 10:05:00",
                                                          "run_gpu_causal_gpt: exit code 0"), final=9.0):
    n = 10 * len(losses)
    lines = ["  dsv_mode ........................................ auto", "DSV hooks installed: 2 DSV layers, stage 1"]
    for j, (loss, t) in enumerate(zip(losses, ms), 1):
        i = 10 * j
        lines.append(_it(i, n, t, loss))
        if i % 20 == 0:
            lines.append(_val(i, loss + 0.5))
        if switch == i:
            lines += [f"DSV stage switch at iteration {i}: relative recall 0.950 (target 0.95); "
                      f"reached --dsv-switch-max-iters {i}",
                      "DSV layer 1: sparse (density 0.125 <= 0.5)",
                      "DSV layer 2: dense (sparsity 0.400 < --dsv-min-sparsity 0.5)"]
            lines.append(status_line(_summary(i, 2, [True, False])))
    lines += list(extra)
    if final is not None:
        lines.append(_val(n, final, " on validation set"))
    lines += list(tail)
    path.write_text("\n".join(lines) + "\n")


def test_losses_differences_windows_and_decisions(tmp_path):
    dense_loss = [6.0, 4.0, 2.0, 1.0, 0.5, 0.25]
    dsv_loss = [6.0, 4.0, 2.0, 1.1, 0.45, 0.25]
    _write(tmp_path / "dense.log", dense_loss, [500.0, 100.0, 100.0, 100.0, 102.0, 104.0])
    late = ["DSV layer 2: sparse (density 0.250 <= 0.5)"]  # a later re-decision, after iteration 60
    _write(tmp_path / "dsv.log", dsv_loss, [900.0, 120.0, 130.0, 125.0, 80.0, 90.0], switch=30, extra=late)
    out = tmp_path / "r.json"
    assert report.main(["--dense", str(tmp_path / "dense.log"), "--dsv", str(tmp_path / "dsv.log"),
                        "--out", str(out), "--note", "synthetic"]) == 0
    res = json.loads(out.read_text())
    dsv, c = res["runs"]["dsv"], res["comparison"]
    assert [r["iteration"] for r in dsv["train"]] == [10, 20, 30, 40, 50, 60]
    assert dsv["train"][0]["tflops"] == 12.5 and dsv["train"][0]["grad_norm"] == 0.75
    assert dsv["switch_iteration"] == 30 and c["switch_iteration"] == 30
    assert dsv["completed"] is True and dsv["exit_code"] == 0 and dsv["errors"] == []
    assert dsv["final_layer_decisions"]["1"]["decision"] == "sparse"
    assert dsv["final_layer_decisions"]["2"] == {"decision": "sparse", "reason": "density 0.250 <= 0.5",
                                                 "after_iteration": 60}
    assert dsv["sparse_layers_at_end"] == 2
    (st,) = dsv["dsv_status"]
    assert st["iteration"] == 30 and st["stage"] == 2 and st["sparse_layers"] == 1 and st["layers"] == 2
    assert st["recall"] == pytest.approx(0.92) and st["relative_recall"] == pytest.approx(0.98)
    assert st["token_sparsity"] == pytest.approx(0.75) and st["density"] == pytest.approx(0.125)
    assert st["predictor_loss"] == pytest.approx(0.02)

    rows = {r["iteration"]: r for r in c["train_loss"]}
    assert rows[40]["abs_diff"] == pytest.approx(0.1) and rows[40]["rel_diff"] == pytest.approx(0.1)
    assert rows[50]["rel_diff"] == pytest.approx(-0.1) and rows[60]["rel_diff"] == pytest.approx(0.0)
    assert c["max_abs_rel_diff_train"] == pytest.approx(0.1)
    assert c["max_abs_rel_diff_train_after_switch"] == pytest.approx(0.1)
    assert c["max_abs_diff_train_after_switch"] == pytest.approx(0.1)
    # periodic validation at 20, 40, 60 and the final one on the validation set, kept apart
    assert [(r["iteration"], r["set"]) for r in c["validation_loss"]] == [
        (20, "periodic"), (40, "periodic"), (60, "periodic"), (60, "validation")]
    assert c["max_abs_rel_diff_validation_after_switch"] == pytest.approx(0.1 / 1.5)
    # windows: stage 1 = the intervals logged at 20 and 30 (the one at 10 holds start-up); the
    # switch comes at the end of iteration 30, so the intervals logged at 40, 50, 60 are stage 2
    step = c["step_time_median"]
    assert step["stage1"]["dense_ms"] == 100.0 and step["stage1"]["dsv_ms"] == 125.0
    assert step["stage1"]["intervals"] == [2, 2]
    assert step["stage2"]["dense_ms"] == 102.0 and step["stage2"]["dsv_ms"] == 90.0
    assert step["stage2"]["dsv_over_dense"] == pytest.approx(90.0 / 102.0)
    assert res["note"] == "synthetic"


def test_a_run_cut_short_keeps_its_error_and_compares_nothing(tmp_path):
    _write(tmp_path / "dense.log", [6.0, 5.0], [500.0, 100.0])
    (tmp_path / "dsv.log").write_text("\n".join([
        "Traceback (most recent call last):",
        '  File "pretrain_gpt.py", line 523, in <module>',
        "ValueError: 8 causal DSV layers would run sparse with --dsv-backend cudnn",
        "run_gpu_causal_gpt: exit code 124",
    ]) + "\n")
    res = report.build(str(tmp_path / "dense.log"), str(tmp_path / "dsv.log"))
    dsv, c = res["runs"]["dsv"], res["comparison"]
    assert dsv["train"] == [] and dsv["completed"] is False and dsv["exit_code"] == 124
    assert dsv["errors"] == ["ValueError: 8 causal DSV layers would run sparse with --dsv-backend cudnn"]
    assert c["train_loss"] == [] and c["max_abs_rel_diff_train"] is None and c["switch_iteration"] is None
    assert c["step_time_median"]["stage1"]["dsv_ms"] is None
    assert c["step_time_median"]["stage1"]["dense_ms"] == 100.0
    assert any("exit code 124" in line for line in report.summary_lines(res))


def test_without_a_switch_every_interval_is_stage_one(tmp_path):
    _write(tmp_path / "a.log", [3.0, 2.0, 1.0], [400.0, 50.0, 70.0])
    _write(tmp_path / "b.log", [3.0, 2.0, 1.2], [400.0, 60.0, 60.0])
    c = report.build(str(tmp_path / "a.log"), str(tmp_path / "b.log"))["comparison"]
    assert c["max_abs_rel_diff_train_after_switch"] is None
    assert c["max_abs_rel_diff_train"] == pytest.approx(0.2)
    assert c["step_time_median"]["stage1"]["dense_ms"] == 60.0 and c["step_time_median"]["stage2"]["intervals"] == [0, 0]
