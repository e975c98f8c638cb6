"""Hysteresis of the sparse/dense decision."""

import math

import pytest

from megatron_dsv.layers.decision import Decision, hysteresis_decision

KW = dict(floor=0.8, margin=0.05, min_dwell=100)


@pytest.mark.parametrize(
    "sparse,recall,rel,since,want,reason",
    [
        (True, 0.81, 1.0, 0, True, "stay sparse"),  # no dwell on the way out, nor for staying
        (True, 0.80, 1.0, 0, True, "stay sparse"),  # the floor itself is kept
        (True, 0.79, 1.0, 500, False, "granularity"),
        (True, 0.79, 0.80, 0, False, "predictor error"),
        (False, 0.84, 1.0, 500, False, "floor + margin"),  # between floor and floor + margin
        (False, 0.90, 1.0, 99, False, "99 < 100"),  # clears the margin but too soon
        (False, 0.90, 0.90, 500, True, "relative recall 0.900 >= floor + margin"),  # a weak predictor is no gate
        (False, 0.85, 0.95, 100, True, "go sparse"),  # every bound met exactly
        (True, math.nan, 1.0, 0, True, "no recall measured"),
        (False, 0.9, math.nan, 500, False, "no recall measured"),
    ],
)
def test_hysteresis_cases(sparse, recall, rel, since, want, reason):
    got = hysteresis_decision(sparse, recall, rel, since, **KW)
    assert isinstance(got, Decision) and got.sparse is want
    assert reason in got.reason


def test_a_noisy_recall_around_the_floor_does_not_flap():
    recalls = [0.79, 0.81, 0.79, 0.82, 0.81, 0.83, 0.86, 0.86]
    sparse, since, states = True, 0, []
    for r in recalls:
        nxt, _ = hysteresis_decision(sparse, r, 1.0, since, floor=0.8, margin=0.05, min_dwell=3)
        since = 0 if nxt != sparse else since + 1
        sparse = nxt
        states.append(sparse)
    # Out at the first dip, back only once 0.85 is cleared after 3 dense iterations.
    assert states == [False, False, False, False, False, False, True, True]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(floor=-0.1, margin=0.1, min_dwell=1), "floor must be in \\[0, 1\\]"),
        (dict(floor=0.95, margin=0.1, min_dwell=1), "floor \\+ margin <= 1"),
        (dict(floor=0.8, margin=-0.1, min_dwell=1), "margin"),
        (dict(floor=0.8, margin=0.1, min_dwell=-1), "min_dwell"),
        (dict(floor=0.8, margin=0.1, min_dwell=1, min_relative_recall=1.5), "min_relative_recall"),
    ],
)
def test_bad_settings_raise(kw, match):
    with pytest.raises(ValueError, match=match):
        hysteresis_decision(True, 0.9, 1.0, 0, **kw)
