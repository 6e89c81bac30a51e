"""Every aggregation against a plain reference computation over the same samples.

Streams arrive sorted, shuffled within the allowed lateness, and with a few
samples later than that.  The references below are written from the
documented semantics with numpy, independently of ia.features.aggregations:

* acceptance: a sample newer than the watermark is in order; one at most the
  allowed lateness behind it is folded late; an exact repeat of the newest
  sample is a duplicate; anything older is dropped (and counted);
* window: buckets (max(b, head) - N, min(b, head)] of the samples folded so far,
  without bucket b when serving a late sample (t before the watermark);
* quantile: the K newest (by event time) folded samples, float32, those <= t;
* seasonal: per-hour means, closed once the watermark passes hour end +
  lateness, folded per hour-of-week slot with weight alpha (float16: ~1e-3);
* EWMA, rate, time since last: over the in-order samples only.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict

import numpy as np
import pytest

from ia.bench.features import enrich_batch, enrich_events
from ia.core.metrics import registry_of
from ia.features.aggregations import HOUR_MS, hour_of_week
from ia.features.definitions import DEFAULT_DEFINITIONS, Aggregation, FeatureDef
from ia.features.registry import (
    DEFAULT_REGISTRY,
    DUPLICATE,
    IN_ORDER,
    LATE_FOLDED,
    TOO_LATE,
    FeatureRegistry,
)
from ia.features.series import DEFAULT_HALF_LIFE_S, SeriesState
from ia.features.store import EntityRecord, MemoryFeatureStore
from ia.schemas.models import EventKind, TelemetryEvent
from tests.reference import features_before, fold

MONDAY = 1_732_492_800_000  # 2024-11-25T00:00:00Z, a Monday
L_MS = int(DEFAULT_REGISTRY.allowed_lateness_s * 1000)
WINDOW = DEFAULT_REGISTRY.by_name["window_5m"]
QUANT = DEFAULT_REGISTRY.by_name["recent_12"]
SEASON = DEFAULT_REGISTRY.by_name["seasonal_hour_of_week"]


# --- streams --------------------------------------------------------------------------------


def sorted_stream(n: int, seed: int, start: int = MONDAY, max_gap_ms: int = 40_000,
                  level: float = 50.0) -> list[tuple[int, float]]:
    """(ts, value) in time order; some timestamps repeat, values are noisy."""
    rng = random.Random(seed)
    out, t = [], start
    for _ in range(n):
        t += rng.choice([0, rng.randint(1, max_gap_ms)]) if rng.random() < 0.05 else \
            rng.randint(1, max_gap_ms)
        out.append((t, round(level + rng.gauss(0, 5), 3)))
    return out


def arrive(samples: list[tuple[int, float]], seed: int, max_delay_ms: int,
           too_late: int = 0) -> list[tuple[int, float]]:
    """An arrival order: each sample delayed by up to ``max_delay_ms`` (so at most that
    far behind the watermark), plus ``too_late`` samples delayed by far more."""
    rng = random.Random(seed)
    keyed = [(ts + rng.randint(0, max_delay_ms), i, (ts, v)) for i, (ts, v) in
             enumerate(samples)]
    for i in rng.sample(range(len(samples) // 4, len(samples)), too_late):
        ts, v = samples[i]
        keyed[i] = (ts + L_MS * 3 + rng.randint(0, 60_000), i, (ts, v))
    return [s for _, _, s in sorted(keyed)]


def acceptance(arrivals: list[tuple[int, float]]) -> list[int]:
    """Reference outcome of each arrival (see the module docstring)."""
    wm, last, out = -1, None, []
    for ts, v in arrivals:
        if ts > wm:
            out.append(IN_ORDER)
            wm, last = ts, v
        elif ts == wm and v == last:
            out.append(DUPLICATE)
        elif ts < wm - L_MS:
            out.append(TOO_LATE)
        else:
            out.append(LATE_FOLDED)
    return out


def feed(arrivals: list[tuple[int, float]], registry: FeatureRegistry = DEFAULT_REGISTRY,
         roundtrip: bool = False) -> tuple[list[dict], list[int], list]:
    """Serve and fold each arrival through one series' compiled plan."""
    plan = registry.plan("m")
    st = plan.new()
    served, outcomes = [], []
    for ts, v in arrivals:
        f, outcome = plan.observe(st, v, ts)
        served.append(f)
        outcomes.append(outcome)
        if roundtrip:  # as if every sample were its own batch, through Redis
            st = plan.decode(plan.encode(st))
    return served, outcomes, st


