"""benchmarks/granularity.py: density for a critical mass per query group x key block x ranking,
on planted cases with known answers, against a per-row loop, and end to end on a tiny checkpoint."""

import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from benchmarks import granularity as gran

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _densities(q, k, g, kbs, scale=1.0, mass=0.9):
    groups = torch.arange(q.shape[2] // g)
    curves = gran.granularity_curves(q, k, group_size=g, kv_blocks=kbs, groups=groups, scale=scale, critical_mass=mass)
    return {kb: gran.summarize(curves[kb]) for kb in kbs}


def test_oracle_and_lse_find_a_spike_that_mean_pooling_misses():
    """One key unit holds a single hot key among keys that point away: its mean-pooled score is
    the lowest, its mass 0.975 of every row. The oracle and LSE rankings need that one unit of
    four; mean pooling reads it last and needs all four."""
    s, g, kb, d = 64, 16, 16, 4
    e0 = torch.zeros(d)
    e0[0] = 1.0
    q = e0.expand(1, 1, s, d).clone()
    k = torch.zeros(1, 1, s, d)
    k[0, 0, :kb] = -2.0 * e0  # unit 0: mean score (8 - 30) / 16 = -1.375
    k[0, 0, 0] = 8.0 * e0  # ... but exp(8) of the mass
    k[0, 0, kb : 2 * kb] = 1.0 * e0  # unit 1: the best mean score, 16 e of the mass
    res = _densities(q, k, g, [kb])[kb]
    for rule in gran.RULES:
        assert res["oracle"][rule]["density"] == [0.25]
        assert res["lse"][rule]["density"] == [0.25]
        assert res["pooled"][rule]["density"] == [1.0]
    assert res["oracle"]["recall"]["recall"][0] == pytest.approx(0.9752, abs=1e-3)


def test_small_key_blocks_need_less_density_when_mass_sits_on_few_tokens():
    """Two hot keys far apart hold almost all the mass: two units either way, so 2 x 16 of 256
    keys with 16-key blocks and 2 x 64 with 64-key blocks."""
    gen = torch.Generator().manual_seed(0)
    s, d, g = 256, 8, 32
    q = 0.05 * torch.randn(1, 2, s, d, generator=gen)
    q[..., 0] += 1.0
    k = 0.05 * torch.randn(1, 2, s, d, generator=gen)
    k[:, :, 10, 0] = 20.0
    k[:, :, 200, 0] = 20.0
    res = _densities(q, k, g, [16, 64])
    for ranking in gran.RANKINGS:
        for rule in gran.RULES:
            d16, d64 = res[16][ranking][rule]["density"], res[64][ranking][rule]["density"]
            assert d16 == [0.125, 0.125] and d64 == [0.5, 0.5], (ranking, rule, d16, d64)


def _need_loop(p_rows, score_rows, mass):
    """Per row: units taken in descending score order until their mass reaches ``mass``."""
    need = []
    for p, sc in zip(p_rows, score_rows):
        order = sorted(range(len(sc)), key=lambda j: -float(sc[j]))
        total, n = 0.0, 0
        for j in order:
            total += float(p[j])
            n += 1
            if total >= mass:
                break
        need.append(n)
    return need


def test_curves_match_a_per_row_loop():
    """Mean and P75 need per head and ranking equal a plain loop over rows (GQA keys, B=2, a
    subset of groups), so the group-to-row broadcast, unit sums and rankings are wired right."""
    gen = torch.Generator().manual_seed(3)
    b, h, h_kv, s, d, g, kb, mass = 2, 4, 2, 64, 8, 16, 8, 0.8
    q = 1.5 * torch.randn(b, h, s, d, generator=gen)
    k = 1.5 * torch.randn(b, h_kv, s, d, generator=gen)
    groups = torch.tensor([0, 2, 3])
    curves = gran.granularity_curves(q, k, group_size=g, kv_blocks=[kb], groups=groups, scale=0.5, critical_mass=mass)
    res = gran.summarize(curves[kb])
    kx = k.repeat_interleave(h // h_kv, dim=1)
    u = s // kb
    for head in range(h):
        needs = {r: [] for r in gran.RANKINGS}
        for bi in range(b):
            for grp in groups.tolist():
                rows = range(grp * g, (grp + 1) * g)
                logits = q[bi, head, list(rows)] @ kx[bi, head].T * 0.5
                p = torch.softmax(logits.double(), -1).view(g, u, kb).sum(-1)
                scores = {
                    "oracle": p.sum(0),
                    "pooled": q[bi, head, list(rows)].mean(0) @ kx[bi, head].view(u, kb, d).mean(1).T,
                    "lse": torch.logsumexp(logits.view(g, u, kb).permute(1, 0, 2).reshape(u, -1), -1),
                }
                for r in gran.RANKINGS:
                    needs[r] += _need_loop(p, [scores[r]] * g, mass)
        for r in gran.RANKINGS:
            n = torch.tensor(needs[r], dtype=torch.float64)
            assert res[r]["mean"]["k"][head] == int(torch.ceil(n.mean())), (r, head)
            p75 = int(sorted(needs[r])[int(torch.ceil(torch.tensor(0.75 * len(needs[r])))) - 1])
            assert res[r]["p75"]["k"][head] == p75, (r, head)
            assert res[r]["recall"]["recall"][head] >= mass - 1e-6 or res[r]["recall"]["k"][head] == u


def test_relayout_puts_tokens_in_the_target_cube_order():
    from megatron_dsv.ops.layout import cube_major_positions

    grid, src, dst = (4, 8, 8), (2, 4, 4), (4, 4, 4)
    idx = gran.relayout_index(grid, src, dst)
    assert torch.equal(cube_major_positions(grid, src)[idx], cube_major_positions(grid, dst))
    with pytest.raises(ValueError, match="multiple of the query-group cube"):
        gran.relayout_index(grid, src, (3, 4, 4))


def test_bad_granularity_arguments_are_refused():
    with pytest.raises(ValueError, match="holds 32 tokens, not 64"):
        gran.group_cubes([64], "64=2x4x4")
    with pytest.raises(ValueError, match="no cube for query groups of 48"):
        gran.group_cubes([48])
    q = torch.randn(1, 1, 64, 4)
    with pytest.raises(ValueError, match="multiple of group_size=16 and of every kv block"):
        gran.granularity_curves(q, q, group_size=16, kv_blocks=[24], groups=torch.tensor([0]), scale=1.0,
                                critical_mass=0.9)


def test_capture_is_what_core_attention_computes(megatron_state):
    """Dense attention over the captured q/k/v reproduces every layer's core-attention output."""
    from benchmarks import quality

    setup = quality.Setup(size="tiny", data="procedural", num_classes=8, t_quantiles=8, val_seed=0,
                          **quality.SIZES["tiny"])
    model = quality.build_model(setup, "auto", "cpu")
    outs = {}
    from megatron_dsv.layers.attention import dsv_attention_layers

    layers = dsv_attention_layers(model)
    hooks = [a.register_forward_hook(lambda m, i, o: outs.__setitem__(id(m), o.detach())) for a in layers]
    videos = torch.randn(2, *setup.latent_shape)
    captured = gran.capture_qkv(model, videos, torch.tensor([1, 2]), 0.3, 0, "fp32")
    for h in hooks:
        h.remove()
    assert len(captured) == setup.num_layers
    for layer, q, k, v in captured:
        assert q.shape == (2, setup.num_heads, 128, setup.hidden_size // setup.num_heads)
        ref = F.scaled_dot_product_attention(q, k, v, scale=layer.softmax_scale)  # [b, h, s, d]
        got = outs[id(layer)].view(128, 2, setup.num_heads, -1).permute(1, 2, 0, 3)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def _run(script, args, timeout=150):
    env = dict(os.environ, TRITON_INTERPRET="1")
    for var in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", script), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


def test_end_to_end_on_a_tiny_checkpoint(tmp_path):
    """pretrain-dense -> granularity JSON: every layer x group x block x ranking x rule, the
    recall rule's K reaching the mass, and the GPU timing marked as skipped on a CPU."""
    _run("quality.py", ["pretrain-dense", "--size", "tiny", "--iters", "10", "--warmup", "2", "--out", str(tmp_path)])
    out = tmp_path / "gran.json"
    stdout = _run("granularity.py", ["--ckpt", str(tmp_path / "ckpt"), "--out", str(out), "--sample-groups", "2",
                                     "--critical-mass", "0.7"])
    assert "| G | KB | token |" in stdout
    res = json.load(open(out))
    assert res["seq_len"] == 128 and res["environment"]["commit"] and [r["layer"] for r in res["layers"]] == [1, 2]
    assert "skipped" in res["timing"] and "sparse_ms" not in res["timing"]
    for rec in res["layers"]:
        for g in ("32", "64"):
            entry = rec["granularity"][g]
            assert entry["rows"] == 2 * int(g)
            assert all(0 < x <= 1 for x in entry["token_density"])
            for kb in ("16", "32", "64"):
                units = 128 // int(kb)
                for ranking in gran.RANKINGS:
                    for rule in gran.RULES:
                        r = entry[kb][ranking][rule]
                        assert len(r["k"]) == 4 and all(1 <= x <= units for x in r["k"])
                        assert r["density"] == [round(x / units, 6) for x in r["k"]]
                    rr = entry[kb][ranking]["recall"]
                    assert all(rec_ >= 0.7 - 1e-6 for rec_ in rr["recall"])


def test_the_timed_sparse_step_runs_the_triton_path(megatron_state):
    """The closure the GPU times (projection, Triton selection, Triton attention fwd+bwd) runs
    under the interpreter at a granularity of the benchmark and matches the reference path."""
    from benchmarks import quality

    setup = quality.Setup(size="tiny", data="procedural", num_classes=8, t_quantiles=8, val_seed=0,
                          **quality.SIZES["tiny"])
    model = quality.build_model(setup, "auto", "cpu")
    layer, q, k, v = gran.capture_qkv(model, torch.randn(1, *setup.latent_shape), None, 0.5, 0, "fp32")[0]
    kh = torch.tensor([1, 2, 3, 4])
    grads = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)  # the same output gradient
        step, leaves = gran.sparse_step(layer, q, k, v, 32, 16, kh, backend=backend)
        step()
        grads[backend] = [x.grad for x in leaves]
    for got, ref in zip(grads["triton"], grads["reference"]):
        assert got.abs().sum() > 0
        torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)


def test_timing_plan_times_each_distinct_k_once_and_honours_the_deadline(megatron_state, monkeypatch, capsys):
    """The GPU timing loop, with stand-in timers: one dense time, one sparse time per distinct
    (G, KB, K per head) reused across layers, every ranking in order, the deadline leaving the
    rest listed as skipped, and the table summing the layers."""
    import argparse

    from benchmarks import quality

    setup = quality.Setup(size="tiny", data="procedural", num_classes=8, t_quantiles=8, val_seed=0,
                          **quality.SIZES["tiny"])
    model = quality.build_model(setup, "auto", "cpu")
    captured = gran.capture_qkv(model, torch.randn(1, *setup.latent_shape), None, 0.5, 0, "fp32")
    cubes, kbs = gran.group_cubes([32]), [16, 64]
    layers = []
    for layer, q, k, _ in captured:
        curves = gran.granularity_curves(q, k, group_size=32, kv_blocks=kbs, groups=torch.arange(4),
                                         scale=layer.softmax_scale, critical_mass=0.9)
        rec = {"layer": layer.layer_number, "granularity": {"32": {"token_density": [0.5] * 4}}}
        rec["granularity"]["32"].update({str(kb): gran.summarize(curves[kb]) for kb in kbs})
        layers.append(rec)
    # both layers get the same K per head: a distinct K is timed once
    layers[1]["granularity"]["32"] = layers[0]["granularity"]["32"]
    calls, dtypes = [], set()
    monkeypatch.setattr(gran, "time_dense", lambda q, k, v, *a: dtypes.add(q.dtype) or 10.0)
    monkeypatch.setattr(gran, "time_sparse", lambda layer, q, k, v, g, kb, kh, *a: calls.append((g, kb, kh.tolist())) or
                        dtypes.add(q.dtype) or 1.0 + kb)
    # the capture is fp32; a bf16 run is timed in bf16 (cuDNN's SDPA has no fp32 kernel)
    res = {"layers": layers, "group_cubes": {"32": [2, 4, 4]}, "kv_blocks": kbs, "critical_mass": 0.9, "t": 0.5,
           "seq_len": 128, "precision": "bf16"}
    args = argparse.Namespace(time_batch=1, time_rule="recall", warmup=1, rep=1, deadline_s=0, out=None)
    timing = gran.time_all(args, res, captured, cubes, kbs, ["pooled", "oracle"], (4, 4, 8), model.cube, True, 0.0)
    distinct = {(32, kb, tuple(layers[0]["granularity"]["32"][str(kb)][r]["recall"]["k"])) for kb in kbs
                for r in ("pooled", "oracle")}
    assert len(calls) == len(distinct) and timing["dense_ms"] == 10.0 and not timing["skipped"]
    assert dtypes == {torch.bfloat16}
    assert timing["sparse_ms"]["G32_KB64_oracle"] == {"1": 65.0, "2": 65.0}
    gran.print_table({**res, "timing": timing})
    assert "| 32 | 64 |" in capsys.readouterr().out.split("| 32 | 16 |")[1]
    late = gran.time_all(argparse.Namespace(**{**vars(args), "deadline_s": 1e-9}), res, captured, cubes, kbs,
                         ["pooled"], (4, 4, 8), model.cube, True, 0.0)
    assert late["sparse_ms"] == {} and len(late["skipped"]) == 4
