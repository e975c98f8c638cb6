"""benchmarks/attention.py and attention_report.py: the report on synthetic rows with known
answers, the peers' index mappings, and the CPU smoke path of the benchmark (Triton interpreter),
where an unimportable cuDNN and a FlexAttention that cannot run are rows that say why."""

import json
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import attention_report as rep
from benchmarks import sparse_peers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _dense(s, d, ms):
    return {"kind": "cudnn_dense", "S": s, "D": d, "sparsity": 0.0, "fwd_ms": ms / 3, "bwd_ms": 2 * ms / 3, "fwd_bwd_ms": ms}


def _timed(kind, s, d, sp, speedup, dense_ms, **extra):
    total = dense_ms / speedup
    return {"kind": kind, "S": s, "D": d, "sparsity_nominal": sp, "sparsity": sp - 0.001, "G": 64,
            "select_ms": 0.5, "fwd_bwd_ms": total - 0.5, "total_ms": total, "speedup_fwd_bwd": speedup, **extra}


def synthetic():
    s = 65536
    rows = [_dense(s, 128, 200.0), _dense(s, 64, 100.0)]
    rows += [
        _timed("dsv_kvb64", s, 128, 0.9, 8.5, 200.0, check={"ok": True}),
        _timed("dsv_kvb64", s, 128, 0.95, 14.0, 200.0),
        _timed("dsv_kvb64", s, 64, 0.9, 7.9, 100.0),
        _timed("dsv_kvb64", s, 64, 0.95, 16.0, 100.0),
        # token rows and other group sizes are not the "ours" column
        _timed("dsv_kvb1", s, 128, 0.9, 1.4, 200.0, kv_block=1),
        _timed("cudnn_block_sparse", s, 128, 0.9, 7.5, 200.0, status="ok", check={"ok": True}),
        _timed("cudnn_block_sparse", s, 128, 0.95, 14.5, 200.0, status="ok"),
        {"kind": "cudnn_block_sparse", "S": s, "D": 64, "sparsity_nominal": 0.9, "status": "unsupported",
         "reason": "head dim is 64; cuDNN's SM90 block-sparse backward supports 128 only"},
        {"kind": "cudnn_block_sparse", "S": s, "D": 64, "sparsity_nominal": 0.95, "status": "not_importable",
         "reason": "No module named 'cudnn'"},
        # faster than ours but wrong: shown, never the best peer
        _timed("flex_block128", s, 128, 0.9, 9.0, 200.0, check={"ok": False, "out": 0.5}),
        _timed("flex_block128", s, 64, 0.9, 8.0, 100.0),
        {"kind": "flex_block64", "S": s, "D": 128, "sparsity_nominal": 0.9, "error": "InductorError: no config",
         "error_stage": "first call"},
        {"kind": "flex_block64", "S": s, "D": 64, "sparsity_nominal": 0.95, "skipped": "time budget of 480 s spent"},
    ]
    return {"env": {"gpu": "NVIDIA H200", "torch": "2.11", "triton": "3.6", "git_commit": "abc"},
            "args": {"batch": 1, "heads": 16}, "rows": rows}


def test_targets_met_and_missed_with_numbers():
    got = {t["target"]: t for t in rep.targets(synthetic()["rows"])}
    assert got[">= x8 at 90%, S=65536, D=128"]["met"] is True
    assert got[">= x8 at 90%, S=65536, D=128"]["value"] == pytest.approx(8.5)
    assert got[">= x15 at 95%, S=65536, D=128"]["met"] is False
    assert got[">= x8 at 90%, S=65536, D=64"]["met"] is False
    assert got[">= x15 at 95%, S=65536, D=64"]["met"] is True
    peer = got["not slower than the best peer on any row"]
    # D=128 90%: cuDNN x7.5 (flex x9.0 failed its check) < ours x8.5; D=128 95%: cuDNN x14.5 > x14.0;
    # D=64 90%: flex-128 x8.0 > x7.9; D=64 95%: no timed peer, not compared
    assert peer["met"] is False and peer["rows_compared"] == 3
    assert len(peer["rows_slower"]) == 2 and peer["detail"].startswith("slower on 2 of 3 rows: ")
    assert "D=128 0.95: ours x14.00 vs cuDNN block-sparse 64x64 x14.50" in peer["rows_slower"][0] + peer["rows_slower"][1]