def history(arrivals, outcomes):
    """For each arrival: the samples folded before it, and the watermark then."""
    folded, wm = [], -1
    for (ts, v), outcome in zip(arrivals, outcomes, strict=True):
        yield list(folded), wm
        if outcome in (IN_ORDER, LATE_FOLDED):
            folded.append((ts, v))
        wm = max(wm, ts) if outcome == IN_ORDER else wm


ORDERS = {
    "sorted": lambda s, seed: list(s),
    "shuffled": lambda s, seed: arrive(s, seed, L_MS),
    "shuffled+too_late": lambda s, seed: arrive(s, seed, L_MS, too_late=6),
}


# --- acceptance and lateness counters ---------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_acceptance_matches_reference_and_is_counted(order: str) -> None:
    arrivals = ORDERS[order](sorted_stream(400, seed=1), 1)
    _, outcomes, st = feed(arrivals)
    assert outcomes == acceptance(arrivals)
    assert st[3] == outcomes.count(LATE_FOLDED) and st[4] == outcomes.count(TOO_LATE)
    if order == "shuffled+too_late":
        assert outcomes.count(TOO_LATE) == 6
    if order != "sorted":
        assert outcomes.count(LATE_FOLDED) > 20


def test_late_samples_are_reported_to_prometheus() -> None:
    arrivals = arrive(sorted_stream(200, seed=2), 2, L_MS, too_late=5)
    events = [TelemetryEvent(entity="prom", metric="m", value=v, ts=ts) for ts, v in arrivals]
    events.append(max(events, key=lambda e: e.ts).model_copy())  # repeat of the newest

    def sample(outcome: str) -> float:
        return registry_of("worker").get_sample_value("ia_feature_late_events_total",
                                                      {"outcome": outcome}) or 0.0

    before = {o: sample(o) for o in ("folded", "dropped", "duplicate", "redelivered")}
    rec = EntityRecord()
    enrich_events(events, {"prom": rec})
    other, where = EntityRecord(), [(0, i) for i in range(10)]
    enrich_events(events[:10], {"prom": other}, where)
    enrich_events(events[:10], {"prom": other}, where)  # delivered again: not folded
    outcomes = acceptance(arrivals) + acceptance(arrivals[:10])
    assert sample("dropped") - before["dropped"] == 5 == rec.get_series("m").dropped
    assert sample("folded") - before["folded"] == outcomes.count(LATE_FOLDED)
    assert sample("duplicate") - before["duplicate"] == 1
    assert sample("redelivered") - before["redelivered"] == 10
    assert other.get_series("m").late == acceptance(arrivals[:10]).count(LATE_FOLDED)


# --- window ---------------------------------------------------------------------------------


def reference_window(folded, wm: int, t: int, d: FeatureDef) -> tuple[float, ...] | None:
    w, n = int(d.bucket_s * 1000), d.buckets
    b, head = t // w, (wm // w if wm >= 0 else -(2**62))
    if not folded:
        return None
    ts = np.array([s[0] for s in folded])
    vs = np.array([s[1] for s in folded])
    ids = ts // w
    keep = (ids > max(b, head) - n) & (ids <= min(b, head))
    if t < wm:  # a late sample: its own bucket may hold newer samples
        keep &= ids != b
    if not keep.any():
        return None
    return float(keep.sum()), float(np.mean(vs[keep])), float(vs[keep].min()), \
        float(vs[keep].max())


