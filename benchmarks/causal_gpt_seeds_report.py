"""Seeded DSV-vs-dense comparison of Megatron-LM's ``pretrain_gpt.py`` with the causal DSV spec.

    python benchmarks/causal_gpt_seeds_report.py LANE_DIR [LANE_DIR ...] --json seeds.json --md seeds.md

Reads what ``run_gpu_causal_gpt.sh`` writes with ``JOBS``, in one folder per lane:
``gpt_<mode>_s<seed>[_<tag>].log`` (parsed by ``causal_gpt_report.parse_log``), the DSV runs'
``dsv_stats_auto_s<seed>.jsonl``, ``jobs.tsv`` (wall seconds, skipped jobs) and ``corpus.json``.
Runs are keyed by (arm, seed): ``dense``, ``auto`` (DSV) and ``aa`` (dense again, tag ``aa``: the
A/A repeat of the same seed); any other tag is an arm of its own, ``<mode>_<tag>``.

Every arm is paired with the dense run of its seed, which shares its initialisation, data order and
validation samples (Megatron's ``--seed``), so that what remains is attention (DSV) and GPU
nondeterminism (A/A). The paired difference is taken at the final validation (``on validation
set``), in percent of the dense loss; mean and 95% interval over seeds with
``quality_report.interval``, verdict with ``quality_report.verdict`` (DSV against +-1%, the A/A is
the noise floor). The same at every periodic validation, and, without a verdict, on the mean
training loss of the last ``--tail`` iterations (the validation holds 4 samples; the training tail
holds every iteration's batch). Per DSV run, from its statistics log: the fraction of
(layer, iteration) pairs that ran sparse, the iteration each layer first went sparse, and the last
profile's per-layer density (for a causal layer, the share of the allowed pairs K selects) and K.
Seeds whose DSV run never ran a layer sparse are named: those pairs only test DSV held dense. The
seed floor (dense of each seed against dense of the lowest seed) is listed, unpaired.

Forked arms (``base``, ``sparse``, ``held`` jobs; ``held`` with tag ``aa`` is the A/A repeat): per
seed, ``sparse`` and ``held`` resume the same checkpoint of ``base`` (same weights, predictor, DSV
state, optimizer, RNG, data order and validation windows), so ``sparse - held`` is DSV's effect plus
the nondeterminism that ``held_aa - held`` measures. An arm counts only if its log says Megatron
loaded the checkpoint at the base's iteration (``successfully loaded checkpoint ... at iteration
B``; an arm that started from scratch or never loaded is listed as not resumed). Compared: the final
validation (verdict), every validation after B (periodic, then the final one) and the training tail.
The verdict is ``quality_report.verdict`` against +-1%, and "within" is kept only when the A/A floor
(the largest ``|held_aa - held|`` at the final validation, over at least :data:`MIN_AA` seeds) is
inside that margin too: a protocol whose own noise reaches the margin cannot show tracking.
Sparsity of a forked arm covers its iterations after B only.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.causal_gpt_report import compare, parse_log
from benchmarks.json_out import write_json
from benchmarks.quality_report import TARGET_PCT, interval, verdict

LOG = re.compile(r"^gpt_(dense|auto|base|sparse|held)_s(\d+)(?:_([a-z0-9]+))?\.log$")
LOADED = re.compile(r"successfully loaded checkpoint from (\S+) .*at iteration (\d+)")
SAVED = re.compile(r"successfully saved checkpoint from iteration\s+(\d+)")
LABELS = {"auto": "DSV (auto) - dense", "aa": "A/A: dense again, same seed - dense",
          "sparse": "DSV sparse arm - held arm (forked)", "held_aa": "A/A: held arm again - held arm (forked)"}
FORK_MODES = ("base", "sparse", "held")
REFERENCE = {"sparse": "held", "held_aa": "held"}  # forked arms; every other arm is paired with dense
TAIL = 100
MIN_AA = 2
"""A/A repeats the forked verdict needs before it can say "within": one difference is no floor."""


def arm_of(mode: str, tag: Optional[str]) -> str:
    if not tag:
        return mode
    return "aa" if (mode, tag) == ("dense", "aa") else f"{mode}_{tag}"


def fork_iterations(path: str) -> Dict[str, Optional[int]]:
    """The iteration a forked job loaded (arms) and saved (base) a checkpoint at, from its log."""
    loaded = saved = None
    with open(path, errors="replace") as f:
        for line in f:
            if m := LOADED.search(line):
                loaded = int(m[2])
            elif m := SAVED.search(line):
                saved = int(m[1])
    return {"loaded_at": loaded, "saved_at": saved}


def read_stats(path: str) -> Optional[List[Dict]]:
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def read_jobs(path: str) -> List[Dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def load(dirs: Sequence[str]) -> Dict:
    """``{"runs": {(arm, seed): run}, "skipped": [job names], "corpus_sha256": {dir: sha}}``; a
    (arm, seed) found twice is refused (two lanes ran the same job: keep one)."""
    runs: Dict[Tuple[str, int], Dict] = {}
    skipped: List[str] = []
    corpus: Dict[str, Optional[str]] = {}
    for d in dirs:
        if not os.path.isdir(d):
            raise ValueError(f"{d} is not a folder; pass the lane folders run_gpu_causal_gpt.sh wrote with JOBS.")
        jobs = {j["name"]: j for j in read_jobs(os.path.join(d, "jobs.tsv"))}
        skipped += [f"{os.path.basename(os.path.normpath(d))}/{n}" + (f" ({j['note']})" if j.get("note") else "")
                    for n, j in jobs.items() if j["exit_code"] == "skipped"]
        cpath = os.path.join(d, "corpus.json")
        if os.path.exists(cpath):
            with open(cpath) as f:
                corpus[d] = json.load(f).get("sha256")
        for name in sorted(os.listdir(d)):
            m = LOG.match(name)
            if not m:
                continue
            mode, seed, tag = m[1], int(m[2]), m[3]
            key = (arm_of(mode, tag), seed)
            if key in runs:
                raise ValueError(f"arm {key[0]} seed {seed} is in {runs[key]['dir']} and {d}; pass one of them.")
            stem = name[len("gpt_"):-len(".log")]
            job = jobs.get(stem)
            runs[key] = {"dir": d, "name": stem, "mode": mode, "seed": seed, "tag": tag,
                         "log": parse_log(os.path.join(d, name)),
                         "stats": read_stats(os.path.join(d, f"dsv_stats_{stem}.jsonl")) if mode != "dense" else None,
                         "seconds": int(job["seconds"]) if job else None,
                         **(fork_iterations(os.path.join(d, name)) if mode in FORK_MODES else {})}
    if not runs:
        raise ValueError(f"no gpt_<mode>_s<seed>[_<tag>].log in {list(dirs)}; were the runs started with JOBS?")
    shas = {s for s in corpus.values() if s is not None}
    if len(shas) > 1:
        raise ValueError(f"the lanes trained on different corpora (sha256 {corpus}); their seeds cannot be pooled.")
    return {"runs": runs, "skipped": skipped, "corpus_sha256": corpus}


def final_validation(log: Dict) -> Optional[float]:
    """The loss of the validation Megatron runs after training (``on validation set``); None for a
    run cut short."""
    rows = [r["loss"] for r in log["validation"] if r["set"] == "validation"]
    return rows[-1] if rows else None


def train_tail(log: Dict, tail: int) -> Optional[float]:
    """Mean of the logged training losses of the last ``tail`` iterations (each logged value is
    Megatron's mean over its log interval); None for a run that did not complete."""
    rows = [r for r in log["train"] if r["loss"] is not None]
    if not rows or not log["completed"]:
        return None
    last = rows[-1]["train_iters"]
    vals = [r["loss"] for r in rows if r["iteration"] > last - tail]
    return statistics.fmean(vals) if vals else None


def steps_run(log: Dict) -> int:
    """Iterations the run finished (Megatron counts from 1; the last one logged)."""
    return log["train"][-1]["iteration"] if log["train"] else 0


def stats_summary(entries: Optional[List[Dict]], steps: int, start: int = 0) -> Optional[Dict]:
    """What a DSV run's statistics log says about sparsity over its iterations ``start`` to
    ``steps - 1`` (a forked arm: from the iteration it resumed at).

    Each entry is written after a profiled iteration (counted from 0, as the controller counts)
    and holds every layer's state after that iteration's decisions; that state runs iterations
    ``i + 1`` up to the next entry (decisions change only on profiled iterations). Every layer
    runs dense before the first entry (stage 1 is dense; a forked arm's log starts where it resumed)."""
    if not entries or steps <= start:
        return None
    entries = sorted(entries, key=lambda e: e["iteration"])
    layers = [l["layer"] for l in entries[0]["layers"]]
    sparse_pairs = 0
    first: Dict[int, int] = {}
    for cur, nxt in zip(entries, entries[1:] + [None]):
        end = steps - 1 if nxt is None else min(nxt["iteration"], steps - 1)
        span = max(0, end - cur["iteration"])
        for l in cur["layers"]:
            if l["sparse"] and span:
                sparse_pairs += span
                first.setdefault(l["layer"], cur["iteration"])
    last = entries[-1]
    final = []
    for l in last["layers"]:
        k = l.get("k")
        final.append({"layer": l["layer"], "sparse": bool(l["sparse"]), "density": l.get("density"),
                      "k_mean": statistics.fmean(k) if k else None,
                      "token_sparsity": statistics.fmean(l["sparsity"]) if l.get("sparsity") else None})
    dens_sparse = [f["density"] for f in final if f["sparse"] and f["density"] is not None]
    return {"sparse_fraction": sparse_pairs / ((steps - start) * len(layers)), "from_iteration": start,
            "first_sparse": {str(n): first.get(n) for n in layers},
            "last_profile_iteration": last["iteration"], "switch_iteration": last.get("switch_iteration"),
            "sparse_layers_at_end": sum(f["sparse"] for f in final), "layers": len(final),
            "mean_density_sparse_layers": statistics.fmean(dens_sparse) if dens_sparse else None,
            "final_layers": final}


def _pct(a: float, b: float) -> float:
    return 100 * (a / b - 1)


def _comparison(arm: str, rows_by_seed: Dict[int, Optional[float]], ref_by_seed: Dict[int, Optional[float]],
                judge: bool) -> Optional[Dict]:
    seeds = sorted(s for s in rows_by_seed if s in ref_by_seed)
    incomplete = [s for s in seeds if rows_by_seed[s] is None or ref_by_seed[s] is None]
    seeds = [s for s in seeds if s not in incomplete]
    if not seeds:
        return {"seeds": [], "incomplete_seeds": incomplete, "n": 0, "diff_pct": [], "mean": None, "sd": None,
                "lo": None, "hi": None, "verdict": "no complete pair"} if incomplete else None
    diffs = [_pct(rows_by_seed[s], ref_by_seed[s]) for s in seeds]
    ci = interval(diffs)
    out = {"seeds": seeds, "incomplete_seeds": incomplete, "diff_pct": diffs,
           "diff_abs": [rows_by_seed[s] - ref_by_seed[s] for s in seeds], **ci}
    if judge:
        out["verdict"] = verdict("aa" if arm in ("aa", "held_aa") else "dsv", "final", ci)
    return out


def reference_of(runs: Dict, arm: str) -> Optional[str]:
    """The arm ``arm`` is paired with: ``held`` for forked arms, ``dense`` for from-scratch ones;
    None for the references themselves and the base."""
    mode = next(r["mode"] for (a, _), r in runs.items() if a == arm)
    if arm in ("dense", "base", "held"):
        return None
    return "held" if mode in FORK_MODES else "dense"


def usable(run: Dict) -> bool:
    """A from-scratch run always; a forked arm only if it resumed the base's checkpoint."""
    return run["mode"] not in ("sparse", "held") or run["resumed"]


def aa_gate(row: Dict, aa: Optional[Dict]) -> Dict:
    """The forked verdict: "within" needs an A/A floor (largest |A/A| at the final validation, over
    at least MIN_AA seeds) inside the margin as well; a floor outside it is named in any verdict."""
    n = aa["n"] if aa else 0
    floor = max((abs(d) for d in aa["diff_pct"]), default=None) if aa else None
    row.update(aa_floor_pct=floor, aa_n=n)
    v = row["verdict"]
    noisy = floor is not None and floor > TARGET_PCT
    if v.startswith("within"):
        if n < MIN_AA:
            row["verdict"] = (f"inconclusive: interval within +-{TARGET_PCT:g}% but {n} A/A repeat(s) "
                              f"({MIN_AA} needed for a noise floor)")
        elif noisy:
            row["verdict"] = (f"inconclusive: interval within +-{TARGET_PCT:g}% but the A/A floor "
                              f"{floor:.2f}% is not (the protocol is too noisy for this margin)")
        else:
            row["verdict"] = f"tracks: within +-{TARGET_PCT:g}%, A/A floor {floor:.2f}% over {n} seeds"
    elif noisy:
        row["verdict"] = f"{v}; A/A floor {floor:.2f}% exceeds +-{TARGET_PCT:g}%: the protocol is too noisy for this margin"
    return row


def paired(runs: Dict, tail: int) -> List[Dict]:
    """Per arm with a reference (dense, or held for forked arms): the final validation (with a
    verdict) and the training tail (without)."""
    rows = []
    arms = {a for a, _ in runs if reference_of(runs, a)}
    order = ("auto", "aa", "sparse", "held_aa")
    for arm in sorted(arms, key=lambda a: (order.index(a) if a in order else len(order), a)):
        ref = reference_of(runs, arm)
        mine = {s: r for (a, s), r in runs.items() if a == arm}
        refs = {s: r for (a, s), r in runs.items() if a == ref}
        for what, fn, judge in (("final validation", final_validation, True),
                                (f"training loss, mean of the last {tail} iterations", lambda l: train_tail(l, tail), False)):
            val = lambda r: fn(r["log"]) if usable(r) else None
            c = _comparison(arm, {s: val(r) for s, r in mine.items()}, {s: val(r) for s, r in refs.items()}, judge)
            if c is None:
                continue
            vacuous = []
            if arm in ("auto", "sparse"):
                vacuous = [s for s in c["seeds"] if (runs[(arm, s)]["sparsity"] or {}).get("sparse_fraction") == 0]
            c.update(comparison=LABELS.get(arm, f"{arm} - {ref}"), arm=arm, reference=ref, evaluation=what,
                     vacuous_seeds=vacuous, unpaired_seeds=sorted(s for s in mine if s not in refs),
                     not_resumed=sorted(s for s, r in {**mine, **refs}.items() if not usable(r)))
            rows.append(c)
    aa = next((r for r in rows if r["arm"] == "held_aa" and r["evaluation"] == "final validation"), None)
    for r in rows:
        if r["arm"] != "held_aa" and r["reference"] == "held" and "verdict" in r and r["n"]:
            aa_gate(r, aa if aa and aa["n"] else None)
    return rows


def periodic(runs: Dict, arm: str) -> List[Dict]:
    """``arm`` vs its reference at every validation both runs of a seed logged (periodic, then the
    final one), over the seeds that logged it; a forked arm's validations are all after the fork."""
    ref = reference_of(runs, arm)
    by_key: Dict[Tuple[int, str], Dict[int, float]] = {}
    for (a, s), r in runs.items():
        if a != arm or (ref, s) not in runs or not (usable(r) and usable(runs[(ref, s)])):
            continue
        for row in compare(runs[(ref, s)]["log"], r["log"])["validation_loss"]:
            if row["rel_diff"] is not None:
                by_key.setdefault((row["iteration"], row["set"]), {})[s] = 100 * row["rel_diff"]
    out = []
    for (it, which), per in sorted(by_key.items(), key=lambda kv: (kv[0][1] != "periodic", kv[0][0])):
        seeds = sorted(per)
        out.append({"iteration": it, "set": which, "seeds": seeds, "diff_pct": [per[s] for s in seeds],
                    **interval([per[s] for s in seeds])})
    return out


def seed_floor(runs: Dict) -> Optional[Dict]:
    """Dense final validation per seed, and each seed's difference from the lowest seed's (in
    percent): initialisation, data order and validation samples all differ, so this is the spread
    an unpaired comparison would face."""
    final = {s: final_validation(r["log"]) for (a, s), r in runs.items() if a == "dense"}
    final = {s: v for s, v in sorted(final.items()) if v is not None}
    if len(final) < 2:
        return None
    base = min(final)
    vals = list(final.values())
    return {"base_seed": base, "final": {str(s): v for s, v in final.items()},
            "diff_pct": {str(s): _pct(v, final[base]) for s, v in final.items() if s != base},
            "sd_pct_of_mean": 100 * statistics.stdev(vals) / statistics.fmean(vals)}


def run_rows(runs: Dict) -> List[Dict]:
    out = []
    for (arm, seed), r in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0] not in ("dense", "base"), kv[0][0])):
        log = r["log"]
        step = None
        ref = reference_of(runs, arm)
        if ref and (ref, seed) in runs:
            step = compare(runs[(ref, seed)]["log"], log)["step_time_median"]
        out.append({"arm": arm, "seed": seed, "name": r["name"], "lane": os.path.basename(os.path.normpath(r["dir"])),
                    "completed": log["completed"], "exit_code": log["exit_code"], "errors": log["errors"],
                    "iterations": steps_run(log), "final_validation": final_validation(log),
                    "switch_iteration": log["switch_iteration"], "seconds": r["seconds"],
                    "reference": ref, "step_time_median_vs_reference": step, "sparsity": r["sparsity"],
                    "loaded_at": r.get("loaded_at"), "saved_at": r.get("saved_at"), "resumed": r.get("resumed")})
    return out