def test_a_failed_own_check_misses_the_target():
    rows = [_dense(65536, 128, 200.0), _timed("dsv_kvb64", 65536, 128, 0.9, 9.0, 200.0, check={"ok": False})]
    t = rep.targets(rows)[0]
    assert t["met"] is False and "check failed" in t["detail"]


def test_table_shows_every_peer_column_and_why_cells_are_empty():
    text = rep.report(synthetic())
    lines = text.splitlines()
    head = next(x for x in lines if x.startswith("| S |"))
    assert head == ("| S | D | sparsity | dense fwd+bwd ms | ours | cuDNN block-sparse 64x64 | Flex 128x128 | Flex 64x64 "
                    "| best peer | ours / best peer |")
    row = next(x for x in lines if x.startswith("| 65536 | 128 | 0.9 |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[3] == "200.00"
    assert cells[4] == "x8.50 (23.53 ms)"
    assert cells[6].endswith("CHECK FAILED")
    assert cells[7].startswith("failed (first call): InductorError")
    assert cells[8] == "cuDNN block-sparse 64x64" and cells[9] == f"{8.5 / 7.5:.2f}"
    row = next(x for x in lines if x.startswith("| 65536 | 64 | 0.95 |"))
    assert "not importable" in row and "skipped (time budget)" in row and "| none |" in row
    assert "unsupported: head dim is 64" in next(x for x in lines if x.startswith("| 65536 | 64 | 0.9 |"))
    assert "- >= x15 at 95%, S=65536, D=128: MISSED (x14.00)" in lines
    assert "- >= x8 at 90%, S=65536, D=128: met (x8.50)" in lines


def test_report_cli_reads_and_merges_files(tmp_path, capsys):
    data = synthetic()
    a, b = tmp_path / "a.json", tmp_path / "b.json"
    a.write_text(json.dumps({**data, "rows": data["rows"][:6]}))
    b.write_text(json.dumps({**data, "rows": data["rows"][6:]}))
    rep.main([str(a), str(b), "--out", str(tmp_path / "t.md")])
    assert (tmp_path / "t.md").read_text().strip() == rep.report(data).strip()


def test_flex_block_mask_lists_the_index_blocks():
    """FlexAttention's block mask of an index holds exactly its blocks, per head (K differs per head)."""
    from megatron_dsv.ops.selection import select_topk

    b, h, s, blk = 2, 3, 512, 64
    index = select_topk(torch.randn(b, h, s, 8), torch.randn(b, h, s, 8), blk, 3, kv_block=blk, backend="reference")
    index = sparse_peers.SparseIndex(index.kv_idx, torch.tensor([[3, 1, 2], [2, 3, 1]], dtype=torch.int32),
                                     blk, blk, s, s)
    want = torch.zeros(b, h, s // blk, s // blk, dtype=torch.bool)
    for bi in range(b):
        for hi in range(h):
            kk = int(index.kv_count[bi, hi])
            for g in range(s // blk):
                want[bi, hi, g, index.kv_idx[bi, hi, g, :kk].long()] = True
    got = sparse_peers.flex_block_mask(index).to_dense().bool()
    assert torch.equal(got, want)


def test_random_block_index_density_and_order():
    ix = sparse_peers.random_block_index(1, 2, 1024, 128, 3, "cpu", seed=1)
    assert ix.kv_idx.shape == (1, 2, 8, 3) and ix.group_size == ix.kv_block == 128
    assert bool((ix.kv_idx[..., 1:] > ix.kv_idx[..., :-1]).all())
    assert ix.computed_pairs() == 2 * 1024 * 3 * 128
    with pytest.raises(ValueError, match="k_blocks=9"):
        sparse_peers.random_block_index(1, 1, 1024, 128, 9, "cpu")


def test_cudnn_status_tells_unimportable_from_unsupported(monkeypatch):
    from megatron_dsv.ops.selection import select_topk

    q = torch.randn(1, 2, 128, 128, dtype=torch.bfloat16)
    index = select_topk(torch.randn(1, 2, 128, 8), torch.randn(1, 2, 128, 8), 64, 1, kv_block=64, backend="reference")
    monkeypatch.setattr(sparse_peers, "cudnn_import_error", lambda: "No module named 'cudnn'")
    assert sparse_peers.cudnn_status(q, q, index) == ("not_importable", "No module named 'cudnn'")
    monkeypatch.setattr(sparse_peers, "cudnn_import_error", lambda: None)
    status, why = sparse_peers.cudnn_status(q, q, index)
    assert status == "unsupported" and "CUDA" in why


def test_sweep_entries_name_their_kernel_options():
    """--sweep's entries: tiles go to KernelOptions.tune of their kernel, "contig"/"tma" to the
    variant fields; every kernel has its defaults and the tma variant of them side by side."""
    from benchmarks import attention
    from megatron_dsv.ops.options import KernelOptions

    assert attention.sweep_options("dq", dict(BLOCK_N=64, num_stages=3, tma=True)) == KernelOptions(
        tma=True, tune={"dq": {"BLOCK_N": 64, "num_stages": 3}})
    assert attention.sweep_options("fwd", dict(contig=False)) == KernelOptions(
        contig_loads=False, tma=False, tune={"fwd": {}})
    assert attention.sweep_options("dkdv", dict(tma=True)) == KernelOptions(tma=True, tune={"dkdv": {}})
    assert attention.sweep_options("dkdv", dict()).tma is False  # an entry without "tma": pointer loads
    assert attention.sweep_options("fused", dict(num_warps=4)) == KernelOptions(
        fused_dq_atomic=True, tma=False, tune={"dkdv": {"num_warps": 4}})
    for kind, variants in attention.SWEEP.items():
        for variant in variants:
            attention.sweep_options(kind, variant)  # every entry is a valid KernelOptions
    for kind in ("fwd", "dq", "dkdv"):
        assert {} in attention.SWEEP[kind] and {"tma": True} in attention.SWEEP[kind]



def test_sweep_order_puts_every_kernels_defaults_and_tma_first():
    """A sweep cut by its time budget still has, per kernel, the defaults and their tma twin: the
    order is round-robin over the kernels; key-major kernels are left out for token keys."""
    from benchmarks import attention
    from megatron_dsv.ops.options import KernelOptions

    order = list(attention.sweep_order(64))
    assert len(order) == sum(len(v) for v in attention.SWEEP.values())
    n_kernels = len(attention.SWEEP)
    head = order[:2 * n_kernels]
    for kind in ("fwd", "dq", "dkdv"):
        assert (kind, {}) in head and (kind, {"tma": True}) in head
    assert [kind for kind, _ in order[:n_kernels]] == list(attention.SWEEP)
    token = list(attention.sweep_order(1))
    assert {kind for kind, _ in token} == {"fwd", "dq"}
    assert len(token) == len(attention.SWEEP["fwd"]) + len(attention.SWEEP["dq"])
    # --sweep-kernels dkdv: its variants only, the dkdv_transposed pair among the first four
    dkdv = list(attention.sweep_order(16, ("dkdv",)))
    assert [kind for kind, _ in dkdv] == ["dkdv"] * len(attention.SWEEP["dkdv"])
    assert {"tma": True, "trans": False} in [v for _, v in dkdv[:4]] and {"tma": True, "trans": True} in [v for _, v in dkdv[:4]]
    assert attention.sweep_options("dkdv", dict(tma=True, trans=False)) == KernelOptions(
        tma=True, dkdv_transposed=False, tune={"dkdv": {}})
    assert attention.sweep_options("dkdv", dict()).dkdv_transposed is None  # absent: the library default
    assert list(attention.sweep_order(1, ("dkdv",))) == []  # token keys: no key-major kernel to sweep

def _smoke(tmp_path, *extra):
    # a stand-in `cudnn` package that fails to import, whether or not the real one is installed
    fake = tmp_path / "fake" / "cudnn"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('stand-in: cudnn hidden by the test')\n")
    out = tmp_path / "smoke.json"
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": f"{tmp_path / 'fake'}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, os.path.join(ROOT, "benchmarks", "attention.py"), "--device", "cpu", "--dtype", "fp32",
           "--seqlens", "128", "--head-dims", "32", "--heads", "2", "--rank", "8", "--sparsities", "0.5,0.75",
           "--kv-blocks", "64", "--out", str(out), *extra]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(out.read_text()), res.stdout


def test_cpu_smoke_records_every_peer(tmp_path):
    data, stdout = _smoke(tmp_path, "--flex-blocks", "64")
    rows = data["rows"]
    kinds = [r["kind"] for r in rows]
    assert kinds == ["sdpa_math_dense", "dsv_kvb64", "cudnn_block_sparse", "flex_block64",
                     "dsv_kvb64", "cudnn_block_sparse", "flex_block64"]
    ours = [r for r in rows if r["kind"] == "dsv_kvb64"]
    assert ours[0]["check"]["ok"] and "first_call" in ours[0] and "check" not in ours[1]
    assert ours[0]["check"]["out"] < 1e-4 and ours[0]["check"]["dk"] < 1e-4
    for r in rows:
        if r["kind"] == "cudnn_block_sparse":
            assert r["status"] == "not_importable" and "stand-in: cudnn hidden by the test" in r["reason"]
    flex = [r for r in rows if r["kind"] == "flex_block64"]
    for r in flex:
        # FlexAttention has no CPU backward in torch 2.11; where a later torch has one, the row is timed
        # and checked against the reference (on our index: also against ours)
        if "error" in r:
            assert "\n" not in r["error"] and r["error_stage"] in ("build", "first call", "check", "timing")
        else:
            assert r["fwd_bwd_ms"] > 0
            if "check" in r:
                assert r["check"]["ok"] and r["check"]["vs_ours"]["out"] < 1e-4
    if flex[0].get("error_stage") == "first call":
        assert flex[1]["error"] == flex[0]["error"] and "not_retried" in flex[1]
    assert "| cuDNN block-sparse 64x64 | Flex 64x64 |" in stdout and "not importable" in stdout


def test_cpu_smoke_time_budget_skips_are_rows(tmp_path):
    data, stdout = _smoke(tmp_path, "--flex-blocks", "", "--time-budget-s", "1e-9")
    assert [(r["kind"], r["S"], r["D"]) for r in data["rows"]] == [("shape", 128, 32)]
    assert data["rows"][0]["skipped"].startswith("time budget")
    assert "skipped (time budget)" in stdout


def test_flex_turns_off_donated_buffers_before_compiling(monkeypatch):
    """The timing repeats one backward (retain_graph=True), which a compiled backward with donated
    buffers refuses, checked against the global setting when the backward runs: every Flex row
    failed so on an H200 (f17f4b1 without, 283790d with a patch around the forward only)."""
    import torch._functorch.config

    from benchmarks.sparse_peers import FlexPeer

    monkeypatch.setattr(torch._functorch.config, "donated_buffer", True)
    peer = FlexPeer()
    assert torch._functorch.config.donated_buffer is True  # nothing changes before a Flex row
    peer._fn()
    assert torch._functorch.config.donated_buffer is False


def test_cuda_context_lost_names_the_error(monkeypatch):
    """The sweep ends with an 'aborted' row instead of a traceback once a variant has poisoned the
    CUDA context (an illegal memory access ended the c21a846 sweep at torch.cuda.empty_cache)."""
    from benchmarks import attention

    def broken():
        raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore text")

    monkeypatch.setattr(attention.torch.cuda, "synchronize", broken)
    assert attention.cuda_context_lost() == "RuntimeError: CUDA error: an illegal memory access was encountered"
    monkeypatch.setattr(attention.torch.cuda, "synchronize", lambda: None)
    zeros = torch.zeros
    monkeypatch.setattr(attention.torch, "zeros", lambda *a, **k: zeros(1))  # a CPU stand-in for the probe
    assert attention.cuda_context_lost() is None


def test_sweep_pick_keeps_the_named_entries_in_round_robin_order():
    """--sweep-pick times only the named SWEEP entries of the kernels it names (the pipeline-depth
    call of issue 15 picks 10 of 44), and refuses an index the list does not have, before any run."""
    import argparse

    from benchmarks import attention

    pick = attention.parse_sweep_pick("fwd=1,12;dq=11")
    assert pick == {"fwd": [1, 12], "dq": [11]}
    order = list(attention.sweep_order(64, ("fwd", "dq"), pick))
    assert order == [("fwd", attention.SWEEP["fwd"][1]), ("dq", attention.SWEEP["dq"][11]),
                     ("fwd", attention.SWEEP["fwd"][12])]
    assert len(list(attention.sweep_order(64, ("dkdv",), pick))) == len(attention.SWEEP["dkdv"])
    with pytest.raises(argparse.ArgumentTypeError, match="no entries"):
        attention.parse_sweep_pick(f"dq={len(attention.SWEEP['dq'])}")
    with pytest.raises(argparse.ArgumentTypeError, match="unknown kernel"):
        attention.parse_sweep_pick("bwd=0")
