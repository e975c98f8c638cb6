"""Turn the logs of examples/pretrain_video_dit.py runs into JSON and a validation-loss plot.

    python benchmarks/pretrain_report.py --run dense=LOG --run dsv=LOG --out benchmarks/results/pretrain_X

Parses Megatron's "iteration N/ M | ... elapsed time per iteration (ms): T | ... flow loss: L" and
"validation loss at iteration N | flow loss value: V" lines, and the DSV controller's status lines.
Writes ``<out>.json`` and ``<out>.png``.
"""

from __future__ import annotations

import argparse
import json
import re

IT = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|.*elapsed time per iteration \(ms\): ([\d.]+) \|.*flow loss: ([\d.E+-]+)")
VAL = re.compile(r"validation loss at iteration (\d+) \| flow loss value: ([\d.E+-]+)")
DSV = re.compile(
    r"DSV it (\d+) stage (\d) \| predictor loss ([\d.]+) \| recall ([\d.]+) \| (?:token )?sparsity ([\d.]+) \|"
    r"(?: density for target recall [\d.]+ \| relative recall [\d.]+ \|)? sparse layers (\d+)/(\d+)"
)


def parse(path: str) -> dict:
    train, val, dsv = [], [], []
    with open(path, errors="replace") as f:
        for line in f:
            if m := IT.search(line):
                train.append({"iteration": int(m[1]), "ms": float(m[3]), "loss": float(m[4])})
            elif m := VAL.search(line):
                val.append({"iteration": int(m[1]), "loss": float(m[2])})
            elif m := DSV.search(line):
                dsv.append({"iteration": int(m[1]), "stage": int(m[2]), "predictor_loss": float(m[3]),
                            "recall": float(m[4]), "sparsity": float(m[5]), "sparse_layers": int(m[6]),
                            "layers": int(m[7])})
    return {"train": train, "validation": val, "dsv": dsv}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, help="NAME=LOGFILE")
    p.add_argument("--out", required=True, help="output path without extension")
    p.add_argument("--note", default="", help="free text stored in the JSON (hardware, commit, config)")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.run:
        name, path = spec.split("=", 1)
        runs[name] = parse(path)
    names = list(runs)
    common = None
    for r in runs.values():
        its = {v["iteration"] for v in r["validation"]}
        common = its if common is None else common & its
    compare = []
    for it in sorted(common or []):
        row = {"iteration": it}
        for n in names:
            row[n] = next(v["loss"] for v in runs[n]["validation"] if v["iteration"] == it)
        compare.append(row)
    out = {"note": args.note, "runs": runs, "validation_at_common_iterations": compare}
    with open(args.out + ".json", "w") as f:
        json.dump(out, f, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for n in names:
        v = runs[n]["validation"]
        ax.plot([x["iteration"] for x in v], [x["loss"] for x in v], marker="o", label=n)
    ax.set_xlabel("iteration")
    ax.set_ylabel("validation flow-matching loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out + ".png", dpi=120)
    for row in compare:
        print(row)


if __name__ == "__main__":
    main()
