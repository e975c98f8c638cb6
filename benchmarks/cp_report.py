"""Issue 16's report: the outputs of benchmarks/run_gpu_cp_x2.sh as README tables, a JSON and the
loss curves of the pretraining example under CP.

    python benchmarks/cp_report.py --cp cp_2gpu.json [--cp cp_2gpu_256k.json] \\
        --calibration cp_calibration.json --run cp2_auto=pretrain_cp2_auto.log:dsv_stats_cp2_auto.jsonl \\
        --run cp1_auto=pretrain_cp1_auto.log:dsv_stats_cp1_auto.jsonl --run cp2_dense=pretrain_cp2_dense.log \\
        --run cp2_sparse_seq=pretrain_cp2_sparse_seq.log:dsv_stats_cp2_sparse_seq.jsonl --out cp_report

Writes ``<out>.json``, ``<out>.md`` (tables) and, when the compared runs logged iterations,
``<out>.png`` (training loss of the two runs per iteration, and their relative difference).

* Layer stack (``benchmarks/cp.py`` rows): block fwd+bwd ms of planner / head / seq / dense, the
  planner's split, planner vs the better pure split, ``target_met`` (within 2%), and per variant
  the cost model's predicted attention ms next to the measured one.
* DiT step: planner / head / seq, ``target_met``.
* Links: the calibration's measured bandwidth and latency per link kind, and cp.py's re-fit.
* Pretraining: per run the median step time over iterations after ``--skip-iters`` (start-up and
  compiles excluded), the stage switch, sparse layers at the end; the step-time ratios of each run
  to ``--dense`` (DSV vs dense under CP); the loss agreement of ``--compare A,B`` (same seed, data
  and draws): per-iteration relative difference of the training loss, next to the curve's own
  iteration-to-iteration relative change (the scale of its noise), and the validation losses at
  common iterations; the selective exchange's bytes per layer (summed over the CP group, from the
  DSV stats log) vs an all-gather of the remote K/V.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
from typing import Dict, List, Optional, Sequence

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks.pretrain_report import parse as parse_log  # noqa: E402

VARIANTS = ("planner", "head", "seq", "dense")
SWITCH = re.compile(r"DSV stage switch at iteration (\d+)")


def _f(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def load_cp(paths: Sequence[str]) -> Dict:
    """Rows and DiT steps of every cp.py JSON (later files add lengths), with their environment."""
    rows, dits, files = [], [], []
    for path in paths:
        with open(path) as f:
            res = json.load(f)
        rows += res["rows"]
        dits += res.get("dit", [])
        files.append({"file": path, "env": res.get("env"), "sizes": res.get("sizes"), "world": res.get("world"), "complete": res.get("complete"),
                      "correctness": res.get("correctness"), "target": res.get("target"), "refit": res.get("refit"),
                      "links": res.get("cost_model", {}).get("links"), "calibration": res.get("calibration")})
    return {"rows": rows, "dit": dits, "files": files}


def _met(flag: Optional[bool]) -> str:
    return "-" if flag is None else ("yes" if flag else "NO")


def _ratio(row: Dict, key: str) -> str:
    return f"x{row[key]:.3f}" if key in row else "-"


def _autotune(row: Dict, v: Dict, unit: str, key: str) -> str:
    """The autotuned variant's time and split; "-" for results from before the variant existed."""
    if "autotune" not in v or key not in row:
        return "-"
    a = v["autotune"]
    split = a["split"] if "split" in a else f"{a['plan']['head_size']}x{a['plan']['seq_size']}"
    return f"{a[unit]['ms']:.2f} ({split})"


