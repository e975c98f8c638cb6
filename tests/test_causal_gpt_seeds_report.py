"""benchmarks/causal_gpt_seeds_report.py on synthetic lane folders with known answers: per-seed
paired differences at the final and periodic validations, their mean and t interval, the three
verdicts against +-1%, the A/A row, the sparse fraction and densities from DSV's statistics log,
runs cut short, skipped jobs, and what is refused. Also run_gpu_causal_gpt.sh's JOBS check."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
from pathlib import Path

import pytest

from benchmarks import causal_gpt_seeds_report as seeds
from benchmarks.quality_report import t_quantile_975
from tests.test_causal_gpt_report import _it, _val, _write

ROOT = Path(__file__).resolve().parents[1]
DENSE = [6.0, 4.0, 2.0, 1.0, 0.5, 0.25]  # logged every 10 iterations, 60 in all
MS = [500.0, 100.0, 100.0, 100.0, 100.0, 100.0]


def _entry(it, layers):
    """A statistics-log entry as the controller writes it: per layer (sparse, density, K per head)."""
    return {"iteration": it, "stage": 2 if it >= 30 else 1, "switch_iteration": 30 if it >= 30 else None,
            "layers": [{"layer": n, "sparse": sp, "density": d, "k": k, "sparsity": [0.8, 0.9]}
                       for n, (sp, d, k) in enumerate(layers, 1)]}


def _stats(path, entries):
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))


def _jobs(path, rows):
    """jobs.tsv; rows of 8 fields carry the note column run_gpu_causal_gpt.sh now writes."""
    note = any(len(r) == 8 for r in rows)
    lines = ["name\tmode\tseed\ttag\texit_code\tseconds\ttimeout_s" + ("\tnote" if note else "")]
    lines += ["\t".join(map(str, r)) for r in rows]
    path.write_text("\n".join(lines) + "\n")


def _lane(d, finals, dsv_train=None):
    """One folder with dense and auto of each seed: ``finals`` {seed: (dense, auto)}; a final of
    None leaves that run without its end-of-training validation (cut short)."""
    d.mkdir(parents=True, exist_ok=True)
    for seed, (fd, fa) in finals.items():
        _write(d / f"gpt_dense_s{seed}.log", DENSE, MS, final=fd)
        tail = ("run_gpu_causal_gpt: exit code 124",) if fa is None else (
            "[after training is done] 2026-12-01 10:05:00", "run_gpu_causal_gpt: exit code 0")
        _write(d / f"gpt_auto_s{seed}.log", dsv_train or DENSE, MS, switch=30, final=fa, tail=tail)
    return d


def _ci(vals):
    m, sd = statistics.fmean(vals), statistics.stdev(vals)
    half = t_quantile_975(len(vals) - 1) * sd / math.sqrt(len(vals))
    return m - half, m + half


def test_interval_inside_the_target_with_aa_sparsity_and_periodic_rows(tmp_path):
    # DSV minus dense: +0.2, -0.1, +0.1 % -> mean 0.067, 95% t interval [-0.31, +0.45]: inside +-1%
    lane = _lane(tmp_path / "lane0", {1: (2.0, 2.004), 2: (2.0, 1.998), 3: (2.0, 2.002)},
                 dsv_train=[6.0, 4.0, 2.0, 1.1, 0.5, 0.25])
    _write(lane / "gpt_dense_s1_aa.log", DENSE, MS, final=2.01)
    # auto seed 1: layer 1 sparse after iteration 30, layer 2 after 50 (60 iterations, 0..59):
    # 20 + 2 x 9 of 120 layer-iterations sparse
    _stats(lane / "dsv_stats_auto_s1.jsonl", [
        _entry(0, [(False, 0.6, None), (False, 0.6, None)]),
        _entry(50, [(True, 0.3, [40, 44]), (True, 0.5, [60, 60])]),
        _entry(30, [(True, 0.3, [40, 44]), (False, 0.55, None)]),  # order in the file does not matter
    ])
    _stats(lane / "dsv_stats_auto_s2.jsonl", [_entry(0, [(False, 0.6, None)] * 2), _entry(30, [(False, 0.6, None)] * 2)])
    _jobs(lane / "jobs.tsv", [("dense_s1", "dense", 1, "", 0, 72, 200), ("auto_s1", "auto", 1, "", 0, 99, 290),
                              ("dense_s4", "dense", 4, "", "skipped", 0, 0), ("auto_s4", "auto", 4, "", "skipped", 0, 0)])
    (lane / "corpus.json").write_text(json.dumps({"sha256": "abc"}))

    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    assert seeds.main([str(lane), "--json", str(out_json), "--md", str(out_md), "--note", "synthetic"]) == 0
    rep = json.loads(out_json.read_text())
    (dsv, dsv_tail, aa, aa_tail) = rep["paired"]
    assert (dsv["arm"], dsv["evaluation"], aa["arm"]) == ("auto", "final validation", "aa")
    assert dsv["seeds"] == [1, 2, 3] and dsv["diff_pct"] == pytest.approx([0.2, -0.1, 0.1])
    assert dsv["diff_abs"] == pytest.approx([0.004, -0.002, 0.002])
    lo, hi = _ci([0.2, -0.1, 0.1])
    assert dsv["mean"] == pytest.approx(0.2 / 3) and (dsv["lo"], dsv["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert -1 < dsv["lo"] < 0 < dsv["hi"] < 1 and dsv["verdict"] == "within +-1%"
    assert dsv["vacuous_seeds"] == [2]  # its statistics log never shows a sparse layer; seed 3 has none
    assert aa["seeds"] == [1] and aa["diff_pct"] == pytest.approx([0.5]) and aa["verdict"] == "one seed: no interval"
    # training tail (all 6 logged values): DSV's 1.1 against dense's 1.0 in every seed
    assert dsv_tail["diff_pct"] == pytest.approx([100 * 0.1 / sum(DENSE)] * 3) and "verdict" not in dsv_tail
    assert aa_tail["diff_pct"] == pytest.approx([0.0])

    per = {(r["iteration"], r["set"]): r for r in rep["periodic"]["auto"]}
    assert list(per) == [(20, "periodic"), (40, "periodic"), (60, "periodic"), (60, "validation")]
    assert per[(40, "periodic")]["diff_pct"] == pytest.approx([100 * 0.1 / 1.5] * 3)
    assert per[(20, "periodic")]["diff_pct"] == pytest.approx([0.0] * 3) and per[(20, "periodic")]["sd"] == 0
    assert per[(60, "validation")]["diff_pct"] == pytest.approx(dsv["diff_pct"])

    runs = {r["name"]: r for r in rep["runs"]}
    sp = runs["auto_s1"]["sparsity"]
    assert sp["sparse_fraction"] == pytest.approx((20 + 2 * 9) / 120)
    assert sp["first_sparse"] == {"1": 30, "2": 50} and sp["sparse_layers_at_end"] == 2
    assert sp["mean_density_sparse_layers"] == pytest.approx(0.4)
    assert [l["k_mean"] for l in sp["final_layers"]] == [42.0, 60.0]
    assert runs["auto_s2"]["sparsity"]["sparse_fraction"] == 0 and runs["auto_s3"]["sparsity"] is None
    assert runs["dense_s1"]["sparsity"] is None and runs["dense_s1"]["seconds"] == 72 and runs["auto_s2"]["seconds"] is None
    assert runs["auto_s1"]["switch_iteration"] == 30
    assert runs["auto_s1"]["step_time_median_vs_reference"]["stage2"]["dsv_over_dense"] == pytest.approx(1.0)
    assert rep["skipped_jobs"] == ["lane0/dense_s4", "lane0/auto_s4"]
    assert rep["seed_floor"]["diff_pct"] == {"2": 0.0, "3": 0.0}
    md = out_md.read_text()
    assert "within +-1%" in md and "seeds 2: no layer ran sparse" in md and "31.7%" in md and "synthetic" in md


@pytest.mark.parametrize("auto, want", [
    ((2.06, 1.96, 2.01), "inconclusive: interval wider than +-1%"),  # +3, -2, +0.5 %: interval holds +-1
    ((2.06, 2.064, 2.058), "outside +-1%"),  # +3, +3.2, +2.9 %
])
def test_a_wide_interval_is_inconclusive_and_a_consistent_gap_is_outside(tmp_path, auto, want):
    lane = _lane(tmp_path / "l", {s: (2.0, a) for s, a in zip((1, 2, 3), auto)})
    (row, _) = seeds.build([str(lane)])["paired"]
    lo, hi = _ci([100 * (a / 2.0 - 1) for a in auto])
    assert (row["lo"], row["hi"]) == (pytest.approx(lo), pytest.approx(hi)) and row["verdict"] == want


def test_lanes_pool_and_a_cut_run_leaves_its_seed_out(tmp_path):
    a = _lane(tmp_path / "lane0", {1: (2.0, 2.02), 3: (2.0, None)})
    b = _lane(tmp_path / "lane1", {2: (3.0, 2.97)})
    (dsv, dsv_tail) = seeds.build([str(a), str(b)])["paired"]
    assert dsv["seeds"] == [1, 2] and dsv["diff_pct"] == pytest.approx([1.0, -1.0])
    assert dsv["incomplete_seeds"] == [3] and dsv_tail["incomplete_seeds"] == [3]
    rep = seeds.build([str(a), str(b)])
    cut = next(r for r in rep["runs"] if r["name"] == "auto_s3")
    assert cut["completed"] is False and cut["exit_code"] == 124 and cut["final_validation"] is None
    assert "seeds 3 left out" in seeds.markdown(rep)
    assert rep["seed_floor"]["base_seed"] == 1 and rep["seed_floor"]["diff_pct"] == {"2": pytest.approx(50.0), "3": 0.0}


def test_refusals(tmp_path):
    a = _lane(tmp_path / "a", {1: (2.0, 2.0)})
    b = _lane(tmp_path / "b", {1: (2.0, 2.0)})
    with pytest.raises(ValueError, match="arm auto seed 1 is in"):
        seeds.build([str(a), str(b)])
    c = _lane(tmp_path / "c", {2: (2.0, 2.0)})
    (a / "corpus.json").write_text(json.dumps({"sha256": "x"}))
    (c / "corpus.json").write_text(json.dumps({"sha256": "y"}))
    with pytest.raises(ValueError, match="different corpora"):
        seeds.build([str(a), str(c)])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no gpt_<mode>_s<seed>"):
        seeds.build([str(tmp_path / "empty")])
    only_auto = tmp_path / "only_auto"
    only_auto.mkdir()
    _write(only_auto / "gpt_auto_s1.log", DENSE, MS)
    with pytest.raises(ValueError, match="no dense run"):
        seeds.build([str(only_auto)])
    with pytest.raises(ValueError, match="is not a folder"):
        seeds.build([str(tmp_path / "missing")])


@pytest.mark.parametrize("env, msg", [
    ({"JOBS": "dense:1 fork:1"}, "'fork:1' is not a positive SEED or a JOBS entry"),
    ({"JOBS": "sparse:1 base:1 held:1"}, "'sparse:1' loads the checkpoint of base:1, which JOBS must list before it"),
    ({"JOBS": "base:1 held:2"}, "'held:2' loads the checkpoint of base:2"),
    ({"JOBS": "base:1 base:1"}, "'base:1': one base per seed"),
    ({"JOBS": "base:1:x"}, "'base:1:x': one base per seed and no tag"),
    ({"JOBS": "base:1 held:1", "FORK_AT": "0"}, "FORK_AT=0 is not a positive number"),
    ({"JOBS": "base:1 held:1", "ARM_ITERS": "1.5"}, "ARM_ITERS=1.5 is not a positive number"),
    ({"JOBS": "auto:0"}, "'auto:0' is not"),
    ({"SEED": "0"}, "'0' is not a positive SEED"),
    ({"JOBS": "dense:1", "DENSE_FROM": "x.tar.gz"}, "DENSE_FROM pairs with the default"),
])
def test_the_gpt_script_refuses_bad_jobs_before_any_work(tmp_path, env, msg):
    r = subprocess.run(["bash", str(ROOT / "benchmarks/run_gpu_causal_gpt.sh")], env={"PATH": "/usr/bin:/bin",
                       "OUT": str(tmp_path), **env}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and msg in r.stderr and list(tmp_path.iterdir()) == []


# Forked arms: a base to iteration B = 40 (saved there), arms of A = 30 to 70, validations every 20.
B, A = 40, 30


def _base_log(path, saved=True):
    lines = [_it(i, B + A, 100.0, 3.0) for i in range(10, B + 1, 10)]
    if saved:
        lines.append(f"  [2026-12-01 10:00:00.000000] successfully saved checkpoint from iteration {B:7d} to /tmp/ck/s1 "
                     "[ t 1/1, gtp_remat 1/1, p 1/1 ]")
    path.write_text("\n".join(lines + [f"exiting program at iteration {B}", "run_gpu_causal_gpt: exit code 0"]) + "\n")


def _arm_log(path, final, periodic=None, loaded=B, ms=100.0, switch=None):
    """An arm resumed at ``loaded`` (None: no load line, as a run that started from scratch):
    training losses every 10 iterations, periodic validations (iteration 60: ``periodic``, default
    the final value + 0.1) and the final validation (None: cut short)."""
    lines = []
    if loaded is not None:
        lines.append(f"  successfully loaded checkpoint from /tmp/ck/s1 [ t 1/1, gtp_remat 1/1, p 1/1 ] at iteration {loaded}")
    start = loaded or 0
    for i in range(start + 10, B + A + 1, 10):
        lines.append(_it(i, B + A, ms, 2.0))
        if switch == i - 10:
            lines.append(f"DSV stage switch at iteration {switch}: no statistics yet; reached --dsv-switch-max-iters {switch}")
        if i == 60:
            lines.append(_val(60, (final or 2.0) + 0.1 if periodic is None else periodic))
    if final is not None:
        lines += [_val(B + A, final, " on validation set"), "[after training is done] 2026-12-01 10:05:00"]
    lines.append(f"run_gpu_causal_gpt: exit code {0 if final is not None else 124}")
    path.write_text("\n".join(lines) + "\n")


def _fork_lane(d, seeds, aa=None):
    """``seeds`` {seed: (held, sparse)} final validations; ``aa`` {seed: held again}."""
    d.mkdir(parents=True, exist_ok=True)
    for seed, (held, sparse) in seeds.items():
        _base_log(d / f"gpt_base_s{seed}.log")
        _arm_log(d / f"gpt_held_s{seed}.log", held)
        _arm_log(d / f"gpt_sparse_s{seed}.log", sparse, switch=B)
    for seed, v in (aa or {}).items():
        _arm_log(d / f"gpt_held_s{seed}_aa.log", v)
    return d


def test_forked_sparse_tracks_held_with_a_quiet_aa_floor_and_sparsity_after_the_fork(tmp_path):
    # sparse - held: +0.2, -0.1, +0.1 % (interval [-0.31, +0.45]); A/A +0.3, -0.2 %: floor 0.3 < 1
    lane = _fork_lane(tmp_path / "lane0", {1: (2.0, 2.004), 2: (2.0, 1.998), 3: (2.0, 2.002)}, aa={1: 2.006, 2: 1.996})
    # sparse seed 1, from its resume at 40 to 69: layer 1 sparse after 40, layer 2 after 50 -> (29 + 19) / 60
    _stats(lane / "dsv_stats_sparse_s1.jsonl", [_entry(40, [(True, 0.3, [40, 44]), (False, 0.6, None)]),
                                               _entry(50, [(True, 0.3, [40, 44]), (True, 0.45, [50, 50])])])
    _stats(lane / "dsv_stats_sparse_s2.jsonl", [_entry(40, [(False, 0.6, None)] * 2)])
    out_json, out_md = tmp_path / "r.json", tmp_path / "r.md"
    assert seeds.main([str(lane), "--json", str(out_json), "--md", str(out_md)]) == 0
    rep = json.loads(out_json.read_text())
    rows = {(r["arm"], r["evaluation"].split(",")[0]): r for r in rep["paired"]}
    sp, aa = rows[("sparse", "final validation")], rows[("held_aa", "final validation")]
    assert sp["reference"] == "held" and sp["seeds"] == [1, 2, 3]
    assert sp["diff_pct"] == pytest.approx([0.2, -0.1, 0.1])
    lo, hi = _ci([0.2, -0.1, 0.1])
    assert (sp["lo"], sp["hi"]) == (pytest.approx(lo), pytest.approx(hi))
    assert aa["diff_pct"] == pytest.approx([0.3, -0.2]) and aa["verdict"] == "noise floor"
    assert sp["aa_floor_pct"] == pytest.approx(0.3) and sp["aa_n"] == 2
    assert sp["verdict"] == "tracks: within +-1%, A/A floor 0.30% over 2 seeds"
    assert sp["vacuous_seeds"] == [2] and sp["not_resumed"] == []
    assert rows[("sparse", "training loss")]["diff_pct"] == pytest.approx([0.0] * 3)
    # periodic validations after the fork (iteration 60), then the final one at 70
    per = [(r["iteration"], r["set"]) for r in rep["periodic"]["sparse"]]
    assert per == [(60, "periodic"), (70, "validation")]
    assert rep["periodic"]["sparse"][0]["diff_pct"] == pytest.approx([100 * 0.004 / 2.1, -100 * 0.002 / 2.1, 100 * 0.002 / 2.1])
    runs = {r["name"]: r for r in rep["runs"]}
    s1 = runs["sparse_s1"]
    assert s1["resumed"] is True and s1["loaded_at"] == B and s1["switch_iteration"] == B
    assert s1["sparsity"]["from_iteration"] == B
    assert s1["sparsity"]["sparse_fraction"] == pytest.approx((29 + 19) / 60)
    assert s1["sparsity"]["first_sparse"] == {"1": 40, "2": 50}
    assert runs["sparse_s2"]["sparsity"]["sparse_fraction"] == 0 and runs["base_s1"]["saved_at"] == B
    assert s1["reference"] == "held" and s1["step_time_median_vs_reference"] is not None
    assert rep["seed_floor"] is None  # no dense runs
    md = out_md.read_text()
    assert "tracks: within +-1%" in md and "(saved at 40)" in md and "(from 40)" in md


@pytest.mark.parametrize("sparse, aa, want", [
    # +3, -2, +0.5 %: the interval holds +-1; A/A quiet
    ((2.06, 1.96, 2.01), {1: 2.002, 2: 1.999}, "inconclusive: interval wider than +-1%"),
    # inside +-1% but an A/A of +1.5 %: the protocol's own noise reaches the margin
    ((2.004, 1.998, 2.002), {1: 2.03, 2: 1.999},
     "inconclusive: interval within +-1% but the A/A floor 1.50% is not (the protocol is too noisy for this margin)"),
    # inside +-1% with one A/A repeat: no floor
    ((2.004, 1.998, 2.002), {1: 2.002}, "inconclusive: interval within +-1% but 1 A/A repeat(s) (2 needed for a noise floor)"),
    ((2.004, 1.998, 2.002), {}, "inconclusive: interval within +-1% but 0 A/A repeat(s) (2 needed for a noise floor)"),
    # wide and noisy: both said
    ((2.06, 1.96, 2.01), {1: 2.04, 2: 1.999},
     "inconclusive: interval wider than +-1%; A/A floor 2.00% exceeds +-1%: the protocol is too noisy for this margin"),
    ((2.06, 2.064, 2.058), {1: 2.002, 2: 1.999}, "outside +-1%"),
])
def test_forked_verdicts_need_the_aa_floor_inside_the_margin(tmp_path, sparse, aa, want):
    lane = _fork_lane(tmp_path / "l", {s: (2.0, v) for s, v in zip((1, 2, 3), sparse)}, aa=aa)
    row = next(r for r in seeds.build([str(lane)])["paired"] if r["arm"] == "sparse" and r["evaluation"] == "final validation")
    assert row["verdict"] == want


def test_forked_arms_that_failed_were_skipped_or_did_not_resume_are_left_out(tmp_path):
    lane = _fork_lane(tmp_path / "lane0", {1: (2.0, 2.01), 2: (2.0, 2.02)}, aa={1: 2.0})
    _arm_log(lane / "gpt_sparse_s2.log", None, switch=B)  # cut short: no final validation
    _fork_lane(lane, {3: (2.0, 2.0)})
    _arm_log(lane / "gpt_held_s3.log", 2.0, loaded=None)  # never loaded: trained from scratch
    _base_log(lane / "gpt_base_s4.log", saved=False)  # a base that failed: its arms were skipped
    _base_log(lane / "gpt_base_s5.log")
    _arm_log(lane / "gpt_held_s5.log", 2.0, loaded=20)  # loaded another iteration than the base saved
    _arm_log(lane / "gpt_sparse_s5.log", 2.0)
    _jobs(lane / "jobs.tsv", [("base_s4", "base", 4, "", 1, 30, 150, "checkpoint at iteration - (none) in /tmp/ck/s4"),
                              ("sparse_s4", "sparse", 4, "", "skipped", 0, 0, "no base: base:4 left no checkpoint at iteration 40 (exit code 1)"),
                              ("held_s4", "held", 4, "", "skipped", 0, 0, "no base: base:4 left no checkpoint at iteration 40 (exit code 1)")])
    rep = seeds.build([str(lane)])
    sp = next(r for r in rep["paired"] if r["arm"] == "sparse" and r["evaluation"] == "final validation")
    assert sp["seeds"] == [1] and sp["diff_pct"] == pytest.approx([0.5]) and sp["verdict"] == "one seed: no interval"
    assert sp["incomplete_seeds"] == [2, 3, 5] and sp["not_resumed"] == [3, 5]
    runs = {r["name"]: r for r in rep["runs"]}
    assert runs["held_s3"]["resumed"] is False and runs["held_s5"]["resumed"] is False and runs["held_s5"]["loaded_at"] == 20
    assert runs["base_s4"]["saved_at"] is None and runs["sparse_s2"]["completed"] is False
    assert rep["skipped_jobs"][0] == "lane0/sparse_s4 (no base: base:4 left no checkpoint at iteration 40 (exit code 1))"
    md = seeds.markdown(rep)
    assert "not resumed: no checkpoint loaded" in md and "not resumed: loaded at 20" in md
    assert "(no checkpoint: exit code 0)" in md and "did not finish or did not resume the base" in md


def test_forked_arms_need_a_held_arm_and_old_jobs_files_still_read(tmp_path):
    lane = tmp_path / "l"
    lane.mkdir()
    _base_log(lane / "gpt_base_s1.log")
    _arm_log(lane / "gpt_sparse_s1.log", 2.0)
    with pytest.raises(ValueError, match="no held arm"):
        seeds.build([str(lane)])
    # a jobs.tsv without the note column (the recorded calls) and a base alone: no pair, no error
    (lane / "gpt_sparse_s1.log").unlink()
    _jobs(lane / "jobs.tsv", [("sparse_s1", "sparse", 1, "", "skipped", 0, 0)])
    rep = seeds.build([str(lane)])
    assert rep["paired"] == [] and rep["skipped_jobs"] == ["l/sparse_s1"]
