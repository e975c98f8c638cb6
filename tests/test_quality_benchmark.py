"""benchmarks/quality.py and quality_report.py: the paired protocol end to end at tiny size on CPU
(two subprocesses, one per phase, as the device calls run them), and their pieces."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from benchmarks import quality_report as report

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout=400):  # 150 s timed out with the 2 cores at load 13-27 (other helpers)
    env = dict(os.environ, TRITON_INTERPRET="1")
    for var in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(var, None)
    res = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "quality.py"), *args], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=timeout)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res.stdout


@pytest.mark.slow
def test_protocol_end_to_end_at_tiny_size(tmp_path):
    """pretrain-dense -> checkpoint files -> every arm over 3 seeds -> report (about 40 s on 2 idle cores)."""
    out = tmp_path / "procedural"
    _run(["pretrain-dense", "--size", "tiny", "--iters", "20", "--batch", "4", "--lr", "1e-3", "--warmup", "5",
          "--eval-every", "10", "--out", str(out)])
    manifest = json.load(open(out / "ckpt" / "manifest.json"))
    assert manifest["format"] == "megatron_dsv.quality_ckpt/1" and manifest["iteration"] == 20
    assert all(os.path.getsize(out / "ckpt" / e["file"]) <= 16 * 2**20 for e in manifest["files"])
    pre = json.load(open(out / "pretrain.json"))
    assert [p["iteration"] for p in pre["val_curve"]] == [10, 20] and len(pre["train_loss"]) == 20

    arms_json = tmp_path / "arms.json"
    _run(["arms", "--ckpt", str(out / "ckpt"), "--iters", "12", "--batch", "2", "--lr", "1e-3", "--warmup", "3",
          "--eval-every", "6", "--seeds", "0,1,2", "--arms", "control,dense,dsv,aa", "--out", str(arms_json),
          "--dsv", "speed_table=assume"])  # CPU: the reference sparse path need not beat dense; the rule lets DSV go sparse
    res = json.load(open(arms_json))
    runs = {(r["arm"], r["seed"]): r for r in res["runs"]}
    assert set(runs) == {(a, s) for a in ("dense", "dsv", "control", "aa") for s in (0, 1, 2)}
    # each arm starts from the checkpoint: the first evaluation of every arm is close to the checkpoint's
    for seed in (0, 1, 2):
        dense, dsv, control, aa = (runs[(a, seed)] for a in ("dense", "dsv", "control", "aa"))
        switch = dsv["switch_iteration"]
        assert switch is not None and switch < 12
        assert any(any(sp for sp, _ in s["layers"]) for s in dsv["schedule"])  # DSV went sparse
        # same data order and noise: DSV's stage 1 (dense attention) is the dense arm's, step by step
        assert dsv["train_loss"][: switch + 1] == dense["train_loss"][: switch + 1]
        # the control replays DSV's schedule with random blocks: dense before, different after
        assert control["train_loss"][: switch + 1] == dense["train_loss"][: switch + 1]
        assert control["train_loss"][switch + 1 :] != dsv["train_loss"][switch + 1 :]
        assert [l["k"] for l in control["layers"]] == [k for _, k in dsv["schedule"][-1]["layers"]]
        # the A/A repeat draws other data and noise
        assert aa["data_seed"] == seed + 1000 and aa["train_loss"][0] != dense["train_loss"][0]
        # per-layer statistics the report reads
        for layer in dsv["layers"]:
            assert 0 < layer["density"] <= 1 and len(layer["recall_exact_at_k"]) == 4
        assert dsv["final"]["iteration"] == 12 and len(dsv["final"]["loss_by_t"]) == 8
        assert "dense" in dsv["final"] or not dsv["final"]["sparse_layers"]
        assert dsv["step_time"]["stage2"]["steps"] > 0

    rep = report.main([str(arms_json), "--md", str(tmp_path / "q.md"), "--png", str(tmp_path / "q.png")])
    text = open(tmp_path / "q.md").read()
    for label in ("DSV - dense", "DSV forced dense - dense", "control (random blocks) - dense", "A/A dense"):
        assert label in text
    assert os.path.getsize(tmp_path / "q.png") > 10_000
    row = next(r for r in rep["procedural"]["paired"] if r["comparison"] == "DSV - dense")
    expect = [100 * (runs[("dsv", s)]["final"]["loss"] / runs[("dense", s)]["final"]["loss"] - 1) for s in (0, 1, 2)]
    assert row["diff_pct"] == pytest.approx(expect) and row["n"] == 3

    # the control alone, in a later call, replays the dsv schedule of the first (and evaluating
    # less often does not change its training)
    again = tmp_path / "control.json"
    _run(["arms", "--ckpt", str(out / "ckpt"), "--iters", "12", "--batch", "2", "--lr", "1e-3", "--warmup", "3",
          "--seeds", "1", "--arms", "control", "--replay", str(arms_json), "--out", str(again)])
    assert json.load(open(again))["runs"][0]["train_loss"] == runs[("control", 1)]["train_loss"]


def test_t_quantiles():
    stats = pytest.importorskip("scipy.stats")
    for df in range(1, 61):
        assert report.t_quantile_975(df) == pytest.approx(stats.t.ppf(0.975, df), abs=1.5e-3), df
    with pytest.raises(ValueError, match="degree"):
        report.t_quantile_975(0)


def test_interval_and_verdicts():
    ci = report.interval([1.0, 2.0, 3.0])
    # mean 2, sd 1, half-width t(2) / sqrt(3)
    assert ci["mean"] == 2 and ci["sd"] == 1
    assert ci["hi"] - 2 == pytest.approx(4.303 / math.sqrt(3))
    assert report.interval([0.5])["lo"] is None
    assert report.verdict("dsv", "final", {"lo": -0.4, "hi": 0.9}) == "within +-1%"
    assert report.verdict("dsv", "final", {"lo": 1.2, "hi": 3.0}) == "outside +-1%"
    assert report.verdict("dsv", "final", {"lo": -0.5, "hi": 1.5}).startswith("inconclusive")
    assert report.verdict("control", "final", {"lo": 0.1, "hi": 3.0}).startswith("detected")
    assert report.verdict("control", "final", {"lo": -0.1, "hi": 3.0}).startswith("NOT detected")


def _fake(tmp_path, name, runs, data="procedural"):
    setup = {"data": data, "num_layers": 2, "hidden_size": 8, "num_heads": 2, "latent_shape": [4, 2, 4, 4]}
    body = {"phase": "arms", "setup": setup, "iters": 3, "runs": runs}
    path = tmp_path / name
    path.write_text(json.dumps(body))
    return str(path)


def _run_rec(arm, seed, loss, dense=None, sparse_from=None):
    final = {"iteration": 3, "loss": loss, "loss_by_t": [loss] * 8, "sparse_layers": [1] if dense else []}
    if dense is not None:
        final["dense"] = {"loss": dense, "loss_by_t": [dense] * 8, "sparse_layers": []}
    rec = {"arm": arm, "seed": seed, "final": final, "val_curve": [final], "iterations": 3,
           "step_time": {"all": {"median_ms": 10.0}}}
    if arm == "dsv":  # two layers; layer 1 sparse from iteration `sparse_from` (never when None)
        rec["schedule"] = [{"iteration": 0, "layers": [[False, None], [False, None]]}]
        if sparse_from is not None:
            rec["schedule"].append({"iteration": sparse_from, "layers": [[True, [2, 2]], [False, None]]})
    return rec


def test_report_pairs_by_seed_across_files(tmp_path):
    a = _fake(tmp_path, "a.json", [_run_rec("dense", 0, 1.0), _run_rec("dsv", 0, 1.01, dense=1.0)])
    b = _fake(tmp_path, "b.json", [_run_rec("dense", 1, 2.0), _run_rec("dsv", 1, 2.04, dense=2.02, sparse_from=1),
                                   _run_rec("control", 1, 2.2),
                                   _run_rec("dense", 2, 3.0), _run_rec("dsv", 2, 3.0), _run_rec("control", 2, 3.0)])
    rep = report.build([a, b])["procedural"]
    rows = {r["comparison"]: r for r in rep["paired"]}
    assert rows["DSV - dense"]["diff_pct"] == pytest.approx([1.0, 2.0, 0.0])
    assert rows["DSV forced dense - dense"]["diff_pct"] == pytest.approx([0.0, 1.0, 0.0])
    # seed 2's DSV arm never ran sparse, so its control equals dense by construction: left out, named
    control = rows["control (random blocks) - dense"]
    assert control["diff_pct"] == pytest.approx([10.0]) and control["vacuous_seeds"] == [2]
    assert "seeds 2 left out" in report.markdown({"procedural": rep})
    # layer 1 of 2 sparse for iterations 1-2 of 3: a third of the layer-iterations
    dsv = next(r for r in rep["arms"] if r["arm"] == "dsv")
    assert dsv["sparse_fraction"] == pytest.approx([0.0, 1 / 3, 0.0])
    with pytest.raises(ValueError, match="two files"):
        report.build([a, a])
    lone = _fake(tmp_path, "c.json", [_run_rec("dsv", 0, 1.0)], data="natural")
    with pytest.raises(ValueError, match="no dense arm"):
        report.build([lone])


def test_random_block_control_keeps_k_random_blocks(megatron_state):
    """The control's stand-in predictor makes selection keep exactly K units per group and head,
    each unit about equally often; the real predictors are back afterwards."""
    from benchmarks.quality import _RandomScores, random_block_selection
    from megatron_dsv.layers.attention import dsv_attention_layers
    from megatron_dsv.ops.selection import select_topk
    from tests.megatron_shim import tiny_config

    g = torch.Generator().manual_seed(0)
    scores = _RandomScores(g, group_size=4, kv_block=8)
    q = torch.randn(1, 2, 512, 16)
    q_lr, k_lr = scores.project(q, q)
    index = select_topk(q_lr, k_lr, group_size=4, k_per_head=[3, 5], kv_block=8, backend="reference")
    kv, count = index.kv_idx[0], index.kv_count[0]  # [H, groups, Kmax], [H]
    assert count.tolist() == [3, 5]
    picks = torch.bincount(kv[1, :, :5].flatten().long(), minlength=64).double()  # 128 groups x 5 of 64 units
    expect = 128 * 5 / 64
    chi2 = ((picks - expect) ** 2 / expect).sum()
    # uniform picks: chi-square with 63 degrees of freedom, mean 63, sd 11.2 (raw Gaussian
    # scores at rank 8 gave 3x the uniform frequency for some blocks and none for others)
    assert chi2 < 63 + 4 * 11.2, chi2
    assert all(len(set(row.tolist())) == 3 for row in kv[0, :, :3])  # no unit twice in a group
    with pytest.raises(ValueError, match="whole units"):
        scores.project(torch.randn(1, 2, 12, 16), torch.randn(1, 2, 12, 16))

    from megatron_dsv.models.video_dit import VideoDiT

    model = VideoDiT(tiny_config(dsv_query_group=(2, 2, 4), normalization="RMSNorm", qk_layernorm=True), in_channels=4,
                     patch=(1, 2, 2))
    before = [a.predictor for a in dsv_attention_layers(model)]
    with random_block_selection(model, g) as layers:
        assert all(isinstance(a.predictor, _RandomScores) for a in layers)
    assert [a.predictor for a in dsv_attention_layers(model)] == before


def test_checkpoint_splits_into_small_files(tmp_path, monkeypatch, megatron_state):
    from benchmarks import quality

    setup = quality.Setup(size="tiny", data="procedural", num_classes=8, t_quantiles=8, val_seed=0, **quality.SIZES["tiny"])
    model = quality.build_model(setup, "dense", "cpu")
    monkeypatch.setattr(quality, "MAX_FILE_BYTES", int(1.4 * 2**20))  # 0.4 MiB of tensors per file
    manifest = quality.save_checkpoint(model, setup, str(tmp_path / "ck"), {"iteration": 0})
    assert len(manifest["files"]) >= 3 and all(e["bytes"] <= 1.4 * 2**20 for e in manifest["files"])
    again, _ = quality.read_manifest(str(tmp_path / "ck"))
    assert again == setup
    other = quality.build_model(setup, "auto", "cpu", seed=5)  # the arms' model: predictors and DSV state extra
    quality.load_checkpoint(other, str(tmp_path / "ck"))
    loaded = other.state_dict()
    checked = 0
    for name, p in model.state_dict().items():
        if isinstance(p, torch.Tensor) and not name.endswith("_extra_state"):
            assert torch.equal(p.to(torch.bfloat16).float(), loaded[name]), name
            checked += 1
    assert checked == sum(e["tensors"] for e in manifest["files"])
    monkeypatch.setattr(quality, "MAX_FILE_BYTES", int(1.05 * 2**20))  # the largest tensor no longer fits
    with pytest.raises(ValueError, match="smaller --size"):
        quality.save_checkpoint(model, setup, str(tmp_path / "ck2"), {})


def test_fit_hold_cannot_change_results_and_refuses_clashes():
    """The hold's knobs are not result-changing (an arm's own values replace them when it loads
    the state), and --fit-predictor refuses --dsv values that would fight the hold."""
    from benchmarks import quality
    from megatron_dsv.config import DSVConfig

    result = DSVConfig().result_fields()
    assert not set(quality.FIT_HOLD_FIELDS) & set(result)
    setup = quality.Setup(size="tiny", data="procedural", num_classes=8, t_quantiles=8, val_seed=0, **quality.SIZES["tiny"])
    kw = quality.fit_overrides(setup, {"dsv_critical_mass": 0.6})
    assert kw["dsv_min_sparsity"] == 1.0 and kw["dsv_critical_mass"] == 0.6
    assert kw["dsv_profile_interval_stage2"] == kw["dsv_profile_interval_stage1"] == 2  # tiny's stage-1 interval
    with pytest.raises(ValueError, match="dsv_min_sparsity"):
        quality.fit_overrides(setup, quality.dsv_overrides(["min_sparsity=0.5"]))
    with pytest.raises(ValueError, match="gradient"):
        quality.fit_overrides(setup, {"dsv_predictor_fit": "gradient"})
    with pytest.raises(ValueError, match="each arm sets its mode"):
        quality.dsv_overrides(["mode=sparse"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        quality.dsv_overrides(["critical_mass"])


def test_fit_predictor_keeps_the_dense_trajectory_and_carries_the_state(tmp_path, megatron_state):
    """pretrain-dense --fit-predictor trains bit for bit what the plain dense run trains (every
    parameter after 6 steps, and the loss of each), while the predictors refit and the statistics
    and stage accumulate; the checkpoint carries them into the dsv arm's model exactly, and an arm
    config that changes results is refused before any arm trains."""
    from benchmarks import quality
    from megatron_dsv.layers.attention import dsv_attention_layers

    base = ["pretrain-dense", "--size", "tiny", "--iters", "6", "--batch", "2", "--lr", "1e-3", "--warmup", "2",
            "--device", "cpu", "--out", str(tmp_path)]
    plain, setup, plain_rec = quality.pretrain_model(quality.parse_args(base))
    fitted, _, fit_rec = quality.pretrain_model(quality.parse_args(base + ["--fit-predictor"]))
    assert fit_rec["train_loss"] == plain_rec["train_loss"]
    theirs = dict(fitted.named_parameters())
    compared = 0
    for name, p in plain.named_parameters():
        assert torch.equal(p, theirs[name]), name
        compared += 1
    assert compared == sum(1 for n in theirs if ".predictor." not in n) and compared > 20

    # the fit ran: stage 2 since iteration 0, statistics every 2 iterations, predictors moved
    # from their initial sketch, every layer held dense by the hold (tiny's arms would take it:
    # they go sparse at sparsity >= 0.3)
    assert fit_rec["switch_iteration"] == 0 and not any(l["sparse"] for l in fit_rec["layers"])
    assert all(1 - l["density"] >= 0.3 for l in fit_rec["layers"])
    assert all("--dsv-min-sparsity 1.0" in l.decision for l in dsv_attention_layers(fitted) if l.predictor is not None)
    fresh = quality.build_model(setup, "auto", "cpu", quality.fit_overrides(setup, {}))
    layers = [a for a in dsv_attention_layers(fitted) if a.predictor is not None]
    for a, b in zip(layers, [a for a in dsv_attention_layers(fresh) if a.predictor is not None]):
        assert not torch.allclose(a.predictor.weight_q, b.predictor.weight_q)
        assert a.state.schedule["stage"] == 2 and a.state.stats_ema["mass_by_rank"].shape == (4, 16)

    manifest = quality.save_checkpoint(fitted, setup, str(tmp_path / "ck"), {"iteration": 6}, dsv_state=True)
    dsv = manifest["dsv"]
    assert dsv["layers"] == 2 and dsv["schedule"] == {"stage": 2, "switch_iteration": 0}
    assert 0 < dsv["bytes"] == os.path.getsize(tmp_path / "ck" / quality.DSV_STATE_FILE)
    # the arm's own config (tiny's defaults, a schedule of its own): retunable fields only differ
    arm_cfg = dict(quality.DSV_DEFAULTS["tiny"], dsv_switch_min_iters=1, dsv_switch_max_iters=4,
                   dsv_speed_table="assume")
    quality.check_dsv_state(manifest, setup, arm_cfg)
    arm = quality.build_model(setup, "auto", "cpu", arm_cfg, seed=3)
    quality.load_checkpoint(arm, str(tmp_path / "ck"))
    quality.load_dsv_state(arm, str(tmp_path / "ck"))
    for a, b in zip(layers, [a for a in dsv_attention_layers(arm) if a.predictor is not None]):
        assert torch.equal(a.predictor.weight_q, b.predictor.weight_q)
        assert torch.equal(a.predictor.weight_k, b.predictor.weight_k)
        assert b.state.schedule["stage"] == 2 and not b.sparse
        for key, v in a.state.stats_ema.items():
            assert torch.equal(v.float(), b.state.stats_ema[key]), key
    with pytest.raises(ValueError, match="dsv_critical_mass: checkpoint 0.5 vs arms 0.6"):
        quality.check_dsv_state(manifest, setup, dict(arm_cfg, dsv_critical_mass=0.6))
    other = quality.build_model(setup, "auto", "cpu", dict(arm_cfg, dsv_critical_mass=0.6))
    with pytest.raises(ValueError, match="another DSV config"):  # the layer's own check, behind ours
        quality.load_dsv_state(other, str(tmp_path / "ck"))
    plain_ck = quality.save_checkpoint(plain, setup, str(tmp_path / "plain"), {"iteration": 6})
    assert "dsv" not in plain_ck
    with pytest.raises(ValueError, match="no DSV state"):
        quality.load_dsv_state(arm, str(tmp_path / "plain"))


@pytest.mark.slow
def test_fitted_phase_cpu_smoke(tmp_path):
    """run_gpu_quality.sh PHASE=fitted at tiny size on CPU: the checkpoint run fits the predictor,
    the dsv arm starts in stage 2 from it and runs sparse from iteration 1 (its first decision at the
    end of iteration 0), the control replays that, and the report says so (about 2 min on 2 busy cores)."""
    env = dict(os.environ, CPU_SMOKE="1", PHASE="fitted", OUT=str(tmp_path), ITERS="12", ARM_ITERS="6")
    for var in ("MASTER_PORT", "MASTER_ADDR", "RANK", "WORLD_SIZE", "LOCAL_RANK", "ARM_DSV", "FIT_DSV", "SEEDS"):
        env.pop(var, None)
    res = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "run_gpu_quality.sh")], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=400)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.load(open(tmp_path / "quality_procedural_arms.json"))
    assert out["dsv_start"] == "checkpoint" and out["checkpoint"]["dsv"]["schedule"]["stage"] == 2
    runs = {r["arm"]: r for r in out["runs"]}
    dsv, dense, control = runs["dsv"], runs["dense"], runs["control"]
    assert dsv["stage"] == [2] * 6 and dsv["dsv_start"] == "checkpoint"
    assert report.first_sparse(dsv) == [1, 1]
    assert dsv["train_loss"][0] == dense["train_loss"][0] and dsv["train_loss"][1:] != dense["train_loss"][1:]
    assert control["train_loss"][1:] != dsv["train_loss"][1:]
    assert report.sparse_fraction(dsv) == pytest.approx(5 / 6)
    text = open(tmp_path / "quality.md").read()
    assert "in the checkpoint" in text and "| 1 | 1/1 | 1 |" in text  # layer 1: sparse at the end, first at 1


def test_report_first_sparse_and_protocol_mixing(tmp_path):
    dsv = _run_rec("dsv", 0, 1.0, sparse_from=1)
    dsv["schedule"].append({"iteration": 2, "layers": [[False, None], [True, [2, 2]]]})
    assert report.first_sparse(dsv) == [1, 2]
    assert report.first_sparse(_run_rec("dsv", 1, 1.0)) == [None, None]
    assert report.first_sparse(_run_rec("dense", 0, 1.0)) is None
    a = _fake(tmp_path, "a.json", [_run_rec("dense", 0, 1.0), dsv])
    rep = report.build([a])["procedural"]
    text = report.markdown({"procedural": rep})
    assert "fits its predictor from scratch" in text  # no dsv_start: rounds 1-2
    fitted = json.loads(open(a).read())
    fitted["dsv_start"] = "checkpoint"
    fitted["runs"] = [_run_rec("dense", 1, 1.0), dict(_run_rec("dsv", 1, 1.0, sparse_from=1), dsv_start="checkpoint",
                                                        switch_iteration=0)]
    b = tmp_path / "b.json"
    b.write_text(json.dumps(fitted))
    with pytest.raises(ValueError, match="dsv_start 'checkpoint' differs"):
        report.build([a, str(b)])
    rep = report.build([str(b)])["procedural"]
    row = next(r for r in rep["arms"] if r["arm"] == "dsv")
    assert row["switch_iterations"] == [] and row["from_checkpoint"] == 1
    assert "| in the checkpoint |" in report.markdown({"procedural": rep})
    other = json.loads(open(a).read())
    other["setup"]["query_group"] = [4, 4, 4]
    c = tmp_path / "c.json"
    c.write_text(json.dumps(other | {"runs": [_run_rec("dense", 2, 1.0)]}))
    with pytest.raises(ValueError, match="setup"):
        report.build([a, str(c)])
