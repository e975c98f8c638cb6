"""benchmarks/text_attention_probe.py: its mock data is MockGPTDataset's documents, its RoPE scores
depend only on the offset, uniform attention needs more key units than attention to the diagonal,
and a tiny run writes its profiles."""

from __future__ import annotations

import json

import numpy
import pytest
import torch

pytest.importorskip("megatron.core.datasets.indexed_dataset")

from benchmarks import text_attention_probe as probe  # noqa: E402
from benchmarks.text_corpus import EOD  # noqa: E402


def test_mock_stream_is_mockgptdataset_documents():
    s = probe.mock_stream(50_000, seed=3)
    ends = numpy.flatnonzero(s == EOD)
    assert s.size == 50_000 and ends.size >= 10
    start = 0
    for e in ends:
        assert s[start:e].tolist() == [(i + 1) % EOD for i in range(e - start)]
        start = e + 1


def test_rope_scores_depend_on_offset_only():
    q, k = torch.randn(1, 1, 1, 8).expand(1, 1, 32, 8), torch.randn(1, 1, 1, 8).expand(1, 1, 32, 8)
    scores = probe._rope(q)[0, 0] @ probe._rope(k)[0, 0].T
    for off in (0, 3, 17):
        diag = torch.diagonal(scores, -off)
        torch.testing.assert_close(diag, diag[:1].expand_as(diag), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(torch.diagonal(scores, 0)[0], torch.diagonal(scores, -3)[0])


def test_uniform_attention_needs_more_units_than_local(monkeypatch):
    torch.manual_seed(0)
    model = probe.TinyGPT(layers=1, hidden=128, heads=1)  # head dim 128 = S: a one-hot q, k per position
    tokens = torch.randint(0, 256, (1, 128))
    uniform = probe.layer_stats(model, tokens, block=16, target=0.9, uniform=True)[0]
    # a layer whose every query matches only itself: all mass on the diagonal key
    orig = probe._rope
    monkeypatch.setattr(probe, "_rope", lambda x: 50.0 * torch.eye(x.shape[2], x.shape[3]).expand_as(x))
    local = probe.layer_stats(model, tokens, block=16, target=0.9)[0]
    monkeypatch.setattr(probe, "_rope", orig)
    assert local["token_sparsity"] > 0.9 > uniform["token_sparsity"]
    assert local["density"] < 0.5 < uniform["density"]


def test_tiny_run_writes_profiles(tmp_path):
    out = tmp_path / "p.json"
    r = probe.main(["--data", "mock", "--seq", "64", "--block", "16", "--hidden", "32", "--heads", "1",
                    "--batch", "2", "--steps", "2", "--profile-every", "1", "--eval-windows", "1",
                    "--threads", "1", "--out", str(out)])
    saved = json.loads(out.read_text())
    assert [p["step"] for p in saved["profiles"]] == [0, 1, 2] and len(saved["train_bits"]) == 2
    assert all(len(p["layers"]) == 2 and 0 < p["layers"][0]["density"] <= 1 for p in saved["profiles"])
    assert saved["profiles"] == json.loads(json.dumps(r["profiles"]))
    with pytest.raises(ValueError, match="multiple of --block"):
        probe.main(["--data", "mock", "--seq", "60", "--block", "16"])
