"""Loss curves of Megatron-LM's ``pretrain_gpt.py`` with the causal DSV spec, dense vs DSV, as JSON.

    python benchmarks/causal_gpt_report.py --dense gpt_dense.log --dsv gpt_auto.log --out causal_gpt.json

Reads Megatron's training lines ("iteration N/ M | ... elapsed time per iteration (ms): T | ...
lm loss: L | ... grad norm: G |"), its validation lines ("validation loss at iteration N | lm loss
value: V"), DSV's status lines ("DSV it N stage S | ...") and DSV's events (stage switch, per-layer
sparse/dense decisions with their reasons, speed probes, hooks installed, warnings), and writes both
runs and their comparison: the loss difference (DSV minus dense, absolute and relative to dense) at
every iteration both logged, before and after the stage switch, and the median step time of each
run over the same windows. Nothing is judged here; the numbers are what the logs hold.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
from pathlib import Path
from typing import Dict, List, Optional

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.json_out import write_json

NUM = r"[-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?"
IT = re.compile(r"\biteration\s+(\d+)/\s*(\d+) \|")
FIELD = {
    "ms": re.compile(rf"elapsed time per iteration \(ms\): ({NUM})"),
    "loss": re.compile(rf"\blm loss: ({NUM})"),
    "grad_norm": re.compile(rf"grad norm: ({NUM})"),
    "tflops": re.compile(rf"throughput per GPU \(TFLOP/s/GPU\): ({NUM})"),
    "nan_iterations": re.compile(r"number of nan iterations:\s*(\d+)"),
    "skipped_iterations": re.compile(r"number of skipped iterations:\s*(\d+)"),
}
VAL = re.compile(rf"validation loss at iteration (\d+)(?: on (\w+) set)? \| lm loss value: ({NUM})")
STATUS = re.compile(r"DSV it (\d+) stage (\d) \|(.*)")
STATUS_FIELD = {
    "predictor_loss": re.compile(rf"predictor loss ({NUM})"),
    "recall": re.compile(rf"\| recall ({NUM})"),
    "token_sparsity": re.compile(rf"token sparsity ({NUM})"),
    "density": re.compile(rf"density for target recall ({NUM})"),
    "relative_recall": re.compile(rf"relative recall ({NUM})"),
}
SPARSE_LAYERS = re.compile(r"sparse layers (\d+)/(\d+)")
SWITCH = re.compile(r"DSV stage switch at iteration (\d+)")
LAYER = re.compile(r"DSV layer (\d+): (sparse|dense) \((.*)\)\s*$")
EVENT = re.compile(r"DSV (stage switch|layer \d+:|speed probe|hooks installed|warning|refuses)|DSV: ")
ERROR = re.compile(r"^\s*(?:[\w.]+(?:Error|Exception)|AssertionError)\b.*")
EXIT = re.compile(r"^run_gpu_causal_gpt: exit code (\d+)")
DONE = "after training is done"


def parse_log(path: str) -> Dict:
    """One ``pretrain_gpt.py`` log: training and validation losses, DSV status and events, errors."""
    train: List[Dict] = []
    val: List[Dict] = []
    status: List[Dict] = []
    events: List[Dict] = []
    errors: List[str] = []
    last_it = 0
    exit_code = None
    done = False
    with open(path, errors="replace") as f:
        for line in f:
            line = line.rstrip("\n")
            if ERROR.match(line):
                errors.append(line.strip())
            if DONE in line:
                done = True
            if m := IT.search(line):
                last_it = int(m[1])
                row = {"iteration": last_it, "train_iters": int(m[2])}
                for name, rx in FIELD.items():
                    f_ = rx.search(line)
                    row[name] = None if f_ is None else (int(f_[1]) if name.endswith("iterations") else float(f_[1]))
                train.append(row)
            elif m := VAL.search(line):
                val.append({"iteration": int(m[1]), "set": m[2] or "periodic", "loss": float(m[3])})
            elif m := STATUS.search(line):
                last_it = max(last_it, int(m[1]))
                row = {"iteration": int(m[1]), "stage": int(m[2])}
                for name, rx in STATUS_FIELD.items():
                    f_ = rx.search(m[3])
                    row[name] = None if f_ is None else float(f_[1])
                if s := SPARSE_LAYERS.search(m[3]):
                    row["sparse_layers"], row["layers"] = int(s[1]), int(s[2])
                status.append(row)
            elif EVENT.search(line):
                if s := SWITCH.search(line):
                    last_it = int(s[1])
                ev = {"after_iteration": last_it, "line": line.strip()}
                if lm := LAYER.search(line):
                    ev.update(layer=int(lm[1]), decision=lm[2], reason=lm[3])
                events.append(ev)
            elif m := EXIT.search(line):
                exit_code = int(m[1])
    switches = [int(SWITCH.search(e["line"])[1]) for e in events if SWITCH.search(e["line"])]
    decisions: Dict[int, Dict] = {}
    for e in events:
        if "layer" in e:
            decisions[e["layer"]] = {"decision": e["decision"], "reason": e["reason"], "after_iteration": e["after_iteration"]}
    return {
        "train": train, "validation": val, "dsv_status": status, "events": events,
        "switch_iteration": switches[0] if switches else None,
        "final_layer_decisions": {str(k): decisions[k] for k in sorted(decisions)},
        "sparse_layers_at_end": sum(d["decision"] == "sparse" for d in decisions.values()),
        "completed": done, "exit_code": exit_code, "errors": errors[-3:],
    }


def _diff_rows(dense: List[Dict], dsv: List[Dict], key) -> List[Dict]:
    a = {key(r): r["loss"] for r in dense if r["loss"] is not None}
    b = {key(r): r["loss"] for r in dsv if r["loss"] is not None}
    rows = []
    for k in sorted(set(a) & set(b)):
        d, s = a[k], b[k]
        rows.append({"key": k, "dense": d, "dsv": s, "abs_diff": s - d, "rel_diff": (s - d) / d if d else None})
    return rows


def _max_abs(rows: List[Dict], field: str) -> Optional[float]:
    vals = [abs(r[field]) for r in rows if r[field] is not None]
    return max(vals) if vals else None


def _median_ms(rows: List[Dict]) -> Optional[float]:
    vals = [r["ms"] for r in rows if r["ms"] is not None]
    return statistics.median(vals) if vals else None


def _windows(train: List[Dict], switch: Optional[int]) -> Dict[str, List[Dict]]:
    """Logged intervals before the switch (the first one left out: it holds compilation and
    warm-up) and those that start after it; an interval holding the switch is in neither."""
    out = {"stage1": [], "stage2": []}
    for prev, row in zip(train, train[1:]):
        if switch is None or row["iteration"] <= switch:
            out["stage1"].append(row)
        elif prev["iteration"] >= switch:
            out["stage2"].append(row)
    return out


def compare(dense: Dict, dsv: Dict) -> Dict:
    """DSV vs dense at the iterations both logged; the DSV run's switch splits the windows."""
    switch = dsv["switch_iteration"]
    train = _diff_rows(dense["train"], dsv["train"], key=lambda r: r["iteration"])
    for r in train:
        r["iteration"] = r.pop("key")
    val = _diff_rows(dense["validation"], dsv["validation"], key=lambda r: (r["iteration"], r["set"]))
    for r in val:
        r["iteration"], r["set"] = r.pop("key")
    after = [r for r in train if switch is not None and r["iteration"] > switch]
    val_after = [r for r in val if switch is not None and r["iteration"] > switch]
    win_dense, win_dsv = _windows(dense["train"], switch), _windows(dsv["train"], switch)
    step = {}
    for stage in ("stage1", "stage2"):
        d, s = _median_ms(win_dense[stage]), _median_ms(win_dsv[stage])
        step[stage] = {"dense_ms": d, "dsv_ms": s, "dsv_over_dense": s / d if d and s else None,
                       "intervals": [len(win_dense[stage]), len(win_dsv[stage])]}
    return {
        "switch_iteration": switch,
        "train_loss": train,
        "validation_loss": val,
        "max_abs_rel_diff_train": _max_abs(train, "rel_diff"),
        "max_abs_rel_diff_train_after_switch": _max_abs(after, "rel_diff"),
        "max_abs_diff_train_after_switch": _max_abs(after, "abs_diff"),
        "max_abs_rel_diff_validation": _max_abs(val, "rel_diff"),
        "max_abs_rel_diff_validation_after_switch": _max_abs(val_after, "rel_diff"),
        "last_common_train": train[-1] if train else None,
        "step_time_median": step,
    }


