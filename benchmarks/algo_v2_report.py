"""The DSV algorithm-v2 evidence from one device call: the pretraining example, dense and DSV.

    python benchmarks/algo_v2_report.py --dir OUT --out benchmarks/results/algo_v2_h200_DATE

Reads ``pretrain_{dense,auto}.log`` (Megatron's iteration lines, the controller's events) and
``dsv_stats_auto.jsonl`` (the controller's per-layer summaries at every profiling iteration) and
writes ``<out>.json`` and ``<out>.png``: when and why the switch fired, per layer at the last
profiling iteration the token sparsity, the density chosen for the target recall, the predictor's
recall and exact-q/k recall at that K, the relative recall and the decision; step time of stage 1
and stage 2 against dense over the same iterations (medians of Megatron's logged means).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.pretrain_report import parse  # noqa: E402


def _mean(v):
    return None if v is None else sum(v) / len(v)


def build(run_dir: str) -> dict:
    runs = {m: parse(os.path.join(run_dir, f"pretrain_{m}.log")) for m in ("dense", "auto")}
    events = [l.strip() for l in open(os.path.join(run_dir, "pretrain_auto.log"), errors="replace")
              if "DSV stage switch" in l or "DSV layer" in l]
    stats = [json.loads(l) for l in open(os.path.join(run_dir, "dsv_stats_auto.jsonl"))]
    switch = next((s["switch_iteration"] for s in stats if s.get("switch_iteration") is not None), None)
    last = stats[-1]
    layers = []
    for l in last["layers"]:
        layers.append({
            "layer": l["layer"], "sparse": l["sparse"], "k": l["k"],
            "token_sparsity": _mean(l["sparsity"]), "density_for_target": l["density"],
            "recall_at_k": _mean(l["recall_at_k"]), "recall_exact_at_k": _mean(l["recall_exact_at_k"]),
            "relative_recall": _mean(l["relative_recall"]), "predictor_loss": l["loss"],
        })
    # "every sparse layer holds recall >= 0.9 at its chosen K": the lowest head-mean recall at K over
    # the stage-2 profiling iterations where the layer ran sparse
    for rec in layers:
        held = [(s["iteration"], l) for s in stats if s["stage"] == 2 for l in s["layers"]
                if l["layer"] == rec["layer"] and l["sparse"]]
        rec["sparse_profiles"] = len(held)
        rec["first_sparse_iteration"] = held[0][0] if held else None
        rec["min_recall_at_k_while_sparse"] = min((_mean(l["recall_at_k"]) for _, l in held), default=None)
        rec["min_recall_exact_at_k_while_sparse"] = min((_mean(l["recall_exact_at_k"]) for _, l in held), default=None)
    dense_ms = {r["iteration"]: r["ms"] for r in runs["dense"]["train"]}
    auto_ms = {r["iteration"]: r["ms"] for r in runs["auto"]["train"]}

    def window(lo, hi):
        its = [i for i in auto_ms if lo < i <= hi and i in dense_ms]
        if not its:
            return None
        a, d = statistics.median(auto_ms[i] for i in its), statistics.median(dense_ms[i] for i in its)
        return {"iterations": [min(its), max(its)], "dsv_ms": a, "dense_ms": d, "ratio": a / d}

    def own(lo, hi):  # the DSV run alone: its step before vs after layers went sparse (one GPU)
        its = [i for i in auto_ms if lo < i <= hi]
        return {"iterations": [min(its), max(its)], "dsv_ms": statistics.median(auto_ms[i] for i in its)} if its else None

    end = max(auto_ms) if auto_ms else 0
    starts = [l["first_sparse_iteration"] for l in layers if l["first_sparse_iteration"] is not None]
    sparse_effect = None
    if switch is not None and starts:
        before, after = own(switch + 50, min(starts)), own(max(starts) + 10, end)
        if before and after:
            sparse_effect = {"before": before, "after": after, "ratio": after["dsv_ms"] / before["dsv_ms"]}
    return {
        "stage2_before_vs_after_sparse": sparse_effect,
        "switch_iteration": switch,
        "switch_on_its_own": switch is not None and not any("max-iters" in e for e in events if "stage switch" in e),
        "events": events,
        "last_profile_iteration": last["iteration"],
        "layers": layers,
        "step_time": {"stage1": window(50, switch or end), "stage2": window((switch or end) + 50, end)},
        "validation": {m: r["validation"] for m, r in runs.items()},
        "curves": [{"iteration": s["iteration"], "stage": s["stage"],
                    "density": [l["density"] for l in s["layers"]],
                    "relative_recall": [_mean(l["relative_recall"]) for l in s["layers"]],
                    "recall_at_k": [_mean(l["recall_at_k"]) for l in s["layers"]],
                    "sparse": [l["sparse"] for l in s["layers"]]} for s in stats],
    }


def plot(res: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    its = [c["iteration"] for c in res["curves"]]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    n = len(res["curves"][0]["density"])
    for i in range(n):
        for ax, key in zip(axes, ("density", "relative_recall", "recall_at_k")):
            ys = [c[key][i] for c in res["curves"]]
            ax.plot(its, ys, label=f"layer {i + 1}")
    for ax, title in zip(axes, ("density for the target recall", "predictor recall / exact-q/k recall", "predictor recall at K")):
        ax.set_title(title)
        ax.set_xlabel("iteration")
        if res["switch_iteration"] is not None:
            ax.axvline(res["switch_iteration"], color="k", ls="--", lw=0.8)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", required=True, help="the device call's $OUT (fetched)")
    p.add_argument("--out", required=True, help="output path without extension")
    p.add_argument("--note", default="", help="hardware, versions, commit")
    a = p.parse_args(argv)
    res = build(a.dir)
    res["note"] = a.note
    with open(a.out + ".json", "w") as f:
        json.dump(res, f, indent=1)
    plot(res, a.out + ".png")
    print(f"switch at {res['switch_iteration']} (on its own: {res['switch_on_its_own']})")
    print("| layer | sparse | token sparsity | density for recall target | recall at K | exact-q/k recall at K | "
          "relative | sparse from | min recall at K while sparse (exact q/k) |")
    print("|---|---|---|---|---|---|---|---|---|")
    fmt = lambda x: "-" if x is None else f"{x:.3f}"  # noqa: E731
    for l in res["layers"]:
        print(f"| {l['layer']} | {l['sparse']} | {l['token_sparsity']:.3f} | {l['density_for_target']:.3f} | "
              f"{l['recall_at_k']:.3f} | {l['recall_exact_at_k']:.3f} | {l['relative_recall']:.3f} | "
              f"{l['first_sparse_iteration'] if l['first_sparse_iteration'] is not None else '-'} | "
              f"{fmt(l['min_recall_at_k_while_sparse'])} ({fmt(l['min_recall_exact_at_k_while_sparse'])}) |")
    print("step time:", json.dumps(res["step_time"]))
    print("the DSV run's own stage-2 step, before vs after layers went sparse:", json.dumps(res["stage2_before_vs_after_sparse"]))


if __name__ == "__main__":
    main()
