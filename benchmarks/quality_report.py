"""Turn ``benchmarks/quality.py arms`` JSON into the README's tables and a PNG.

    python benchmarks/quality_report.py benchmarks/results/quality_*_arms.json \\
        --md benchmarks/results/quality.md --png benchmarks/results/quality.png

Several files (one per device call, e.g. one per data source, or seeds split over calls) are
merged; runs are keyed by (data source, arm, seed). For each data source and each comparison arm
(``dsv``, ``dsv`` evaluated with its layers forced dense, ``control``, ``aa``) the paired
difference with the ``dense`` arm of the same seed is taken on the final fixed-validation loss,
in percent of the dense loss; its mean and 95% interval use the t distribution with n - 1
degrees of freedom. Verdicts: DSV against the +-1% target; the control is "detected" when its
interval excludes zero. Per DSV arm: the fraction of layer-iterations that ran sparse and the
iteration each layer first went sparse (from the run's schedule), and where its predictor started
(fitted in the checkpoint run, round 3, or from scratch in the arm). Files of one data source must
share the setup (query group, ...) and that start: rounds of another protocol are not merged.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
from collections import defaultdict
from typing import Dict, List, Optional, Sequence

# two-sided 95% quantiles t_{0.975, df} for df = 1..30 (to 3 decimals)
T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
        2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
        2.045, 2.042)
TARGET_PCT = 1.0
COMPARISONS = (
    ("dsv", "final", "DSV - dense"),
    ("dsv", "final_dense", "DSV forced dense - dense"),
    ("control", "final", "control (random blocks) - dense"),
    ("aa", "final", "A/A dense - dense"),
)
AA_LABELS = {"both": "data order + noise", "data": "data order", "noise": "noise", "none": "nothing: plain repeat"}


def t_quantile_975(df: int) -> float:
    """``t_{0.975}`` with ``df`` degrees of freedom: the table to 30, then the Cornish-Fisher
    expansion around the normal quantile (error < 1e-3 past 30)."""
    if df < 1:
        raise ValueError(f"need at least 1 degree of freedom (2 seeds), got {df}.")
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959964
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def interval(values: Sequence[float]) -> Dict:
    """Mean, sample std and the 95% t interval of ``values`` (no interval for one value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return {"n": n, "mean": mean, "sd": None, "lo": None, "hi": None}
    sd = statistics.stdev(values)
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"n": n, "mean": mean, "sd": sd, "lo": mean - half, "hi": mean + half}


def load_runs(paths: Sequence[str]) -> Dict:
    """``{data: {"runs": {(arm, seed): run}, "meta": [file metadata]}}``; a (data, arm, seed) seen
    twice is refused (two calls ran the same run: keep one file)."""
    out: Dict = defaultdict(lambda: {"runs": {}, "meta": []})
    for path in paths:
        with open(path) as f:
            d = json.load(f)
        if d.get("phase") != "arms":
            raise ValueError(f"{path} is not a `benchmarks/quality.py arms` result (phase {d.get('phase')!r}).")
        data = d["setup"]["data"]
        meta = {k: d.get(k) for k in ("setup", "iters", "batch", "lr", "environment", "checkpoint", "dsv_config")}
        meta.update(file=os.path.basename(path), seeds=sorted({r["seed"] for r in d["runs"]}),
                    dsv_start=d.get("dsv_start", "scratch"))  # rounds 1-2 wrote none: fitted in the arm
        if out[data]["meta"]:
            first = out[data]["meta"][0]
            for key in ("setup", "dsv_start"):
                if meta[key] != first[key]:
                    raise ValueError(f"{path}: {data} {key} {meta[key]!r} differs from {first['file']}'s "
                                     f"{first[key]!r}; report each protocol's files separately.")
        out[data]["meta"].append(meta)
        for run in d["runs"]:
            key = (run["arm"], run["seed"])
            if key in out[data]["runs"]:
                raise ValueError(f"{path}: {data} arm {run['arm']} seed {run['seed']} appears in two files.")
            run = dict(run)
            if "dense" in run["final"]:
                run["final_dense"] = run["final"]["dense"]
            elif run["arm"] in ("dsv", "control"):
                run["final_dense"] = run["final"]  # never sparse: its as-trained evaluation was dense
            out[data]["runs"][key] = run
    return dict(out)


