"""Hysteresis for a layer's sparse/dense decision in stage 2.

A sparse layer whose recall drops below the floor goes dense at once (its attention is losing
mass now). A dense layer goes sparse again only when its recall clears the floor by a margin and
after a minimum dwell, so a layer does not flip back and forth around the floor on sampling noise.

Relative recall (the predictor's recall over that of exact q/k at the same K) is no gate: K is
chosen so that the *predictor's* selection reaches the target recall, so a weaker predictor costs
a larger K (less speed), not recall. As a gate it only kept layers dense: in the H200 quality arms
(benchmarks/results/quality_h200_20261130_*) layers at density 0.22-0.31 with recall 0.901 at K
waited 30-130 of 200 iterations at relative recall 0.937-0.947 < 0.95. It still names the cause
when a layer falls below the floor (predictor error vs granularity).
"""

from __future__ import annotations

import math
from typing import NamedTuple


class Decision(NamedTuple):
    """The layer's next state and why (for the decision log)."""

    sparse: bool
    reason: str


def hysteresis_decision(
    sparse: bool,
    recall: float,
    relative_recall: float,
    iters_since_change: int,
    *,
    floor: float,
    margin: float,
    min_dwell: int,
    min_relative_recall: float = 0.95,
) -> Decision:
    """Next sparse/dense state of one layer.

    Args:
        sparse: whether the layer runs sparse now.
        recall: the predictor's recall at the layer's K (mean over sampled rows and heads).
        relative_recall: ``recall / (recall of the same rule with exact q/k)``.
        iters_since_change: iterations since the layer last changed state.
        floor: leave sparse when ``recall < floor``.
        margin: re-enter sparse only when ``recall >= floor + margin``.
        min_dwell: ... and only after at least this many iterations dense.
        min_relative_recall: a fall below the floor with ``relative_recall`` under this is put down
            to predictor error, else to granularity or K (the decision log's cause).

    NaN statistics (nothing measured) keep the current state.
    """
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be in [0, 1] (0: never leave sparse), got {floor}.")
    if margin < 0.0 or floor + margin > 1.0:
        raise ValueError(
            f"margin must be >= 0 with floor + margin <= 1 (recall cannot exceed 1); got floor {floor}, "
            f"margin {margin}: lower the margin or the floor."
        )
    if min_dwell < 0 or iters_since_change < 0:
        raise ValueError(f"min_dwell ({min_dwell}) and iters_since_change ({iters_since_change}) must be >= 0.")
    if not 0.0 <= min_relative_recall <= 1.0:
        raise ValueError(f"min_relative_recall must be in [0, 1], got {min_relative_recall}.")
    state = "sparse" if sparse else "dense"
    if math.isnan(recall) or math.isnan(relative_recall):
        return Decision(sparse, f"no recall measured: stay {state}")
    stats = f"recall {recall:.3f}, relative recall {relative_recall:.3f}"
    if sparse:
        if recall < floor:
            cause = (
                "predictor error (it ranks worse than exact q/k)"
                if relative_recall < min_relative_recall
                else "granularity or K (exact q/k ranks no better)"
            )
            return Decision(False, f"{stats} < floor {floor:.3f}: go dense; cause: {cause}")
        return Decision(True, f"{stats} >= floor {floor:.3f}: stay sparse")
    if iters_since_change < min_dwell:
        return Decision(False, f"dense for {iters_since_change} < {min_dwell} iterations: stay dense ({stats})")
    # 1e-9: 0.8 + 0.05 is 0.8500000000000001 in floats; a recall of 0.85 must clear it.
    if recall < floor + margin - 1e-9:
        return Decision(False, f"{stats} < floor + margin {floor + margin:.3f}: stay dense")
    return Decision(True, f"{stats} >= floor + margin {floor + margin:.3f} after {iters_since_change} iterations: go sparse")
