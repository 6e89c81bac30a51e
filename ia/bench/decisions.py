"""``ia bench decisions``: cost of scoring + learning one event, per series.

Every figure is measured in the same run on the same synthetic events (many
series, interleaved as a worker sees them), and compared with a baseline
measured alongside it: River's ``HalfSpaceTrees`` with default settings, one
model shared by all series (the cheapest way to use it).  The detector's own
figure includes nothing but ``score`` + ``learn``; a second figure adds
unpacking and packing the series state for every event, the worst case of
the worker's once-per-batch state round trip.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

from river import anomaly, preprocessing

from ia.bench.baselines import SpineDetector
from ia.decisions.detector import AdaptiveDetector, DetectorState

TARGET_US = 40.0


@dataclass
class Figure:
    name: str
    us_per_event: float
    ratio_vs_baseline: float


def synthetic(series: int, per_series: int, seed: int = 1) -> list[tuple[int, float, int]]:
    """(series index, value, ts ms), round-robin over series, with rare spikes."""
    rng = random.Random(seed)
    levels = [rng.uniform(10, 1000) for _ in range(series)]
    out = []
    for i in range(per_series):
        for s in range(series):
            v = levels[s] * (1 + 0.05 * rng.gauss(0, 1))
            if rng.random() < 0.002:
                v *= 3
            out.append((s, v, 1_700_000_000_000 + i * 60_000))
    return out


def _time(fn: Callable[[], None], events: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best / events * 1e6


def _detector_run(events: list[tuple[int, float, int]], series: int, roundtrip: bool):
    det = AdaptiveDetector()

    def run() -> None:
        if roundtrip:
            blobs = [DetectorState().pack() for _ in range(series)]
            for s, v, ts in events:
                st = DetectorState.unpack(blobs[s])
                det.learn(st, det.score(st, v, ts))
                blobs[s] = st.pack()
        else:
            states = [DetectorState() for _ in range(series)]
            for s, v, ts in events:
                st = states[s]
                det.learn(st, det.score(st, v, ts))
    return run


def _hst_run(events: list[tuple[int, float, int]]):
    def run() -> None:
        scaler, hst = preprocessing.MinMaxScaler(), anomaly.HalfSpaceTrees(seed=42)
        for _s, v, _ts in events:
            x = scaler.learn_one({"value": v}) or scaler.transform_one({"value": v})
            hst.score_one(x)
            hst.learn_one(x)
    return run


def _spine_run(events: list[tuple[int, float, int]]):
    def run() -> None:
        det = SpineDetector()
        for _s, v, _ts in events:
            x = {"zscore": (v - 100.0) / 10.0, "rate_of_change": 0.0, "ewma_std": 1.0, "n": 100.0}
            det.score_one(x)
            det.learn_one(x)
    return run


def bench_decisions(series: int = 1000, per_series: int = 30, repeat: int = 3) -> dict:
    events = synthetic(series, per_series)
    n = len(events)
    baseline = _time(_hst_run(events), n, repeat)
    measured = {
        "adaptive detector: score + learn": _time(_detector_run(events, series, False), n,
                                                  repeat),
        "adaptive detector: + state unpack/pack per event": _time(
            _detector_run(events, series, True), n, repeat),
        "previous spine model (z tail + shared HST)": _time(_spine_run(events), n, repeat),
        "baseline: River HalfSpaceTrees (defaults, shared)": baseline,
    }
    figures = [Figure(k, round(v, 2), round(v / baseline, 3)) for k, v in measured.items()]
    return {
        "series": series, "events": n, "repeat": repeat, "target_us": TARGET_US,
        "state_bytes_per_series": len(DetectorState().pack()),
        "figures": [asdict(f) for f in figures],
        "meets_target": measured["adaptive detector: score + learn"] <= TARGET_US,
    }


def format_bench(result: dict) -> str:
    lines = [f"ia bench decisions: {result['events']} events over {result['series']} series "
             f"(best of {result['repeat']}); state {result['state_bytes_per_series']} B/series",
             f"{'what':52s} {'us/event':>10s} {'vs baseline':>12s}"]
    lines += [f"{f['name']:52s} {f['us_per_event']:10.2f} {f['ratio_vs_baseline']:11.3f}x"
              for f in result["figures"]]
    verdict = "meets" if result["meets_target"] else "MISSES"
    lines.append(f"target: score + learn <= {result['target_us']:g} us/event per series "
                 f"({verdict})")
    return "\n".join(lines)