def build(dirs: Sequence[str], tail: int = TAIL, note: str = "") -> Dict:
    d = load(dirs)
    runs = d["runs"]
    for (arm, seed), r in runs.items():
        if r["mode"] in ("sparse", "held"):
            base = runs.get(("base", seed))
            saved = base["saved_at"] if base else None
            # resumed: Megatron logged the load, at the iteration the base saved (when its log is here)
            r["resumed"] = r["loaded_at"] is not None and (saved is None or r["loaded_at"] == saved)
        start = r["loaded_at"] if r.get("resumed") else 0
        r["sparsity"] = stats_summary(r["stats"], steps_run(r["log"]), start) if r["mode"] != "dense" else None
    scratch = {a for (a, _), r in runs.items() if r["mode"] not in FORK_MODES and a != "dense"}
    if scratch and not any(a == "dense" for a, _ in runs):
        raise ValueError(f"no dense run in {list(dirs)}; every from-scratch comparison is paired with the dense run of its seed.")
    forked = {a for (a, _), r in runs.items() if r["mode"] in ("sparse", "held") and a != "held"}
    if forked and not any(a == "held" for a, _ in runs):
        raise ValueError(f"no held arm in {list(dirs)}; every forked arm is paired with the held arm of its seed.")
    arms = sorted(a for a in {a for a, _ in runs} if reference_of(runs, a))
    return {"note": note, "dirs": list(dirs), "corpus_sha256": d["corpus_sha256"], "target_pct": TARGET_PCT,
            "min_aa": MIN_AA, "paired": paired(runs, tail), "periodic": {a: periodic(runs, a) for a in arms},
            "seed_floor": seed_floor(runs), "runs": run_rows(runs), "skipped_jobs": d["skipped"]}


