"""The README's quickstart, run as CI runs it: learns structured attention, switches, stays close."""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_quickstart_switches_to_sparse(megatron_state, monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("quickstart", os.path.join(ROOT, "examples", "quickstart.py"))
    quickstart = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quickstart)
    monkeypatch.setattr(sys, "argv", ["quickstart.py", "--device", "cpu"])
    result = quickstart.main()
    out = capsys.readouterr().out
    stats = result["stats"]
    # stage 1: the predictor learned (paper's switch threshold 0.01), layer 1 learned sparse heads
    assert all(float(s["loss"]) < 0.02 for s in stats)
    assert float(stats[0]["sparsity"].mean()) > 0.8
    assert float(stats[0]["recall"].mean()) > 0.85
    assert "DSV sparse" in out and "stays dense" in out
    # switching changed the model's output only a little
    assert result["relative_difference"] < 0.05
