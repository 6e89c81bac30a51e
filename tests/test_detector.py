"""The adaptive detector: drift adaptation, suppression, state, calibration."""

from __future__ import annotations

import math
import random

import pytest
from river import drift as river_drift

from ia.decisions.detector import AdaptiveDetector, DetectorConfig, DetectorState
from ia.decisions.drift import PageHinkleyParams, ph_update
from ia.schemas.models import DriftState

T0 = 1_700_000_000_000
STEP = 60_000


def stream(det: AdaptiveDetector, values: list[float], st: DetectorState | None = None,
           start: int = 0) -> tuple[list[float], list[str | None], DetectorState]:
    st = st or DetectorState()
    scores, events = [], []
    for i, v in enumerate(values):
        s = det.score(st, v, T0 + (start + i) * STEP)
        _, ev = det.learn(st, s)
        scores.append(s.score)
        events.append(ev)
    return scores, events, st


def gauss(n: int, seed: int, level: float = 100.0, sd: float = 2.0) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0, sd) for _ in range(n)]


def test_page_hinkley_matches_river() -> None:
    rng = random.Random(1)
    xs = [rng.gauss(0, 1) for _ in range(2000)] + [rng.gauss(3, 1) for _ in range(1000)] \
        + [rng.gauss(-2, 2) for _ in range(2000)]
    ref = river_drift.PageHinkley(min_instances=30, delta=0.5, threshold=20.0, mode="both")
    mine, params = [0.0] * 6, PageHinkleyParams(min_instances=30, delta=0.5, threshold=20.0)
    fired_ref, fired_mine = [], []
    for i, x in enumerate(xs):
        ref.update(x)
        if ref.drift_detected:
            fired_ref.append(i)
        if ph_update(mine, x, params):
            fired_mine.append(i)
    assert fired_ref == fired_mine and len(fired_mine) >= 2


@pytest.mark.parametrize("shift_sd", [10.0, -10.0, 50.0, 1000.0])
def test_level_shift_flagged_then_stops_being_anomalous(shift_sd: float) -> None:
    det = AdaptiveDetector()
    before, after = gauss(600, 1), gauss(400, 2, level=100.0 + 2.0 * shift_sd)
    scores, events, _ = stream(det, before + after)
    assert max(scores[350:600]) < 0.5  # quiet before
    assert scores[600] >= 0.9  # the shift itself is flagged at once
    # bounded: the new level is normal within 50 samples, however large the shift
    assert max(scores[650:]) < 0.5
    assert "level" in (events[600 + next(i for i, e in enumerate(events[600:]) if e)] or "")


@pytest.mark.parametrize(("sd", "detected"), [(5.0, False), (10.0, True), (20.0, True)])
def test_variance_change_is_adapted_and_large_ones_detected(sd: float, detected: bool) -> None:
    det = AdaptiveDetector()
    scores, events, st = stream(det, gauss(600, 3, sd=1.0) + gauss(600, 4, sd=sd))
    hits = [i for i, e in enumerate(events) if e and "dispersion" in e]
    if detected:  # a large change is a drift event, soon after it starts
        assert hits and 600 <= hits[0] < 700
    # adapted either way: the new noise level is normal again after a bounded time
    assert sum(s >= 0.5 for s in scores[800:]) <= 2
    assert st.scale_l > 0.5 * sd  # the scale describes the new noise (MAD ~ 0.8 sd)


def test_one_alert_per_incident_unless_configured_otherwise() -> None:
    values = gauss(500, 5)
    values[400:410] = [200.0] * 10  # a 10-sample incident
    suppressed, _, _ = stream(AdaptiveDetector(), values)
    each, _, _ = stream(AdaptiveDetector(DetectorConfig(suppress_samples=0)), values)
    assert sum(s >= 0.5 for s in suppressed[400:420]) == 1
    assert sum(s >= 0.5 for s in each[400:420]) > 1


def test_warmup_flags_only_gross_outliers() -> None:
    values = [*gauss(60, 6), 400.0]
    scores, _, _ = stream(AdaptiveDetector(), values)
    assert max(scores[:10]) < 0.05  # nothing from the first handful
    assert max(scores[:60]) < 0.5 and scores[60] >= 0.9


def test_gaussian_noise_is_quiet_after_learning() -> None:
    scores, _, _ = stream(AdaptiveDetector(), gauss(5000, 7))
    assert sum(s >= 0.5 for s in scores) / len(scores) < 0.002


def test_seasonal_series_is_judged_against_its_week() -> None:
    # hourly samples with a strong daily cycle: the hour-of-week profile predicts it
    day = [100 + 50 * math.sin(2 * math.pi * h / 24) for h in range(24)]
    values = [v + random.Random(h).gauss(0, 1) for h, v in enumerate(day * 7 * 5)]
    det, st = AdaptiveDetector(), DetectorState()
    scores = []
    for i, v in enumerate(values):
        s = det.score(st, v, T0 + i * 3_600_000)
        det.learn(st, s)
        scores.append(s)
    assert scores[-1].components["seasonal"] == 1.0
    assert max(s.score for s in scores[-168:]) < 0.5
    # the same value at the wrong hour is anomalous
    trough = min(day)
    wrong = det.score(st, trough, T0 + len(values) * 3_600_000 + 6 * 3_600_000)
    assert wrong.components["residual_z"] < -5


def test_state_packs_and_restores_exactly() -> None:
    det = AdaptiveDetector()
    _, _, st = stream(det, gauss(700, 8))
    blob = st.pack()
    assert 1000 < len(blob) < 1300
    restored = DetectorState.unpack(blob)
    assert restored.pack() == blob
    # continuing from the restored state equals continuing from the original
    more = gauss(50, 9)
    a, _, _ = stream(det, more, st, start=700)
    b, _, _ = stream(det, more, restored, start=700)
    assert a == b
    # another format version, or garbage, starts afresh instead of misreading
    assert DetectorState.unpack(b"\x09" + blob[1:]).n == 0
    assert DetectorState.unpack(b"junk").n == 0


def test_late_samples_are_scored_but_not_learnt() -> None:
    det = AdaptiveDetector()
    _, _, st = stream(det, gauss(100, 10))
    before = st.pack()
    s = det.score(st, 100.0, T0)  # older than the last learnt sample
    state, event = det.learn(st, s)
    assert st.pack() == before and state is DriftState.stable and event is None


def test_scores_are_finite_and_bounded_for_extremes() -> None:
    det, st = AdaptiveDetector(), DetectorState()
    rng = random.Random(11)
    for i in range(1500):
        v = rng.choice([rng.gauss(0, 1), 1e308, -1e308, 0.0, 5e-324, rng.uniform(-1e9, 1e9)])
        s = det.score(st, v, T0 + i * STEP)
        assert 0.0 <= s.score <= 1.0
        assert all(math.isfinite(c) for c in s.components.values())
        det.learn(st, s)