def build(dense_log: str, dsv_log: str, note: str = "") -> Dict:
    dense, dsv = parse_log(dense_log), parse_log(dsv_log)
    return {"note": note, "runs": {"dense": dense, "dsv": dsv}, "comparison": compare(dense, dsv)}


def summary_lines(res: Dict) -> List[str]:
    c, runs = res["comparison"], res["runs"]
    lines = []
    for name, r in runs.items():
        last = r["train"][-1] if r["train"] else None
        lines.append(
            f"{name}: {len(r['train'])} logged intervals, last iteration {last['iteration'] if last else '-'}"
            f" loss {last['loss'] if last else '-'}, completed {r['completed']}, exit code {r['exit_code']}"
            + (f", errors {r['errors']}" if r["errors"] else "")
        )
    lines.append(f"switch at {c['switch_iteration']}; sparse layers at end {runs['dsv']['sparse_layers_at_end']}; "
                 f"decisions {runs['dsv']['final_layer_decisions']}")
    for r in c["train_loss"]:
        rel = "-" if r["rel_diff"] is None else f"{r['rel_diff']:+.4f}"
        lines.append(f"  it {r['iteration']:6d} dense {r['dense']:.5f} dsv {r['dsv']:.5f} rel {rel}")
    for r in c["validation_loss"]:
        rel = "-" if r["rel_diff"] is None else f"{r['rel_diff']:+.4f}"
        lines.append(f"  val it {r['iteration']} ({r['set']}) dense {r['dense']:.5f} dsv {r['dsv']:.5f} rel {rel}")
    lines.append(f"max |rel diff| train {c['max_abs_rel_diff_train']}, after switch "
                 f"{c['max_abs_rel_diff_train_after_switch']}; validation {c['max_abs_rel_diff_validation']}")
    lines.append(f"step time median {c['step_time_median']}")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dense", required=True, help="log of the --dsv-mode dense run")
    p.add_argument("--dsv", required=True, help="log of the --dsv-mode auto run")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--note", default="", help="free text stored in the JSON (hardware, commit, flags)")
    args = p.parse_args(argv)
    res = build(args.dense, args.dsv, args.note)
    write_json(res, args.out)
    print("\n".join(summary_lines(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