def sparse_fraction(run: Dict) -> Optional[float]:
    """Fraction of (layer, iteration) pairs a DSV run spent sparse, from its schedule (None without one)."""
    sched, iters = run.get("schedule"), run.get("iterations")
    if not sched or not iters:
        return None
    n_layers = len(sched[0]["layers"])
    total = 0
    for cur, nxt in zip(sched, sched[1:] + [{"iteration": iters}]):
        total += sum(bool(sp) for sp, _ in cur["layers"]) * (min(nxt["iteration"], iters) - cur["iteration"])
    return total / (iters * n_layers)


def first_sparse(run: Dict) -> Optional[List[Optional[int]]]:
    """Per layer, the first iteration a DSV run ran it sparse (None: never; the list is None
    without a schedule)."""
    sched = run.get("schedule")
    if not sched:
        return None
    first: List[Optional[int]] = [None] * len(sched[0]["layers"])
    for entry in sched:
        for i, (sp, _) in enumerate(entry["layers"]):
            if sp and first[i] is None:
                first[i] = entry["iteration"]
    return first


def paired(runs: Dict) -> List[Dict]:
    """One row per comparison: per-seed differences (percent of the dense loss) and their interval.

    The control replays its seed's DSV schedule with random key blocks, so in a seed whose DSV arm
    never ran a layer sparse the control *is* the dense arm: such seeds are listed as vacuous and
    left out of the control's interval (the control tests sparse attention where it ran)."""
    rows = []
    for arm, which, label in COMPARISONS:
        seeds = sorted(s for (a, s) in runs if a == arm and ("dense", s) in runs and which in runs[(a, s)])
        vacuous = []
        if arm == "control":
            vacuous = [s for s in seeds if not sparse_fraction(runs.get(("dsv", s), {}))]
            seeds = [s for s in seeds if s not in vacuous]
        if not seeds:
            continue
        diffs = [100 * (runs[(arm, s)][which]["loss"] / runs[("dense", s)]["final"]["loss"] - 1) for s in seeds]
        absd = [runs[(arm, s)][which]["loss"] - runs[("dense", s)]["final"]["loss"] for s in seeds]
        if arm == "aa":
            varied = sorted({runs[(arm, s)].get("aa_vary", "both") for s in seeds})
            label = f"A/A dense (other {'/'.join(AA_LABELS[v] for v in varied)}) - dense"
        rows.append({"comparison": label, "arm": arm, "evaluation": which, "seeds": seeds, "diff_pct": diffs,
                     "diff_abs": absd, "vacuous_seeds": vacuous, **interval(diffs),
                     "verdict": verdict(arm, which, interval(diffs))})
    return rows


def verdict(arm: str, which: str, ci: Dict) -> str:
    if ci["lo"] is None:
        return "one seed: no interval"
    if arm == "control":
        return "detected (interval excludes 0)" if ci["lo"] > 0 or ci["hi"] < 0 else "NOT detected (interval holds 0)"
    if arm == "aa":
        return "noise floor"
    if -TARGET_PCT <= ci["lo"] and ci["hi"] <= TARGET_PCT:
        return f"within +-{TARGET_PCT:g}%"
    if ci["lo"] > TARGET_PCT or ci["hi"] < -TARGET_PCT:
        return f"outside +-{TARGET_PCT:g}%"
    return f"inconclusive: interval wider than +-{TARGET_PCT:g}%"


def arm_rows(runs: Dict) -> List[Dict]:
    """Per arm: final loss over seeds, step times (median per seed, averaged), seeds."""
    rows = []
    for arm in ("dense", "dsv", "control", "aa"):
        seeds = sorted(s for (a, s) in runs if a == arm)
        if not seeds:
            continue
        rs = [runs[(arm, s)] for s in seeds]
        st = {}
        for key in ("all", "stage1", "stage2"):
            vals = [r["step_time"][key]["median_ms"] for r in rs if r["step_time"].get(key)]
            st[key] = sum(vals) / len(vals) if vals else None
        # a dsv arm started from a fitted checkpoint runs stage 2 from its first iteration: the
        # switch it reports is the checkpoint run's
        switch = [r.get("switch_iteration") for r in rs
                  if r.get("switch_iteration") is not None and r.get("dsv_start") != "checkpoint"]
        frac = [f for f in (sparse_fraction(r) for r in rs) if f is not None]
        rows.append({"arm": arm, "seeds": seeds, **interval([r["final"]["loss"] for r in rs]), "step_ms": st,
                     "switch_iterations": switch, "sparse_fraction": frac,
                     "from_checkpoint": sum(r.get("dsv_start") == "checkpoint" for r in rs)})
    return rows


