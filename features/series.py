"""Per-(entity, metric) online statistics, computed in event time.

One :class:`SeriesState` per series is all the worker keeps between events.
:func:`observe` is a pure function: given the state *before* an event and the
event, it returns the features served for that event (computed only from data
at or before its timestamp) and the state after it.  The online path (Redis)
and offline replay (memory) both call it, so they cannot disagree.

>>> s = SeriesState()
>>> for t, v in enumerate([10.0, 10.0, 11.0, 9.0, 10.0]):
...     feats, s = observe(s, v, t * 60_000)
>>> feats, s = observe(s, 30.0, 300_000)
>>> feats["zscore"] > 5
True
"""

from __future__ import annotations

import math
import struct
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


@dataclass(frozen=True, slots=True)
class SeriesState:
    n: int = 0
    mean: float = 0.0
    var: float = 0.0
    last_value: float = 0.0
    last_ts: int = -1
    late: int = 0

    _FORMAT = struct.Struct("<qdddqq")

    def pack(self) -> bytes:
        return self._FORMAT.pack(self.n, self.mean, self.var, self.last_value, self.last_ts,
                                 self.late)

    @classmethod
    def unpack(cls, blob: bytes) -> SeriesState:
        return cls(*cls._FORMAT.unpack(blob))


def _alpha(state: SeriesState, ts: int, half_life_s: float) -> float:
    if state.n < WARMUP_SAMPLES:
        return 1.0 / (state.n + 1)
    dt_s = max(0.0, (ts - state.last_ts) / 1000.0)
    time_alpha = 1.0 - math.exp(-math.log(2.0) * dt_s / half_life_s)
    return max(time_alpha, 1.0 / (WARMUP_SAMPLES * 10))


def std_of(state: SeriesState) -> float:
    floor = max(abs(state.mean) * RELATIVE_STD_FLOOR, ABSOLUTE_STD_FLOOR)
    return max(math.sqrt(max(state.var, 0.0)), floor)


def _saturate(x: float) -> float:
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
    dt_s = max((ts - state.last_ts) / 1000.0, 1e-3)
    return {
        "value": value,
        "n": float(state.n),
        "ewma_mean": state.mean,
        "ewma_std": std,
        "zscore": _saturate((value - state.mean) / std),
        "rate_of_change": _saturate((value - state.last_value) / dt_s),
        "seconds_since_last": (ts - state.last_ts) / 1000.0,
    }


def fold(state: SeriesState, value: float, ts: int,
         half_life_s: float = DEFAULT_HALF_LIFE_S) -> SeriesState:
    """Fold one in-order sample into the state (EWMA mean and variance)."""
    a = _alpha(state, ts, half_life_s)
    delta = value - state.mean
    mean = state.mean + a * delta
    # West's incremental EW variance; equals Welford's population variance
    # while a == 1/(n+1).
    var = (1.0 - a) * (state.var + a * delta * delta)
    if not (math.isfinite(mean) and math.isfinite(var)):
        # The sample overflows float statistics; folding it would leave an
        # inf/NaN baseline for good, so the baseline stays as it was.
        mean, var = state.mean, state.var
    return SeriesState(n=state.n + 1, mean=mean, var=var, last_value=value, last_ts=ts,
                       late=state.late)


def observe(state: SeriesState, value: float, ts: int,
            half_life_s: float = DEFAULT_HALF_LIFE_S) -> tuple[dict[str, float], SeriesState]:
    """Serve features for one sample, then fold it in.

    A sample at or before the last folded timestamp is late (or a replay of an
    already processed event after a crash): it is scored against the current
    baseline but not folded again, and counted in ``late``.  This keeps the
    state idempotent under at-least-once delivery.
    """
    feats = features_before(state, value, ts)
    if state.n and ts <= state.last_ts:
        return feats, replace(state, late=state.late + 1)
    return feats, fold(state, value, ts, half_life_s)


def rebaseline(state: SeriesState) -> SeriesState:
    """Forget the baseline's history but keep the current level (after drift)."""
    return replace(state, n=1, mean=state.last_value, var=0.0)
