"""Pure reference implementations the tests compare the hot paths with.

:func:`observe` is the EWMA features of one sample as a pure function: given the
state *before* a sample, the features served for it (from earlier data only) and the
state after it. The feature store's compiled plans (``ia.features.aggregations``) must
serve exactly these numbers.
"""

from __future__ import annotations

from dataclasses import replace

from ia.features.series import (
    DEFAULT_HALF_LIFE_S,
    SeriesState,
    ewma_step,
    saturate,
    std_of,
)


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