def layer_rows(runs: Dict) -> List[Dict]:
    """The DSV arm's final per-layer summary, averaged over seeds (heads averaged first)."""
    rs = [r for (a, _), r in sorted(runs.items()) if a == "dsv" and r.get("layers")]
    if not rs:
        return []
    firsts = [first_sparse(r) for r in rs]
    out = []
    for i, first in enumerate(rs[0]["layers"]):
        def mean_of(name):
            vals = [statistics.fmean(r["layers"][i][name]) if isinstance(r["layers"][i][name], list)
                    else r["layers"][i][name] for r in rs if r["layers"][i].get(name) is not None]
            return statistics.fmean(vals) if vals else None

        out.append({"layer": first["layer"], "sparse_seeds": sum(bool(r["layers"][i]["sparse"]) for r in rs),
                    "seeds": len(rs), "density": mean_of("density"), "recall_at_k": mean_of("recall_at_k"),
                    "recall_exact_at_k": mean_of("recall_exact_at_k"), "relative_recall": mean_of("relative_recall"),
                    "token_sparsity": mean_of("sparsity"),
                    "first_sparse": [None if f is None else f[i] for f in firsts]})
    return out


def _f(v, fmt="{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(report: Dict) -> str:
    lines = []
    for data, rep in report.items():
        meta = rep["meta"][0]
        setup = meta["setup"]
        env = meta.get("environment") or {}
        files = [f"{m['file']} (seeds {', '.join(map(str, m['seeds']))}; checkpoint at iteration "
                 f"{(m.get('checkpoint') or {}).get('iteration')}, commit {str((m.get('environment') or {}).get('commit', '?'))[:10]})"
                 for m in rep["meta"]]
        group = setup.get("query_group")
        start = ("the dsv arm starts from the predictor and statistics fitted in the checkpoint run"
                 if meta["dsv_start"] == "checkpoint" else "the dsv arm fits its predictor from scratch")
        lines += [f"#### {data} videos: {setup['num_layers']} layers x {setup['hidden_size']} hidden "
                  f"({setup['num_heads']} heads), latent {'x'.join(map(str, setup['latent_shape']))}"
                  + (f", query groups {'x'.join(map(str, group))}" if group else "")
                  + f", {meta['iters']} iterations per arm from a dense checkpoint ({start}); "
                  f"{env.get('gpu', env.get('device', '?'))}",
                  "", "From " + "; ".join(files) + (
                      ". Each file trained its own checkpoint (same recipe); seeds pair within a file." if len(files) > 1
                      else "."), ""]
        lines += ["| paired difference (final fixed-validation loss) | seeds | per seed (%) | mean (%) | 95% interval (%) | verdict |",
                  "|---|---|---|---|---|---|"]
        for r in rep["paired"]:
            per = ", ".join(f"{d:+.2f}" for d in r["diff_pct"])
            if r.get("vacuous_seeds"):
                per += f" (seeds {', '.join(map(str, r['vacuous_seeds']))} left out: their DSV arm ran no layer sparse)"
            ci = "-" if r["lo"] is None else f"[{r['lo']:+.2f}, {r['hi']:+.2f}]"
            lines.append(f"| {r['comparison']} | {r['n']} | {per} | {r['mean']:+.2f} | {ci} | {r['verdict']} |")
        lines += ["", "| arm | seeds | final loss (mean +- sd) | step ms (median) | stage 1 | stage 2 | switch at | "
                      "sparse layer-iterations |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in rep["arms"]:
            sd = "" if r["sd"] is None else f" +- {r['sd']:.5f}"
            st = r["step_ms"]
            switch = ", ".join(map(str, r["switch_iterations"])) or "-"
            if r["from_checkpoint"]:
                switch = "in the checkpoint" if switch == "-" else f"{switch}; in the checkpoint"
            lines.append(f"| {r['arm']} | {r['n']} | {r['mean']:.5f}{sd} | {_f(st['all'], '{:.1f}')} | "
                         f"{_f(st['stage1'], '{:.1f}')} | {_f(st['stage2'], '{:.1f}')} | {switch} | "
                         f"{', '.join(f'{100 * f:.0f}%' for f in r['sparse_fraction']) or '-'} |")
        if rep["layers"]:
            lines += ["", "| DSV layer | sparse at the end (seeds) | first sparse at (per seed) | token sparsity | "
                          "chosen density | recall at K | exact-q/k recall | relative |",
                      "|---|---|---|---|---|---|---|---|"]
            for r in rep["layers"]:
                first = ", ".join("never" if f is None else str(f) for f in r["first_sparse"])
                lines.append(f"| {r['layer']} | {r['sparse_seeds']}/{r['seeds']} | {first} | {_f(r['token_sparsity'])} | "
                             f"{_f(r['density'])} | {_f(r['recall_at_k'])} | {_f(r['recall_exact_at_k'])} | "
                             f"{_f(r['relative_recall'])} |")
        lines.append("")
    return "\n".join(lines)


def plot(report: Dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"dense": "tab:blue", "dsv": "tab:orange", "control": "tab:red", "aa": "tab:gray"}
    fig, axes = plt.subplots(len(report), 2, figsize=(12, 4.2 * len(report)), squeeze=False)
    for row, (data, rep) in enumerate(report.items()):
        ax = axes[row][0]
        by_arm = defaultdict(list)
        for (arm, _), run in sorted(rep["runs"].items()):
            by_arm[arm].append(run["val_curve"])
        for arm, curves in by_arm.items():
            its = [p["iteration"] for p in curves[0]]
            vals = [[c[i]["loss"] for c in curves if i < len(c)] for i in range(len(its))]
            mean = [statistics.fmean(v) for v in vals]
            ax.plot(its, mean, "-o", ms=3, color=colours.get(arm), label=f"{arm} ({len(curves)} seeds)")
            ax.fill_between(its, [min(v) for v in vals], [max(v) for v in vals], color=colours.get(arm), alpha=0.2)
        ax.set_xlabel("iteration (from the dense checkpoint)")
        ax.set_ylabel("fixed-validation flow loss")
        ax.set_title(f"{data}: loss, mean and seed range")
        ax.legend(fontsize=8)
        ax = axes[row][1]
        for i, r in enumerate(rep["paired"]):
            ax.scatter([i] * len(r["diff_pct"]), r["diff_pct"], color=colours.get(r["arm"]), s=18, zorder=3)
            if r["lo"] is not None:
                ax.errorbar([i + 0.15], [r["mean"]], yerr=[[r["mean"] - r["lo"]], [r["hi"] - r["mean"]]], fmt="D",
                            color="black", capsize=4, ms=4, zorder=4)
        ax.axhline(0, color="black", lw=0.8)
        for y in (-TARGET_PCT, TARGET_PCT):
            ax.axhline(y, color="green", lw=0.8, ls="--")
        ax.set_xticks(range(len(rep["paired"])))
        ax.set_xticklabels([r["comparison"].replace(" - dense", "") for r in rep["paired"]], fontsize=8, rotation=12)
        ax.set_ylabel("paired difference vs dense (% of loss)")
        ax.set_title(f"{data}: per seed, mean and 95% t interval (dashed: +-{TARGET_PCT:g}%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def build(paths: Sequence[str]) -> Dict:
    report = {}
    for data, d in load_runs(paths).items():
        runs = d["runs"]
        if not any(a == "dense" for a, _ in runs):
            raise ValueError(f"{data}: no dense arm in {list(paths)}; every comparison is paired with it.")
        report[data] = {"runs": runs, "meta": d["meta"], "paired": paired(runs), "arms": arm_rows(runs),
                        "layers": layer_rows(runs)}
    return report


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="arms JSON files from benchmarks/quality.py")
    p.add_argument("--md", default=None, help="write the tables here (also printed)")
    p.add_argument("--png", default=None, help="loss curves and paired differences")
    p.add_argument("--json", default=None, help="the summary (paired rows, arm rows, layer rows)")
    args = p.parse_args(argv)
    report = build(args.inputs)
    text = markdown(report)
    print(text)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text + "\n")
    if args.png:
        plot(report, args.png)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({data: {k: v for k, v in rep.items() if k != "runs"} for data, rep in report.items()}, f, indent=1)
    return report


if __name__ == "__main__":
    main()