def stack_table(rows: List[Dict]) -> List[str]:
    out = ["| S | profile | planner split | planner ms | autotune ms (split) | head ms | seq ms | dense ms | "
           "planner / autotune vs best pure | target met: planner / autotune | "
           "attn ms measured / predicted: planner, head, seq, dense | correct |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        v = r["variants"]
        pp = v["planner"]["plan"]
        att = ", ".join(f"{v[n]['attn']['ms']:.2f} / {v[n]['plan']['predicted_attn_ms']:.2f}" for n in VARIANTS)
        ok = all(v[n].get("correct", {}).get("passed", True) for n in VARIANTS)
        checked = r.get("correctness_checked", False)
        out.append(
            f"| {r['S']} | {r['profile']} | {pp['head_size']}x{pp['seq_size']} | {v['planner']['block']['ms']:.2f} | "
            f"{_autotune(r, v, 'block', 'block_autotune_speedup_vs_best_pure')} | "
            f"{v['head']['block']['ms']:.2f} | {v['seq']['block']['ms']:.2f} | {v['dense']['block']['ms']:.2f} | "
            f"x{r['block_planner_speedup_vs_best_pure']:.3f} / {_ratio(r, 'block_autotune_speedup_vs_best_pure')} | "
            f"{_met(r['target_met'])} / {_met(r.get('autotune_target_met'))} | {att} | "
            f"{('yes' if ok else 'NO') if checked else 'not checked'} |")
    return out


def dit_table(dits: List[Dict]) -> List[str]:
    out = ["| S | planner ms (split) | autotune ms (split) | head ms | seq ms | planner / autotune vs best pure | "
           "target met: planner / autotune | loss check |",
           "|---|---|---|---|---|---|---|---|"]
    for d in dits:
        if "skipped" in d:
            out.append(f"| {d['S']} | skipped: {d['skipped']} | | | | | | |")
            continue
        v = d["variants"]
        checked = any("correct" in x for x in v.values())
        ok = all(x.get("correct", {}).get("passed", True) for x in v.values())
        out.append(f"| {d['S']} | {v['planner']['step']['ms']:.2f} ({v['planner']['split']}) | "
                   f"{_autotune(d, v, 'step', 'autotune_speedup_vs_best_pure')} | "
                   f"{v['head']['step']['ms']:.2f} | {v['seq']['step']['ms']:.2f} | "
                   f"x{d['planner_speedup_vs_best_pure']:.3f} / {_ratio(d, 'autotune_speedup_vs_best_pure')} | "
                   f"{_met(d['target_met'])} / {_met(d.get('autotune_target_met'))} | "
                   f"{('yes' if ok else 'NO') if checked else 'not checked'} |")
    return out


def links_table(cal: Optional[Dict], files: List[Dict]) -> List[str]:
    out = []
    if cal is not None:
        env = cal.get("env", {})
        out += [f"Calibration: {env.get('world_size')} ranks on {env.get('nodes')} node(s), {env.get('backend')}, "
                f"{env.get('device')}, {env.get('date_utc')}; per-peer messages {env.get('message_bytes')} bytes.", "",
                "| link | GB/s per GPU per direction | latency ms | samples |", "|---|---|---|---|"]
        for kind, link in cal["links"].items():
            out.append(f"| {kind} (measured) | {link['gbps']:.4g} | {link['latency_ms']:.4g} | "
                       f"{len(cal.get('samples', {}).get(kind, []))} |")
        out.append("")
    for f in files:
        fit = f.get("refit")
        if not fit:
            continue
        out += [f"Re-fit of the cost model on {fit['cases']} measured attention cases ({os.path.basename(f['file'])}):", "",
                "| model | intra GB/s | latency ms | compute scale | median abs rel err | max abs rel err |",
                "|---|---|---|---|---|---|"]
        for k in ("before", "bandwidth_latency", "with_compute_scale"):
            m = fit[k]
            out.append(f"| {k} | {m['intra_node_gbps']:.4g} | {m['latency_ms']:.4g} | {m['compute_scale']:.4g} | "
                       f"{m['median_abs_rel_err']:.3f} | {m['max_abs_rel_err']:.3f} |")
        out.append("")
    return out


def load_run(log: str, stats: Optional[str]) -> Dict:
    run = parse_log(log)
    switch = None
    with open(log, errors="replace") as f:
        for line in f:
            if m := SWITCH.search(line):
                switch = int(m[1])
    run["switch_iteration"] = switch
    run["stats"] = []
    if stats and os.path.exists(stats):
        with open(stats) as f:
            run["stats"] = [json.loads(line) for line in f if line.strip()]
    return run


def step_summary(run: Dict, skip: int) -> Dict:
    ms = [x["ms"] for x in run["train"] if x["iteration"] > skip]
    last = run["stats"][-1] if run["stats"] else None
    return {"iterations": max((x["iteration"] for x in run["train"]), default=0), "timed_iterations": len(ms),
            "median_step_ms": statistics.median(ms) if ms else None, "switch_iteration": run["switch_iteration"],
            "sparse_layers_at_end": None if last is None else sum(l["sparse"] for l in last["layers"]),
            "layers": None if last is None else len(last["layers"]),
            "cp_plans_at_end": None if last is None else [l.get("cp_plan") for l in last["layers"]]}


def loss_agreement(a: Dict, b: Dict) -> Optional[Dict]:
    """``a`` against ``b`` (the reference) at their common iterations."""
    la = {x["iteration"]: x["loss"] for x in a["train"]}
    lb = {x["iteration"]: x["loss"] for x in b["train"]}
    common = sorted(set(la) & set(lb))
    if not common:
        return None
    rel = [abs(la[i] - lb[i]) / abs(lb[i]) for i in common]
    steps = [abs(lb[i] - lb[j]) / abs(lb[i]) for j, i in zip(common, common[1:]) if i == j + 1]
    va = {x["iteration"]: x["loss"] for x in a["validation"]}
    vb = {x["iteration"]: x["loss"] for x in b["validation"]}
    val = [{"iteration": i, "a": va[i], "b": vb[i], "rel_diff": abs(va[i] - vb[i]) / abs(vb[i])}
           for i in sorted(set(va) & set(vb))]
    med = statistics.median(rel)
    noise = statistics.median(steps) if steps else None
    return {"common_iterations": len(common), "first": common[0], "last": common[-1],
            "median_rel_diff": med, "max_rel_diff": max(rel),
            "median_rel_diff_last_10": statistics.median(rel[-10:]),
            "median_iteration_to_iteration_rel_change_of_reference": noise,
            "within_noise": None if noise is None else med <= noise,
            "validation": val, "per_iteration": [{"iteration": i, "a": la[i], "b": lb[i]} for i in common]}


def exchange_summary(run: Dict) -> Optional[Dict]:
    """Per layer: the median over profiling iterations of the bytes its selective exchange moved
    (summed over the CP group) and of their ratio to an all-gather of the remote K/V."""
    per: Dict[int, List[Dict]] = {}
    for row in run["stats"]:
        for l in row["layers"]:
            if l.get("cp_exchange"):
                per.setdefault(l["layer"], []).append(l["cp_exchange"])
    if not per:
        return None
    layers = []
    for layer, ex in sorted(per.items()):
        layers.append({"layer": layer, "measurements": len(ex),
                       "fetched_mib": statistics.median(e["fetched_bytes"] for e in ex) / 2**20,
                       "allgather_mib": statistics.median(e["allgather_bytes"] for e in ex) / 2**20,
                       "ratio": statistics.median(e["ratio"] for e in ex)})
    total_f = sum(l["fetched_mib"] for l in layers)
    total_a = sum(l["allgather_mib"] for l in layers)
    return {"layers": layers, "fetched_mib_all_layers": total_f, "allgather_mib_all_layers": total_a,
            "ratio_all_layers": total_f / total_a if total_a else None}


def pretrain_section(runs: Dict[str, Dict], compare: Sequence[str], dense: str, skip: int):
    steps = {n: step_summary(r, skip) for n, r in runs.items()}
    base = steps.get(dense, {}).get("median_step_ms")
    ratios = {n: s["median_step_ms"] / base for n, s in steps.items()
              if n != dense and base and s["median_step_ms"] is not None}
    agree = None
    if all(c in runs for c in compare):
        agree = loss_agreement(runs[compare[0]], runs[compare[1]])
    exchange = {n: e for n, r in runs.items() if (e := exchange_summary(r)) is not None}
    md = ["| run | iterations | median step ms (after it. %d) | vs %s | stage switch | sparse layers at end | CP plans at end |" % (skip, dense),
          "|---|---|---|---|---|---|---|"]
    for n, s in steps.items():
        md.append(f"| {n} | {s['iterations']} | {_f(s['median_step_ms'])} | "
                  f"{'x%.3f' % ratios[n] if n in ratios else '-'} | {s['switch_iteration'] if s['switch_iteration'] is not None else '-'} | "
                  f"{'-' if s['sparse_layers_at_end'] is None else '%d/%d' % (s['sparse_layers_at_end'], s['layers'])} | "
                  f"{'-' if not s['cp_plans_at_end'] else ', '.join(str(p) for p in s['cp_plans_at_end'])} |")
    md.append("")
    if agree is not None:
        md += [f"Loss agreement, {compare[0]} vs {compare[1]} (same seed, data, t and noise), training loss at "
               f"{agree['common_iterations']} common iterations ({agree['first']}..{agree['last']}): relative "
               f"difference median {agree['median_rel_diff']:.4f}, max {agree['max_rel_diff']:.4f}, median of the "
               f"last 10 {agree['median_rel_diff_last_10']:.4f}; the reference curve's own median iteration-to-"
               f"iteration relative change is {_f(agree['median_iteration_to_iteration_rel_change_of_reference'], 4)}.", ""]
        if agree["validation"]:
            md += ["| validation at iteration | %s | %s | rel. diff |" % tuple(compare), "|---|---|---|---|"]
            md += [f"| {v['iteration']} | {v['a']:.5f} | {v['b']:.5f} | {v['rel_diff']:.4f} |" for v in agree["validation"]]
            md.append("")
    for n, e in exchange.items():
        md += [f"Selective K/V exchange in {n} (forward, summed over the CP group; the backward returns the same "
               f"blocks' gradients): {e['fetched_mib_all_layers']:.1f} MiB vs {e['allgather_mib_all_layers']:.1f} MiB "
               f"for an all-gather of the remote K/V (x{_f(e['ratio_all_layers'], 3)}).", "",
               "| layer | fetched MiB | all-gather MiB | ratio | measurements |", "|---|---|---|---|---|"]
        md += [f"| {l['layer']} | {l['fetched_mib']:.2f} | {l['allgather_mib']:.2f} | {l['ratio']:.3f} | {l['measurements']} |"
               for l in e["layers"]]
        md.append("")
    return {"steps": steps, "ratios_to_dense": ratios, "dense_run": dense, "loss_agreement": agree,
            "exchange": exchange}, md


def plot(agree: Dict, runs: Dict[str, Dict], compare: Sequence[str], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    for name in compare:
        t = runs[name]["train"]
        ax.plot([x["iteration"] for x in t], [x["loss"] for x in t], label=f"{name} (train)", lw=1)
        v = runs[name]["validation"]
        if v:
            ax.plot([x["iteration"] for x in v], [x["loss"] for x in v], marker="o", ls="--", label=f"{name} (validation)")
    sw = runs[compare[0]]["switch_iteration"]
    if sw is not None:
        ax.axvline(sw, color="grey", ls=":", label="stage switch")
    ax.set_ylabel("flow-matching loss")
    ax.legend(fontsize=8)
    per = agree["per_iteration"]
    bx.plot([p["iteration"] for p in per], [abs(p["a"] - p["b"]) / abs(p["b"]) for p in per], lw=1)
    bx.set_ylabel(f"|{compare[0]} - {compare[1]}| / {compare[1]}", fontsize=8)
    bx.set_xlabel("iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cp", action="append", default=[], help="a benchmarks/cp.py JSON (repeatable)")
    p.add_argument("--calibration", default=None, help="the calibrate_cp JSON")
    p.add_argument("--run", action="append", default=[], help="NAME=LOG[:DSV_STATS_JSONL] of a pretraining run")
    p.add_argument("--compare", default="cp2_auto,cp1_auto", help="A,B: the runs whose loss curves must agree")
    p.add_argument("--dense", default="cp2_dense", help="the dense run the step times are divided by")
    p.add_argument("--skip-iters", type=int, default=10, help="iterations left out of the step times (start-up)")
    p.add_argument("--out", required=True, help="output path without extension")
    p.add_argument("--note", default="")
    args = p.parse_args(argv)
    compare = args.compare.split(",")
    if len(compare) != 2:
        p.error(f"--compare takes two run names A,B, got {args.compare!r}.")
    runs = {}
    for spec in args.run:
        if "=" not in spec:
            p.error(f"--run takes NAME=LOG[:STATS], got {spec!r}.")
        name, paths = spec.split("=", 1)
        log, _, stats = paths.partition(":")
        runs[name] = load_run(log, stats or None)
    cal = None
    if args.calibration:
        with open(args.calibration) as f:
            cal = json.load(f)
    cp = load_cp(args.cp)
    md = [f"<!-- benchmarks/cp_report.py: {args.note} -->", ""]
    if cp["rows"]:
        layers = (cp["files"][0].get("sizes") or {}).get("layers", "?")
        md += [f"Layer stack ({layers} layers' block fwd+bwd, ms, median of the slowest rank):", ""] + stack_table(cp["rows"]) + [""]
    if cp["dit"]:
        md += ["DiT training step (ms):", ""] + dit_table(cp["dit"]) + [""]
    md += links_table(cal, cp["files"])
    pre, pre_md = pretrain_section(runs, compare, args.dense, args.skip_iters) if runs else (None, [])
    md += pre_md
    result = {"note": args.note, "cp": cp, "calibration": cal, "pretrain": pre,
              "target_met_every_case": (all(r["target_met"] for r in cp["rows"])
                                        and all(d["target_met"] for d in cp["dit"] if "target_met" in d))
              if cp["rows"] else None,
              # what the runtime picks by default (--dsv-cp-autotune on); None for results without the variant
              "autotune_target_met_every_case": (all(r["autotune_target_met"] for r in cp["rows"])
                                                 and all(d["autotune_target_met"] for d in cp["dit"] if "target_met" in d))
              if cp["rows"] and all("autotune_target_met" in r for r in cp["rows"]) else None}
    with open(args.out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    with open(args.out + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    if pre is not None and pre["loss_agreement"] is not None:
        plot(pre["loss_agreement"], runs, compare, args.out + ".png")
    print("\n".join(md))
    return result


if __name__ == "__main__":
    main()
