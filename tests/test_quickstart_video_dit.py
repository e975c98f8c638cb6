"""The tiny video-DiT quickstart, as CI runs it: stage switch, sparse layers, close to dense."""

import importlib.util
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_video_dit_quickstart(megatron_state, monkeypatch):
    spec = importlib.util.spec_from_file_location("qs_dit", os.path.join(ROOT, "examples", "quickstart_video_dit.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    monkeypatch.setattr(sys, "argv", ["quickstart_video_dit.py", "--device", "cpu", "--speed-table", "assume"])
    res = mod.main()
    assert sum("stage switch" in line for line in res["log"]) == 1
    assert any(a.sparse for a in res["layers"])  # at least one layer runs sparse attention
    assert abs(res["sparse_loss"] / res["dense_loss"] - 1) < 0.05
    assert torch.isfinite(res["video"]).all()