@pytest.mark.parametrize("order", ORDERS)
@pytest.mark.parametrize("seed", [3, 4])
def test_window_matches_reference(order: str, seed: int) -> None:
    arrivals = ORDERS[order](sorted_stream(600, seed=seed), seed)
    served, outcomes, _ = feed(arrivals)
    for (folded, wm), (t, v), f in zip(history(arrivals, outcomes), arrivals, served,
                                       strict=True):
        ref = reference_window(folded, wm, t, WINDOW)
        got = (f["count_5m"], f["mean_5m"], f["min_5m"], f["max_5m"])
        if ref is None:
            assert got == (0.0, v, v, v)
        else:
            assert got[0] == ref[0] and got[2:] == ref[2:]
            assert got[1] == pytest.approx(ref[1], rel=1e-12)


def test_window_state_is_the_same_whatever_the_arrival_order() -> None:
    samples = sorted_stream(500, seed=5)
    probe = samples[-1][0] + 1
    results = []
    for order in ("sorted", "shuffled"):
        arrivals = ORDERS[order](samples, 5)
        _, _, st = feed(arrivals)
        out = DEFAULT_REGISTRY.plan("m").observe(st, 0.0, probe)[0]
        results.append((out["count_5m"], out["mean_5m"], out["min_5m"], out["max_5m"]))
    assert results[0][0] == results[1][0] and results[0][2:] == results[1][2:]
    assert results[0][1] == pytest.approx(results[1][1], rel=1e-12)
    in_window = [v for ts, v in samples if ts // 60_000 > probe // 60_000 - 5]
    assert results[0][0] == len(in_window)


def test_window_buckets_expire_after_a_gap() -> None:
    arrivals = [(MONDAY + i * 10_000, float(i)) for i in range(40)]
    arrivals.append((arrivals[-1][0] + 10 * 60_000, 100.0))  # ten minutes later
    served, _, _ = feed(arrivals)
    assert served[-1]["count_5m"] == 0.0 and served[-1]["mean_5m"] == 100.0
    assert served[-1]["min_5m"] == served[-1]["max_5m"] == 100.0
    # just before the gap: the current minute so far and the four before it
    assert served[-2]["count_5m"] == 4 * 6 + (arrivals[-2][0] % 60_000) // 10_000


# --- quantiles ------------------------------------------------------------------------------


def reference_quantiles(arrivals, outcomes, k: int, qs: tuple[float, ...]):
    kept: list[tuple[int, float]] = []
    wm = -1
    for (ts, v), outcome in zip(arrivals, outcomes, strict=True):
        xs = [x for s, x in kept if wm < 0 or ts >= wm or s <= ts]
        yield [float(np.quantile(np.array(xs, dtype=np.float64), q)) for q in qs] if xs \
            else [v] * len(qs)
        if outcome in (IN_ORDER, LATE_FOLDED):
            if len(kept) < k:
                kept.append((ts, float(np.float32(v))))
            else:
                oldest = min(s for s, _ in kept)
                if ts > oldest:
                    kept[[s for s, _ in kept].index(oldest)] = (ts, float(np.float32(v)))
        if outcome == IN_ORDER:
            wm = ts


@pytest.mark.parametrize("order", ORDERS)
def test_quantiles_match_numpy(order: str) -> None:
    samples = [(ts, v * 1.000001) for ts, v in sorted_stream(500, seed=6)]
    arrivals = ORDERS[order](samples, 6)
    served, outcomes, _ = feed(arrivals)
    refs = reference_quantiles(arrivals, outcomes, QUANT.samples, QUANT.quantiles)
    for f, ref in zip(served, refs, strict=True):
        assert [f["p50_last12"], f["p95_last12"]] == pytest.approx(ref, rel=1e-12)


def test_quantiles_keep_the_newest_samples_whatever_the_order() -> None:
    samples = sorted_stream(300, seed=7)
    probe = samples[-1][0] + 1
    newest = np.float32([v for _, v in samples[-QUANT.samples:]])
    for order in ("sorted", "shuffled"):
        _, _, st = feed(ORDERS[order](samples, 7))
        out = DEFAULT_REGISTRY.plan("m").observe(st, 0.0, probe)[0]
        assert out["p50_last12"] == pytest.approx(float(np.quantile(newest, 0.5)), rel=1e-6)
        assert out["p95_last12"] == pytest.approx(float(np.quantile(newest, 0.95)), rel=1e-6)


# --- seasonal -------------------------------------------------------------------------------


def test_hour_of_week_slots() -> None:
    assert hour_of_week(MONDAY) == 0
    assert hour_of_week(MONDAY + 25 * HOUR_MS) == 25  # Tuesday 01:00
    assert hour_of_week(MONDAY + 7 * 24 * HOUR_MS - 1) == 167
    assert hour_of_week(MONDAY + 7 * 24 * HOUR_MS) == 0


def seasonal_stream(weeks: int, seed: int) -> list[tuple[int, float]]:
    """Every 10 minutes; the level depends on the hour of the week (plus noise)."""
    rng = random.Random(seed)
    out = []
    for i in range(weeks * 7 * 24 * 6):
        ts = MONDAY + i * 600_000 + rng.randint(0, 300_000)
        slot = hour_of_week(ts)
        out.append((ts, 100.0 + 50.0 * math.sin(slot / 168 * 2 * math.pi) + slot % 24
                    + rng.gauss(0, 2)))
    return out


def reference_seasonal(arrivals, outcomes, alpha: float):
    """Per-slot values served for each arrival (None: slot not known yet)."""
    slots: dict[int, float] = {}
    open_hours: dict[int, list[float]] = defaultdict(list)
    wm = -1
    for (ts, v), outcome in zip(arrivals, outcomes, strict=True):
        now = max(wm, ts)
        for hour in sorted(h for h in open_hours if now >= (h + 1) * HOUR_MS + L_MS):
            mean = float(np.mean(open_hours.pop(hour)))
            slot = hour_of_week(hour * HOUR_MS)
            slots[slot] = mean if slot not in slots else \
                slots[slot] + alpha * (mean - slots[slot])
        yield slots.get(hour_of_week(ts))
        if outcome in (IN_ORDER, LATE_FOLDED):
            open_hours[ts // HOUR_MS].append(v)
        if outcome == IN_ORDER:
            wm = ts


@pytest.mark.parametrize("order", ["sorted", "shuffled", "shuffled+too_late"])
def test_seasonal_profile_matches_reference(order: str) -> None:
    arrivals = ORDERS[order](seasonal_stream(3, seed=8), 8)
    served, outcomes, _ = feed(arrivals)
    known = 0
    for f, ref in zip(served, reference_seasonal(arrivals, outcomes, SEASON.alpha),
                      strict=True):
        if ref is None:  # before an hour is known: the EWMA baseline
            assert f["seasonal_mean"] == f["ewma_mean"]
            assert f["seasonal_z"] == f["zscore"]
        else:
            known += 1
            assert f["seasonal_mean"] == pytest.approx(ref, rel=2e-3)  # float16 slots
            assert f["seasonal_z"] == pytest.approx(
                (f["value"] - f["seasonal_mean"]) / f["ewma_std"], rel=1e-9)
    assert known > len(arrivals) // 2


@pytest.mark.parametrize("scale", [1e-9, 1e12])
def test_seasonal_profile_keeps_values_of_any_magnitude(scale: float) -> None:
    """Slots are float16 on a per-series power-of-two scale."""
    arrivals = [(ts, v * scale) for ts, v in seasonal_stream(2, seed=9)]
    served, outcomes, _ = feed(arrivals)
    refs = list(reference_seasonal(arrivals, outcomes, SEASON.alpha))
    checked = [(f["seasonal_mean"], r) for f, r in zip(served, refs, strict=True) if r]
    assert len(checked) > 800
    for got, ref in checked:
        assert got == pytest.approx(ref, rel=2e-3)


def test_seasonal_profile_rescales_when_values_outgrow_it() -> None:
    """Values 10**6 times larger than the first ones overflow the scale: every slot is
    re-expressed on a larger one (small slots lose precision, large ones do not)."""
    small = seasonal_stream(1, seed=10)
    week = 7 * 24 * HOUR_MS
    arrivals = small + [(ts + week, v * 1e6) for ts, v in small] + \
        [(ts + 2 * week, v * 1e6) for ts, v in small]
    served, outcomes, _ = feed(arrivals)
    refs = list(reference_seasonal(arrivals, outcomes, SEASON.alpha))
    third_week = [(f["seasonal_mean"], r) for (ts, _), f, r in
                  zip(arrivals, served, refs, strict=True) if ts >= MONDAY + 2 * week + HOUR_MS]
    assert len(third_week) > 900
    for got, ref in third_week:
        assert got == pytest.approx(ref, rel=2e-3)


# --- EWMA, rate of change, time since last (in-order samples) --------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_ewma_rate_and_gap_follow_the_in_order_samples(order: str) -> None:
    arrivals = ORDERS[order](sorted_stream(400, seed=10), 10)
    served, outcomes, _ = feed(arrivals)
    state = SeriesState()
    for (ts, v), outcome, f in zip(arrivals, outcomes, served, strict=True):
        expected = features_before(state, v, ts)
        for key in ("n", "ewma_mean", "ewma_std", "zscore", "rate_of_change",
                    "seconds_since_last"):
            assert f[key] == expected[key], key
        if outcome in (LATE_FOLDED, TOO_LATE):
            assert f["rate_of_change"] == 0.0 and f["seconds_since_last"] == 0.0
        if outcome == IN_ORDER:
            state = fold(state, v, ts, DEFAULT_HALF_LIFE_S)


# --- batching, point in time ----------------------------------------------------------------


@pytest.mark.parametrize("order", ORDERS)
def test_state_is_the_same_whether_or_not_it_went_through_storage(order: str) -> None:
    arrivals = ORDERS[order](seasonal_stream(2, seed=11)[:1500], 11)
    once, _, st_once = feed(arrivals)
    each, _, st_each = feed(arrivals, roundtrip=True)
    assert once == each
    assert st_once == st_each


def test_late_samples_are_served_only_data_at_or_before_their_time() -> None:
    """Two streams differ only in samples newer than a late sample: the late sample's
    bucketed features are identical (its EWMA baseline is the documented exception)."""
    base = seasonal_stream(2, seed=12)[:1500]  # into week 2: this hour's slot is known
    t_late = base[-1][0] + 1
    future = [(t_late + 1 + i * 7_000, 0.0) for i in range(12)]  # newer than t_late
    served = []
    for poison in (1e6, -1e6):
        arrivals = base + [(ts, poison) for ts, _ in future] + [(t_late, 42.0)]
        f, outcomes, _ = feed(arrivals)
        assert outcomes[-1] == LATE_FOLDED
        served.append(f[-1])
    bucketed = ("count_5m", "mean_5m", "min_5m", "max_5m", "p50_last12", "p95_last12",
                "seasonal_mean")
    assert {k: served[0][k] for k in bucketed} == {k: served[1][k] for k in bucketed}
    assert served[0]["seasonal_mean"] != served[0]["ewma_mean"]  # from the profile
    assert served[0]["max_5m"] < 1e5 and served[0]["min_5m"] > -1e5


# --- cross-metric ratio and context ---------------------------------------------------------


def entity_events(seed: int, n: int) -> list[TelemetryEvent]:
    """requests and errors of one entity, deploys, config changes, in time order."""
    rng = random.Random(seed)
    out, t = [], MONDAY
    for i in range(n):
        t += rng.randint(1, 15_000)
        if i % 37 == 11:
            out.append(TelemetryEvent(entity="svc", metric=rng.choice(
                ["deploy", "config_change"]), value=1.0, ts=t, kind=EventKind.event))
        else:
            metric = rng.choice(["requests", "errors"])
            value = rng.randint(80, 120) if metric == "requests" else rng.randint(0, 9)
            out.append(TelemetryEvent(entity="svc", metric=metric, value=float(value), ts=t))
    return out


def shuffle_events(events: list[TelemetryEvent], seed: int) -> list[TelemetryEvent]:
    rng = random.Random(seed)
    return [e for _, _, e in sorted((e.ts + rng.randint(0, L_MS), i, e)
                                    for i, e in enumerate(events))]


@pytest.mark.parametrize("shuffled", [False, True])
async def test_error_ratio_and_context_match_reference(shuffled: bool) -> None:
    events = entity_events(seed=13, n=700)
    if shuffled:
        events = shuffle_events(events, 13)
    store = MemoryFeatureStore()
    served = []
    for i in range(0, len(events), 50):
        served += await enrich_batch(events[i:i + 50], store)
    folded: dict[str, list[tuple[int, float]]] = defaultdict(list)
    wms: dict[str, int] = defaultdict(lambda: -1)
    happened: dict[str, list[int]] = defaultdict(list)
    for ev, f in zip(events, served, strict=True):
        t = ev.ts
        if ev.kind is EventKind.event:
            happened[ev.metric].append(t)
        deploys = [x for x in happened["deploy"] if x <= t]
        configs = [x for x in happened["config_change"] if x <= t]
        assert f["seconds_since_deploy"] == ((t - max(deploys)) / 1000 if deploys else 1e9)
        assert f["deploy_within_15m"] == (1.0 if deploys and t - max(deploys) <= 900_000
                                          else 0.0)
        assert f["config_change_within_15m"] == (1.0 if configs and t - max(configs)
                                                 <= 900_000 else 0.0)
        if ev.kind is EventKind.event:
            continue
        if folded["errors"] and folded["requests"]:
            sums = []
            for m in ("errors", "requests"):
                ref = reference_window(folded[m], wms[m], t, WINDOW)
                sums.append(0.0 if ref is None else ref[0] * ref[1])
            expected = sums[0] / sums[1] if sums[1] > 0 else 0.0
            assert f["error_ratio_5m"] == pytest.approx(expected, rel=1e-9)
        else:
            assert "error_ratio_5m" not in f
        if t > wms[ev.metric] or t >= wms[ev.metric] - L_MS:
            folded[ev.metric].append((t, ev.value))
        wms[ev.metric] = max(wms[ev.metric], t)
    assert any(f.get("error_ratio_5m", 0) > 0 for f in served)
    assert any(f["deploy_within_15m"] for f in served)


async def test_last_action_and_feedback_counters() -> None:
    store = MemoryFeatureStore()
    await store.record_action("svc", "restart", "succeeded", MONDAY + 60_000)
    await store.record_action("svc", "restart", "failed", MONDAY + 30_000)  # older: ignored
    await store.incr_context("svc", "fp", 2)
    await store.incr_context("svc", "failed")

    def at(ts: int) -> TelemetryEvent:
        return TelemetryEvent(entity="svc", metric="cpu", value=1.0, ts=ts)

    before, after = await enrich_batch([at(MONDAY + 59_000), at(MONDAY + 90_000)], store)
    assert before["seconds_since_action"] == 1e9 and before["last_action_succeeded"] == 0.0
    assert after["seconds_since_action"] == 30.0
    assert (after["last_action_succeeded"], after["last_action_failed"]) == (1.0, 0.0)
    assert (after["false_positives"], after["true_positives"], after["actions_failed"]) == \
        (2.0, 0.0, 1.0)
    await store.record_action("svc", "rollback", "timeout", MONDAY + 120_000)
    (later,) = await enrich_batch([at(MONDAY + 130_000)], store)
    assert (later["last_action_failed"], later["last_action_succeeded"]) == (1.0, 0.0)
    assert later["seconds_since_action"] == 10.0


def test_every_default_output_is_served_and_finite() -> None:
    events = entity_events(seed=14, n=200)
    feats = enrich_events(events, {"svc": EntityRecord()})
    metric_outputs = {o for d in DEFAULT_DEFINITIONS for o in d.outputs}
    last = [f for e, f in zip(events, feats, strict=True) if e.metric == "errors"][-1]
    assert metric_outputs | {"value"} == set(last)
    assert all(math.isfinite(v) for f in feats for v in f.values())
    context_only = {o for d in DEFAULT_DEFINITIONS if d.aggregation in (
        Aggregation.since_event, Aggregation.event_within, Aggregation.counter,
        Aggregation.last_action) for o in d.outputs}
    event_feats = next(f for e, f in zip(events, feats, strict=True)
                       if e.kind is EventKind.event)
    assert set(event_feats) == context_only | {"value"}
