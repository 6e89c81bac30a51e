"""Page-Hinkley drift tests on packed state.

The detector (:mod:`ia.decisions.detector`) runs two of these per series, on the
residual against its slow baseline (level drift) and on the raw score (dispersion
drift). Their state is six floats inside the series' packed detector state, so it is
checkpointed with the series and moves with its partition, which River's detector
objects cannot do cheaply.

:func:`ph_update` is River's ``drift.PageHinkley`` update step, field for field;
``tests/test_detector.py`` checks that both fire on exactly the same samples. When the
test fires, the detector re-learns its baseline from the new level, so a shift that
persists stops being anomalous after a bounded time instead of alarming until an
EWMA catches up.

>>> p = PageHinkleyParams(min_instances=30, delta=0.5, threshold=20.0)
>>> state = [0.0] * PH_FIELDS
>>> [ph_update(state, 0.0, p) for _ in range(100)].count(True)
0
>>> next(i for i in range(100) if ph_update(state, 5.0, p))
4
"""

from __future__ import annotations

from dataclasses import dataclass

PH_FIELDS = 6  # n, mean, sum_increase, sum_decrease, min_increase, max_decrease


@dataclass(frozen=True, slots=True)
class PageHinkleyParams:
    min_instances: int = 30
    delta: float = 0.005
    threshold: float = 50.0
    alpha: float = 1 - 0.0001


def ph_reset(s: list[float]) -> None:
    s[:] = [0.0, 0.0, 0.0, 0.0, float("inf"), -1.0]


def ph_update(s: list[float], x: float, p: PageHinkleyParams) -> bool:
    """One two-sided Page-Hinkley step on ``s`` (updated in place); True on drift,
    after which ``s`` starts afresh, as River's detector does on its next update."""
    if s[0] == 0.0:
        ph_reset(s)
    n = s[0] + 1.0
    mean = s[1] + (x - s[1]) / n
    dev = x - mean
    inc = p.alpha * s[2] + dev - p.delta
    dec = p.alpha * s[3] + dev + p.delta
    min_inc = min(s[4], inc)
    max_dec = max(s[5], dec)
    s[:] = [n, mean, inc, dec, min_inc, max_dec]
    if n >= p.min_instances and (inc - min_inc > p.threshold or max_dec - dec > p.threshold):
        ph_reset(s)
        return True
    return False
