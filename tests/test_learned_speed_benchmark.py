"""benchmarks/learned_speed.py: the transplant of learned K from an arms JSON, and a CPU smoke run."""

import json
import os
import subprocess
import sys

import pytest

from benchmarks import learned_speed as ls

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# the tiny quality setup: 4x8x16 latents, patch 1x2x2 -> 128 tokens, 16 key blocks of 8
SETUP = {"latent_shape": [4, 4, 8, 16], "patch": [1, 2, 2], "query_group": [2, 2, 4], "kv_block": 8}
LAYERS = [{"layer": 1, "sparse": True, "k": [4, 8, 16, 3]}, {"layer": 2, "sparse": False, "k": None}]


def _arms(tmp_path, layers=LAYERS):
    arms = {"setup": SETUP, "runs": [
        {"arm": "dense", "seed": 0, "layers": []},
        {"arm": "dsv", "seed": 0, "layers": layers},
        {"arm": "dsv", "seed": 1, "layers": [{"layer": 1, "sparse": True, "k": [1, 1, 1, 1]}] + layers[1:]},
    ]}
    path = tmp_path / "arms.json"
    path.write_text(json.dumps(arms))
    return path, arms


def test_transplant_keeps_density_per_head_and_dense_layers_dense():
    assert ls.source_units(SETUP) == 16
    # 32 units here: twice the source's, so K doubles; 6 heads read source heads 0,1,2,3,0,1;
    # layer 3 is source layer 1 again (modulo), layer 2 stays dense
    plan = ls.transplant(LAYERS, 16, num_layers=3, num_heads=6, units=32)
    assert plan == [[8, 16, 32, 6, 8, 16], None, [8, 16, 32, 6, 8, 16]]
    # fewer units: ceil keeps at least the density, and at least one unit
    assert ls.transplant(LAYERS, 16, 1, 4, units=5) == [[2, 3, 5, 1]]
    with pytest.raises(ValueError, match=r"outside \[1, 16\]"):
        ls.transplant([{"layer": 1, "sparse": True, "k": [17]}], 16, 1, 1, 16)


def test_source_run_picks_the_seed_and_refuses_what_is_missing(tmp_path):
    _, arms = _arms(tmp_path)
    assert ls.source_run(arms, None)["seed"] == 0 and ls.source_run(arms, 1)["layers"][0]["k"] == [1, 1, 1, 1]
    with pytest.raises(ValueError, match="no dsv run of seed 7"):
        ls.source_run(arms, 7)


def test_cpu_smoke_run(tmp_path):
    """Three tiny layers, 256 tokens, on the CPU: layers 1 and 3 sparse at the transplanted K
    (16 units here, as in the source), layer 2 dense; both steps timed."""
    path, _ = _arms(tmp_path)
    out = tmp_path / "speed.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    for var in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    proc = subprocess.run(
        [sys.executable, os.path.join(ROOT, "benchmarks", "learned_speed.py"), "--arms", str(path), "--seqlen", "256",
         "--layers", "3", "--hidden", "128", "--heads", "4", "--ffn", "256", "--kv-block", "16", "--cpu-steps", "1",
         "--device", "cpu", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "| S | layers | dense ms" in proc.stdout
    res = json.load(open(out))
    assert res["source"]["label"] == f"transplanted from {path}" and res["source"]["seed"] == 0
    assert res["units"] == 16 and res["query_group"] == [2, 2, 4]
    assert [l["sparse"] for l in res["per_layer"]] == [True, False, True]
    assert res["per_layer"][0]["k_transplanted"] == [4, 8, 16, 3]
    # the layer runs what the runtime would: --dsv-min-keys 64 = 4 blocks of 16 lifts K=3 to 4
    assert res["per_layer"][0]["k_used"] == [4, 8, 16, 4] and "DSV sparse" in res["per_layer"][0]["path"]
    assert "dense" in res["per_layer"][1]["path"] and res["per_layer"][1]["k_used"] is None
    assert res["dense_ms"] > 0 and res["dsv_ms"] > 0 and res["dense_peak_gib"] is None
