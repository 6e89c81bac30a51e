"""Per-series drift detection with River's Page-Hinkley test.

The detector watches the (clipped) z-score residuals of one series.  A
persistent level or variance change moves their mean away from zero; when the
test fires, the series baseline is re-learnt from the new level, so a shift
that persists stops being anomalous after a bounded time rather than
alarming until the EWMA catches up.

Detectors live in memory, bounded by an LRU; losing one (restart, eviction)
only means drift on that series is detected from scratch.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from river import drift

from ia.schemas.models import DriftState

# How many samples after a detection the series reports ``drift``.
DRIFT_HOLD_SAMPLES = 10
Z_CLIP = 10.0


@dataclass
class _SeriesDrift:
    detector: drift.PageHinkley = field(default_factory=lambda: drift.PageHinkley(
        min_instances=30, delta=0.5, threshold=60.0, mode="both"))
    hold: int = 0


class DriftMonitor:
    def __init__(self, max_series: int = 100_000) -> None:
        self.max_series = max_series
        self._series: OrderedDict[tuple[str, str], _SeriesDrift] = OrderedDict()
        self.detections = 0

    def _get(self, key: tuple[str, str]) -> _SeriesDrift:
        s = self._series.get(key)
        if s is None:
            s = self._series[key] = _SeriesDrift()
            if len(self._series) > self.max_series:
                self._series.popitem(last=False)
        else:
            self._series.move_to_end(key)
        return s

    def update(self, entity: str, metric: str, zscore: float) -> tuple[DriftState, bool]:
        """Return the series' drift state and whether drift was detected just now."""
        s = self._get((entity, metric))
        s.detector.update(max(-Z_CLIP, min(Z_CLIP, zscore)))
        if s.detector.drift_detected:
            self.detections += 1
            s.hold = DRIFT_HOLD_SAMPLES
            return DriftState.drift, True
        if s.hold > 0:
            s.hold -= 1
            return DriftState.drift, False
        return DriftState.stable, False


# --- Page-Hinkley on packed state -----------------------------------------------------------
#
# The detector keeps its drift tests inside each series' packed state (so they are
# checkpointed and move with a partition), which River's objects cannot do cheaply.
# ``ph_update`` is River's ``drift.PageHinkley`` update step, field for field;
# tests/test_detector.py checks that both fire on exactly the same samples.

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
