"""Benchmark results written so that a device call cut short leaves a whole file, never half of one."""

from __future__ import annotations

import json
import os
import time
from typing import Dict, Optional


def write_json(obj: Dict, path: str) -> None:
    """Write ``obj`` to ``path`` through a temporary file and an atomic rename (a call killed at its
    time limit keeps the previous complete version)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


class ResultLog:
    """One benchmark run's ``{"env", "args", "rows"}``, rewritten whole after every row (so a call
    cut short keeps every finished row). Without ``path``: ``benchmarks/results/<stem>_<gpu>_<time>.json``."""

    def __init__(self, stem: str, env: Dict, args, path: Optional[str] = None):
        self.env, self.args, self.rows = env, args, []
        if path is None:
            gpu = env["gpu"].replace(" ", "_").replace("/", "_")
            path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                f"{stem}_{gpu}_{time.strftime('%Y%m%d_%H%M%S')}.json")
        self.path = path

    def data(self) -> Dict:
        return {"env": self.env, "args": vars(self.args), "rows": self.rows}

    def write(self) -> None:
        write_json(self.data(), self.path)

    def add(self, row: Dict) -> Dict:
        self.rows.append(row)
        self.write()
        return row
