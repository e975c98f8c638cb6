"""benchmarks/causal_attention.py: its block counting and density rule on known answers, its
row check catching a kernel that ignores the mask, its SDPA order equal to the DSV layer's, and
the CPU smoke path (Triton interpreter) end to end."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import causal_attention as ca
from megatron_dsv.ops.mask import CausalMask
from megatron_dsv.ops.sparse_attention import sparse_attention

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_allowed_blocks_and_k_for_density():
    # 512 tokens in chunks of 128, groups and blocks of 32: 4 groups per chunk reading 4, 8, 12, 16 blocks
    mask = CausalMask("chunk_causal", 128)
    allowed = ca.allowed_blocks(512, mask, 32, 32)
    assert allowed.tolist() == [4] * 4 + [8] * 4 + [12] * 4 + [16] * 4
    assert ca.k_for_density(allowed, 0.1, 1) == 1  # 16 of 160 blocks
    assert ca.k_for_density(allowed, 0.9, 1) == 12  # 4 * (4 + 8 + 12 + 12) = 144 of 160
    assert ca.k_for_density(allowed, 0.91, 1) == 13
    assert ca.k_for_density(allowed, 1.0, 1) == 16
    assert ca.k_for_density(allowed, 0.1, 3) == 3  # the mask's forced units are a floor


def test_chunks_must_be_whole_groups_and_blocks():
    with pytest.raises(ValueError, match="multiple of lcm"):
        ca.check_shape(512, 96, 32, 64)
    with pytest.raises(ValueError, match="divide S"):
        ca.check_shape(512, 192, 32, 64)
    ca.check_shape(512, 128, 32, 64)


def test_row_check_catches_a_kernel_that_ignores_the_mask():
    torch.manual_seed(0)
    s, chunk, d = 256, 64, 16
    q, k, v, do = (torch.randn(1, 2, s, d) for _ in range(4))
    args = ca.parse_args(["--device", "cpu", "--seqlen", str(s), "--chunk-tokens", str(chunk), "--group-size", "16",
                          "--kv-block", "16", "--check-seqlen", str(s), "--rank", "4"])
    index = ca.build_index(q, k, args, s, chunk, 16)  # every unit: the first chunks list filler units
    ref_fn = lambda q_, k_, v_: sparse_attention(q_, k_, v_, index, backend="reference")  # noqa: E731
    assert ca.check_rows(q, k, v, do, index, 2, fn=ref_fn)["ok"]
    # rows of the first chunk: with the mask dropped they read the filler units of later chunks
    first = dataclasses.replace(index, kv_idx=index.kv_idx[:, :, :4], seq_len_q=64, seq_len_kv=s)
    unmasked = dataclasses.replace(first, mask=None)
    wrong = lambda q_, k_, v_: sparse_attention(q_, k_, v_, unmasked, backend="reference")  # noqa: E731
    res = ca.check_rows(q[:, :, :64], k, v, do[:, :, :64], first, 2, fn=wrong)
    assert not res["ok"] and res["out"] > 10 * ca.CHECK_TOL, res


def test_sdpa_order_is_the_layers(monkeypatch):
    """The benchmark's dense chunk-causal row runs the backend the DSV layer's priority list picks."""
    import torch.nn.attention as tna

    from megatron_dsv.layers.attention import sdpa_backends

    seen = {}
    monkeypatch.setattr(tna, "sdpa_kernel", lambda order, set_priority=False: seen.update(order=order, prio=set_priority))
    sdpa_backends(type("CudaTensor", (), {"is_cuda": True})())
    assert seen == {"order": ca.sdpa_order(), "prio": True}


@pytest.mark.slow
def test_cpu_smoke_writes_checked_rows(tmp_path):
    out = tmp_path / "causal.json"
    env = dict(os.environ, TRITON_INTERPRET="1")
    cmd = [sys.executable, "benchmarks/causal_attention.py", "--device", "cpu", "--dtype", "fp32", "--seqlen", "512",
           "--heads", "2", "--head-dim", "32", "--chunk-tokens", "128", "--group-size", "32", "--kv-block", "32",
           "--check-seqlen", "256", "--check-groups", "2", "--fwd-stages", "2", "--out", str(out)]
    res = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert data["env"]["git_commit"] and data["env"]["gpu"] == "cpu"
    rows = {(r["kind"], r.get("density_target")): r for r in data["rows"]}
    assert {k for k, _ in rows} == {"check_whole", "sdpa_math_causal_dense", "sdpa_chunk_causal_dense",
                                    "ours_block_causal_dense", "ours_sparse"}
    assert rows[("sdpa_chunk_causal_dense", None)]["sdpa_backend"] == "MATH"
    for dens, k in ((1.0, 16), (0.9, 12), (0.1, 1)):
        r = rows[("ours_block_causal_dense" if dens == 1.0 else "ours_sparse", dens)]
        assert r["K"] == k and r["density_allowed_blocks"] == pytest.approx(dens)
        assert r["check_whole"] and r["check_rows"]["ok"] and r["fwd_bwd_ms"] > 0
        assert r["fwd_stages"] == 2  # --fwd-stages reaches every row of ours (checks and timing)
        assert r["pairs"] == round(dens * 160) * 32 * 32 * 2  # computed blocks x block pairs x heads
        # the Triton masked selection (timed) gives the reference's index; the interpreter is exact
        assert r["selection_same_as_reference"] == 1.0 and r["selection_reference_ms"] > 0
    assert rows[("ours_sparse", 0.1)]["speedup_vs_ours_block_causal_dense"] > 0
