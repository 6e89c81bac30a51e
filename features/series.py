"""Per-(entity, metric) EWMA statistics, computed in event time.

:func:`ewma_step` and :func:`std_of` are the one definition of the EWMA
baseline: the online/replay hot path (:mod:`ia.features.aggregations`) and the
pure reference the tests compare it with (``tests/reference.py``) both call them,
so they cannot disagree.

:class:`SeriesState` is the EWMA part of a series' state as a value (what the
engine re-baselines after drift).

>>> mean, var = 0.0, 0.0
>>> for n, (t, v) in enumerate([(0, 10.0), (60_000, 12.0), (120_000, 11.0)]):
...     mean, var = ewma_step(n, mean, var, t - 60_000, v, t, DEFAULT_HALF_LIFE_S)
>>> round(mean, 3), round(std_of(SeriesState(n=3, mean=mean, var=var)), 3)
(11.0, 0.816)
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, replace

# Event-time half-life of the EWMA baseline.  Ten minutes follows a minute-scale
# metric closely enough to absorb slow trends while a sudden change still
# stands out for several samples.
DEFAULT_HALF_LIFE_S = 600.0
# Until this many samples are seen the baseline is a plain running mean and
# variance (Welford), so early z-scores are not built on one or two points.
WARMUP_SAMPLES = 20
# A perfectly flat series has zero variance; flooring the deviation at a
# fraction of the level keeps z-scores of tiny wobbles from exploding.
RELATIVE_STD_FLOOR = 0.01
ABSOLUTE_STD_FLOOR = 1e-6
_LN2 = math.log(2.0)
_MIN_ALPHA = 1.0 / (WARMUP_SAMPLES * 10)


@dataclass(frozen=True, slots=True)
class SeriesState:
    n: int = 0
    mean: float = 0.0
    var: float = 0.0
    last_value: float = 0.0
    last_ts: int = -1
    late: int = 0      # samples at or before last_ts, not folded into the EWMA
    dropped: int = 0   # samples beyond the allowed lateness, folded nowhere


def ewma_step(n: int, mean: float, var: float, last_ts: int, value: float, ts: int,
              half_life_s: float) -> tuple[float, float]:
    """Mean and variance after folding one in-order sample.

    Welford's running statistics during warm-up, then West's exponentially
    weighted update with a weight that depends on the event-time gap (floored,
    so a burst of samples still moves the baseline a little)."""
    if n < WARMUP_SAMPLES:
        a = 1.0 / (n + 1)
    else:
        dt_s = max(0.0, (ts - last_ts) / 1000.0)
        a = max(1.0 - math.exp(-_LN2 * dt_s / half_life_s), _MIN_ALPHA)
    delta = value - mean
    new_mean = mean + a * delta
    new_var = (1.0 - a) * (var + a * delta * delta)
    if not (math.isfinite(new_mean) and math.isfinite(new_var)):
        # The sample overflows float statistics; folding it would leave an
        # inf/NaN baseline for good, so the baseline stays as it was.
        return mean, var
    return new_mean, new_var


def std_of(state: SeriesState) -> float:
    return floored_std(state.mean, state.var)


def floored_std(mean: float, var: float) -> float:
    floor = max(abs(mean) * RELATIVE_STD_FLOOR, ABSOLUTE_STD_FLOOR)
    return max(math.sqrt(max(var, 0.0)), floor)


def saturate(x: float) -> float:
    """Clamp an overflowed ratio (a finite sample far off the baseline's scale) to a
    finite float: the Decision contract rejects inf, and one such sample would
    otherwise fail every batch of its partition."""
    return max(-sys.float_info.max, min(sys.float_info.max, x))


def rebaseline(state: SeriesState) -> SeriesState:
    """Forget the baseline's history but keep the current level (after drift)."""
    return replace(state, n=1, mean=state.last_value, var=0.0)
