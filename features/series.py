"""Per-(entity, metric) EWMA statistics, computed in event time.

:func:`ewma_step` and :func:`std_of` are the one definition of the EWMA
baseline: the online/replay hot path (:mod:`ia.features.aggregations`) and the
pure :func:`observe` below both call them, so they cannot disagree.

:class:`SeriesState` is the EWMA part of a series' state as a value (what the
engine re-baselines after drift, and what tests fold by hand).  :func:`observe`
is pure: given the state *before* a sample, it returns the features served for
it (from earlier data only) and the state after it.

>>> s = SeriesState()
>>> for t, v in enumerate([10.0, 10.0, 11.0, 9.0, 10.0]):
...     feats, s = observe(s, v, t * 60_000)
>>> feats, s = observe(s, 30.0, 300_000)
>>> feats["zscore"] > 5
True
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


def features_before(state: SeriesState, value: float, ts: int) -> dict[str, float]:
    """Features of ``value`` at ``ts`` against the baseline built from earlier data."""
    if state.n == 0:
        return {"value": value, "n": 0.0, "ewma_mean": value, "ewma_std": 0.0,
                "zscore": 0.0, "rate_of_change": 0.0, "seconds_since_last": 0.0}
    std = std_of(state)
    late = ts <= state.last_ts
    dt_s = (ts - state.last_ts) / 1000.0
    return {
        "value": value,
        "n": float(state.n),
        "ewma_mean": state.mean,
        "ewma_std": std,
        "zscore": saturate((value - state.mean) / std),
        # The previous sample of a late one is unknown (only the newest is kept).
        "rate_of_change": 0.0 if late else saturate((value - state.last_value) / dt_s),
        "seconds_since_last": 0.0 if late else dt_s,
    }


def fold(state: SeriesState, value: float, ts: int,
         half_life_s: float = DEFAULT_HALF_LIFE_S) -> SeriesState:
    """Fold one in-order sample into the state (EWMA mean and variance)."""
    mean, var = ewma_step(state.n, state.mean, state.var, state.last_ts, value, ts, half_life_s)
    return replace(state, n=state.n + 1, mean=mean, var=var, last_value=value, last_ts=ts)


def observe(state: SeriesState, value: float, ts: int,
            half_life_s: float = DEFAULT_HALF_LIFE_S) -> tuple[dict[str, float], SeriesState]:
    """Serve features for one sample, then fold it in.

    A sample at or before the last folded timestamp is late (or a replay of an
    already processed event): it is scored against the current baseline but
    not folded into the EWMA, and counted in ``late`` (an EWMA cannot take a
    sample back in time; the windowed aggregations of :mod:`features` can).
    """
    feats = features_before(state, value, ts)
    if state.n and ts <= state.last_ts:
        return feats, replace(state, late=state.late + 1)
    return feats, fold(state, value, ts, half_life_s)


def rebaseline(state: SeriesState) -> SeriesState:
    """Forget the baseline's history but keep the current level (after drift)."""
    return replace(state, n=1, mean=state.last_value, var=0.0)
