"""Baselines that ``ia bench decisions`` and the tests compare the detector with.

:class:`SpineDetector` scores the feature vector ``ia.features.enrich`` serves for one
event (``score_one`` before ``learn_one``: no look-ahead): a per-series tail probability
of the EWMA z-score blended with a River ``HalfSpaceTrees`` shared by all series over
per-series normalised inputs. :class:`DriftMonitor` runs River's own Page-Hinkley
objects per series in memory, the reference for :func:`ia.decisions.drift.ph_update`.

>>> det = SpineDetector()
>>> normal = {"zscore": 0.3, "rate_of_change": 0.0, "ewma_std": 1.0, "n": 100.0}
>>> spike = {"zscore": 9.0, "rate_of_change": 9.0, "ewma_std": 1.0, "n": 100.0}
>>> det.score_one(normal) < 0.5 < det.score_one(spike)
True
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Protocol

from river import anomaly, drift

from ia.features.series import WARMUP_SAMPLES
from ia.schemas.models import DriftState, ModelInfo


class AnomalyModel(Protocol):
    info: ModelInfo

    def score_one(self, x: dict[str, float]) -> float: ...

    def learn_one(self, x: dict[str, float]) -> None: ...


# -log10 of a two-sided tail probability, scaled so that p = 1e-10 scores 1.
SURPRISE_AT_ONE = 10.0


def tail_surprise(z: float) -> float:
    """-log10 P(|Z| >= |z|) for a standard normal, stable for huge |z|."""
    z = abs(z)
    if z < 8.0:
        return -math.log10(max(math.erfc(z / math.sqrt(2.0)), 1e-300))
    # Asymptotic tail: P ~ exp(-z^2/2) / (z * sqrt(pi/2)).
    return (z * z / 2.0 + math.log(z * math.sqrt(math.pi / 2.0))) / math.log(10.0)


def zscore_score(z: float) -> float:
    return min(1.0, tail_surprise(z) / SURPRISE_AT_ONE)


def _squash(v: float, scale: float) -> float:
    """Map an unbounded value into [0, 1] for the half-space trees."""
    return 0.5 + math.tanh(v / scale) / 2.0


class SpineDetector:
    """EWMA z-score tail probability refined by River half-space trees."""

    info = ModelInfo(id="zscore-hst", version="1.0.0")

    def __init__(self, hst_weight: float = 0.25, seed: int = 42) -> None:
        self.hst_weight = hst_weight
        self._learned = 0
        self.hst = anomaly.HalfSpaceTrees(
            n_trees=5, height=6, window_size=250, seed=seed,
            limits={"z": (0.0, 1.0), "roc": (0.0, 1.0)},
        )

    @staticmethod
    def _hst_input(x: dict[str, float]) -> dict[str, float]:
        std = x.get("ewma_std") or 1.0
        return {"z": _squash(x.get("zscore", 0.0), 4.0),
                "roc": _squash(x.get("rate_of_change", 0.0) / std, 4.0)}

    def components(self, x: dict[str, float]) -> dict[str, float]:
        # A z-score from a handful of samples is mostly noise in the variance
        # estimate; ramp its weight in over the warm-up.
        ramp = min(1.0, x.get("n", WARMUP_SAMPLES) / WARMUP_SAMPLES)
        return {"score_zscore": zscore_score(x.get("zscore", 0.0) * ramp),
                "score_hst": float(self.hst.score_one(self._hst_input(x)))}

    def score_one(self, x: dict[str, float]) -> float:
        return self.blend(self.components(x))

    def blend(self, c: dict[str, float]) -> float:
        if self._learned < self.hst.window_size:
            # Half-space trees score 0 until their first reference window is
            # full; blending then would cap every score below 1.
            return c["score_zscore"]
        blended = (1.0 - self.hst_weight) * c["score_zscore"] + self.hst_weight * c["score_hst"]
        return min(1.0, max(0.0, blended))

    def learn_one(self, x: dict[str, float]) -> None:
        self._learned += 1
        self.hst.learn_one(self._hst_input(x))


# --- drift with River's own objects ----------------------------------------------------------

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
