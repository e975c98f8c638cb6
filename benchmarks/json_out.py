"""Benchmark results written so that a device call cut short leaves a whole file, never half of one."""

from __future__ import annotations

import json
import os
from typing import Dict


def write_json(obj: Dict, path: str) -> None:
    """Write ``obj`` to ``path`` through a temporary file and an atomic rename (a call killed at its
    time limit keeps the previous complete version)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)