def _f(v, fmt="{:+.2f}") -> str:
    return "-" if v is None else fmt.format(v)


def markdown(rep: Dict) -> str:
    lines = ["#### Causal GPT (pretrain_gpt.py, causal DSV spec): DSV and A/A repeats against their reference, paired per seed", ""]
    if rep["note"]:
        lines += [rep["note"], ""]
    lines += ["| paired difference | evaluation | seeds | per seed (%) | mean (%) | 95% interval (%) | verdict |",
              "|---|---|---|---|---|---|---|"]
    for r in rep["paired"]:
        per = ", ".join(f"{d:+.2f}" for d in r["diff_pct"]) or "-"
        notes = []
        if r["incomplete_seeds"]:
            notes.append(f"seeds {', '.join(map(str, r['incomplete_seeds']))} left out: a run of the pair did not finish"
                         + (" or did not resume the base" if r["reference"] == "held" else ""))
        if r["vacuous_seeds"]:
            notes.append(f"seeds {', '.join(map(str, r['vacuous_seeds']))}: no layer ran sparse")
        if notes:
            per += " (" + "; ".join(notes) + ")"
        ci = "-" if r["lo"] is None else f"[{r['lo']:+.2f}, {r['hi']:+.2f}]"
        lines.append(f"| {r['comparison']} | {r['evaluation']} | {r['n']} | {per} | {_f(r['mean'])} | {ci} | "
                     f"{r.get('verdict', '-')} |")
    for arm, rows in rep["periodic"].items():
        if not rows:
            continue
        lines += ["", f"| validation, {LABELS.get(arm, arm)} | seeds | per seed (%) | mean (%) | 95% interval (%) |",
                  "|---|---|---|---|---|"]
        for r in rows:
            ci = "-" if r["lo"] is None else f"[{r['lo']:+.2f}, {r['hi']:+.2f}]"
            it = f"{r['iteration']}" + (" (final)" if r["set"] != "periodic" else "")
            lines.append(f"| {it} | {r['n']} | {', '.join(f'{d:+.2f}' for d in r['diff_pct'])} | {r['mean']:+.2f} | {ci} |")
    lines += ["", "| run | lane | iterations | final validation | switch at | sparse layer-iterations | sparse layers at end | "
                  "density of the sparse layers at end | step ms vs reference, stage 1 / stage 2 | wall s |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rep["runs"]:
        sp = r["sparsity"] or {}
        st = r["step_time_median_vs_reference"]
        step = "-"
        if st:
            step = " / ".join(f"{_f(st[k]['dsv_ms'], '{:.1f}')} vs {_f(st[k]['dense_ms'], '{:.1f}')}" for k in ("stage1", "stage2"))
            step += f" ({r['reference']})"
        if r["arm"] == "base" or r["arm"].startswith("base_"):
            status = f" (saved at {r['saved_at']})" if r["saved_at"] is not None else f" (no checkpoint: exit code {r['exit_code']})"
        elif r["resumed"] is False:
            status = f" (not resumed: {'loaded at ' + str(r['loaded_at']) if r['loaded_at'] is not None else 'no checkpoint loaded'})"
        else:
            status = ("" if r["completed"] else f" (cut: exit code {r['exit_code']})") + (
                f" (from {r['loaded_at']})" if r["resumed"] else "")
        at_end = f"{sp['sparse_layers_at_end']}/{sp['layers']}" if sp else "-"
        lines.append(f"| {r['name']} | {r['lane']} | {r['iterations']}{status} | {_f(r['final_validation'], '{:.4f}')} | "
                     f"{r['switch_iteration'] if r['switch_iteration'] is not None else '-'} | "
                     f"{_f(sp.get('sparse_fraction'), '{:.1%}')} | "
                     f"{at_end} | "
                     f"{_f(sp.get('mean_density_sparse_layers'), '{:.3f}')} | {step} | {r['seconds'] if r['seconds'] is not None else '-'} |")
    fl = rep["seed_floor"]
    if fl:
        lines += ["", f"Seed floor (unpaired: initialisation, data order and validation samples differ): dense final "
                      f"validation against seed {fl['base_seed']}: "
                      + ", ".join(f"seed {s} {d:+.2f}%" for s, d in fl["diff_pct"].items())
                      + f"; sd over seeds {fl['sd_pct_of_mean']:.2f}% of the mean."]
    if rep["skipped_jobs"]:
        lines += ["", f"Skipped (did not start): {', '.join(rep['skipped_jobs'])}."]
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", help="lane folders of run_gpu_causal_gpt.sh with JOBS")
    p.add_argument("--json", default=None, help="write the report here")
    p.add_argument("--md", default=None, help="write the tables here (also printed)")
    p.add_argument("--tail", type=int, default=TAIL, help="iterations in the training-loss tail (default %(default)s)")
    p.add_argument("--note", default="", help="free text stored in the report (hardware, commit, flags)")
    args = p.parse_args(argv)
    if args.tail < 1:
        p.error(f"--tail must be at least 1 iteration, got {args.tail}")
    rep = build(args.dirs, args.tail, args.note)
    text = markdown(rep)
    print(text)
    if args.json:
        write_json(rep, args.json)
    if args.md:
        with open(args.md, "w") as f:
            f.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
