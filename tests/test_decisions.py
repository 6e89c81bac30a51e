"""Decisions: anomaly model, drift detection, the engine, cooldown claims, confidence."""

from __future__ import annotations

import itertools
import math
import random

import pytest

from ia.bench.baselines import (
    SURPRISE_AT_ONE,
    DriftMonitor,
    SpineDetector,
    tail_surprise,
    zscore_score,
)
from ia.bench.features import enrich_events
from ia.decisions.detector import AdaptiveDetector, DetectorConfig
from ia.decisions.engine import DecisionEngine, confidence_of
from ia.decisions.guards import MemoryGuardStore
from ia.decisions.policy import Policy
from ia.features.series import WARMUP_SAMPLES
from ia.features.store import EntityRecord, MemoryFeatureStore
from ia.schemas.models import (
    Decision,
    DriftState,
    EventKind,
    Mode,
    TelemetryEvent,
    derive_decision_id,
)

T0 = 1_732_700_000_000
STEP_MS = 10_000


def metric(entity: str, name: str, value: float, ts: int) -> TelemetryEvent:
    return TelemetryEvent(entity=entity, metric=name, value=value, ts=ts)


def normal_stream(entity: str, name: str, n: int, seed: int, level: float = 100.0,
                  noise: float = 2.0, start: int = T0) -> list[TelemetryEvent]:
    rng = random.Random(seed)
    return [metric(entity, name, level + rng.gauss(0, noise), start + i * STEP_MS)
            for i in range(n)]


# These tests are about policy and guards: each spike should score on its own, so
# the detector's alert suppression (one alert per incident) is off here; it is
# tested in tests/test_detector.py.
UNSUPPRESSED = DetectorConfig(suppress_samples=0)


def engine(policy_text: str, claims=None, store=None, pipeline_id: str = "main"):
    p = Policy.from_text(policy_text)
    return DecisionEngine(lambda: p, store or MemoryFeatureStore(), claims or MemoryGuardStore(),
                          clock=lambda ev: ev.ts, pipeline_id=pipeline_id,
                          detector=AdaptiveDetector(UNSUPPRESSED))


async def run(eng: DecisionEngine, events: list[TelemetryEvent],
              batch: int = 25) -> list[Decision]:
    out: list[Decision] = []
    for i in range(0, len(events), batch):
        out.extend(await eng.process(events[i:i + batch]))
    return out


# --- the model ------------------------------------------------------------------------------


def test_scores_are_in_unit_interval() -> None:
    rng = random.Random(0)
    det = SpineDetector()
    for i in range(1500):
        x = {"zscore": rng.choice([rng.gauss(0, 1), rng.uniform(-1e6, 1e6), 0.0, -40.0]),
             "rate_of_change": rng.uniform(-1e9, 1e9),
             "ewma_std": rng.choice([0.0, 1e-9, 1.0, 1e9]),
             "n": float(rng.randint(0, 500))}
        if i % 7 == 0:
            x = {"zscore": x["zscore"]}  # missing features fall back to defaults
        c = det.components(x)
        assert 0.0 <= c["score_zscore"] <= 1.0
        assert 0.0 <= c["score_hst"] <= 1.0
        s = det.score_one(x)
        assert 0.0 <= s <= 1.0 and math.isfinite(s)
        det.learn_one(x)
    assert det.score_one({"zscore": 1e308, "rate_of_change": -1e308, "ewma_std": 1e-300,
                          "n": 100.0}) <= 1.0


def test_zscore_component_is_monotone_in_abs_z() -> None:
    det = SpineDetector()
    zs = [i / 10 for i in range(0, 800)]
    for n in (3.0, 10.0, 100.0):
        up = [det.components({"zscore": z, "n": n})["score_zscore"] for z in zs]
        down = [det.components({"zscore": -z, "n": n})["score_zscore"] for z in zs]
        assert up == down  # symmetric in the sign of z
        assert all(a <= b for a, b in itertools.pairwise(up))
        assert up[0] == 0.0 and up[-1] == 1.0
    # during warm-up the same z counts for less
    young = det.components({"zscore": 5.0, "n": 5.0})["score_zscore"]
    grown = det.components({"zscore": 5.0, "n": float(WARMUP_SAMPLES)})["score_zscore"]
    assert young < grown


def test_tail_surprise_values_and_continuity() -> None:
    assert tail_surprise(0.0) == pytest.approx(0.0, abs=1e-12)
    assert tail_surprise(1.959964) == pytest.approx(-math.log10(0.05), rel=1e-5)
    assert tail_surprise(-3.0) == tail_surprise(3.0)
    # the exact and asymptotic forms agree where they meet at |z| = 8
    below, above = tail_surprise(8.0 - 1e-9), tail_surprise(8.0 + 1e-9)
    assert abs(below - above) < 0.01
    for lo in (0.0, 8.0 + 1e-9):  # increasing on each side of the switch
        values = [tail_surprise(lo + i / 1000) for i in range(7999)]
        assert all(b > a for a, b in itertools.pairwise(values))
    assert math.isfinite(tail_surprise(1e150))
    assert zscore_score(1e150) == 1.0
    # p = 1e-10 is "score 1"
    z_at_one = 6.466951  # two-sided P(|Z| >= z) = 1e-10
    assert zscore_score(z_at_one) == pytest.approx(1.0, abs=1e-3)
    assert tail_surprise(z_at_one) == pytest.approx(SURPRISE_AT_ONE, abs=1e-2)


def score_stream(events: list[TelemetryEvent], det: SpineDetector,
                 rec: EntityRecord) -> list[float]:
    """Features then score-before-learn, as the engine does it."""
    scores = []
    for f in enrich_events(events, {events[0].entity: rec}):
        if f["n"] < 1:
            continue
        scores.append(det.score_one(f))
        det.learn_one(f)
    return scores


@pytest.mark.parametrize("seed", [1, 2])
def test_gaussian_noise_rarely_alarms_and_a_big_spike_does(seed: int) -> None:
    events = normal_stream("svc", "lat", 2000, seed)
    det, rec = SpineDetector(), EntityRecord()
    scores = score_stream(events, det, rec)
    high = sum(s > 0.8 for s in scores)
    assert high / len(scores) < 0.005, high
    state = rec.get_series("lat")
    spike = metric("svc", "lat", 100.0 + 10 * 2.0, events[-1].ts + STEP_MS)
    (f,) = enrich_events([spike], {"svc": rec})
    assert f["zscore"] > 7.0
    assert det.score_one(f) > 0.9
    assert state.n == 2000


# --- drift ----------------------------------------------------------------------------------


def test_drift_monitor_stable_on_noise_and_fires_on_shift() -> None:
    rng = random.Random(4)
    mon = DriftMonitor()
    for _ in range(500):
        state, detected = mon.update("a", "m", rng.gauss(0, 1))
        assert state is DriftState.stable and not detected
    fired = None
    for i in range(200):
        _, detected = mon.update("a", "m", 4.0 + rng.gauss(0, 1))
        if detected:
            fired = i
            break
    assert fired is not None and fired < 40
    assert mon.detections == 1
    # the state is held for a while after the detection, then clears
    held = [mon.update("a", "m", rng.gauss(0, 1))[0] for _ in range(15)]
    assert held[0] is DriftState.drift and held[-1] is DriftState.stable
    # series are independent, and the LRU bound holds
    small = DriftMonitor(max_series=3)
    for k in range(10):
        small.update(f"e{k}", "m", 0.0)
    assert len(small._series) == 3


SHIFT_POLICY = """\
version: 1
rules:
  - name: alarm
    when: {min_score: 0.8}
    action: {type: log}
    mode: shadow
"""


@pytest.mark.parametrize("shift", [20.0, -20.0, 10.0])
async def test_level_shift_is_flagged_then_absorbed(shift: float) -> None:
    """A persistent shift is flagged at once, stops being anomalous within a bounded
    number of samples; a large one (10 sigma) is also detected as drift and the
    feature baseline is re-learnt at the new level."""
    before = normal_stream("svc", "lat", 300, seed=7)
    after = normal_stream("svc", "lat", 300, seed=8, level=100.0 + shift,
                          start=before[-1].ts + STEP_MS)
    eng = engine(SHIFT_POLICY)
    decisions = await run(eng, before + after)
    pre, post = decisions[:300], decisions[300:]
    assert all(d.drift is DriftState.stable for d in pre)
    assert post[0].anomaly_score > 0.9
    # bounded: after 40 samples the new level is normal
    assert max(d.anomaly_score for d in post[40:]) < 0.5
    assert all(d.action is None for d in post[40:])
    if abs(shift) < 20:
        return  # absorbed by the fast baseline before the drift test needs to fire
    detected_at = next(i for i, d in enumerate(post) if d.drift is DriftState.drift)
    assert detected_at < 60
    assert eng.stats.drift_detections == 1
    assert post[detected_at].explanation.drift_event == "level"
    # (features of a batch are computed before it is scored, so the re-learnt
    # baseline shows from the next batch of 25)
    for d in post[detected_at + 50:]:
        assert d.features["ewma_mean"] == pytest.approx(100.0 + shift, abs=2.0)


# --- the engine -----------------------------------------------------------------------------


MIXED_POLICY = """\
version: 1
defaults: {cooldown_s: 120}
rules:
  - name: rollback-after-deploy
    match: {entity: "svc-*", metric: errors}
    when:
      min_score: 0.7
      direction: up
      features: {seconds_since_deploy: {max: 900}}
    action: {type: webhook, target: "{entity}", params: {op: rollback}}
  - name: page
    when: {min_score: 0.8}
    action: {type: log, target: "{entity}"}
    mode: needs_approval
  - name: note-deploys
    match: {kind: event, metric: deploy}
    action: {type: log, target: "deploy:{entity}"}
    mode: shadow
"""


def mixed_events(seed: int) -> list[TelemetryEvent]:
    rng = random.Random(seed)
    events: list[TelemetryEvent] = []
    for entity in ("svc-a", "svc-b", "db-1"):
        for name, level in (("errors", 5.0), ("latency", 200.0)):
            events += normal_stream(entity, name, 150, rng.randint(0, 10**6), level=level,
                                    noise=level / 20)
    deploy_ts = T0 + 100 * STEP_MS + 3_000
    events.append(TelemetryEvent(entity="svc-a", metric="deploy", value=1.0, ts=deploy_ts,
                                 kind=EventKind.event, labels={"correlation_id": "rel-42"}))
    events += [metric("svc-a", "errors", 40.0, deploy_ts + 60_000),
               metric("svc-b", "latency", 900.0, deploy_ts + 70_000),
               metric("db-1", "errors", 80.0, T0 + 140 * STEP_MS + 5)]
    events.append(events[50].model_copy())  # a redelivered duplicate
    events.sort(key=lambda e: e.ts)
    return events


async def test_engine_is_deterministic() -> None:
    events = mixed_events(seed=3)
    first = await run(engine(MIXED_POLICY), events, batch=17)
    second = await run(engine(MIXED_POLICY), events, batch=17)
    other_batching = await run(engine(MIXED_POLICY), events, batch=64)
    assert len(first) == len(events)
    dumps = [d.model_dump_json() for d in first]
    assert dumps == [d.model_dump_json() for d in second]
    assert dumps == [d.model_dump_json() for d in other_batching]
    # the run was not trivial: it decided actions in several modes
    modes = {d.mode for d in first}
    assert {Mode.none, Mode.auto, Mode.shadow, Mode.needs_approval} <= modes
    rollback = [d for d in first if d.action and d.action.params.get("op") == "rollback"]
    assert [d.entity for d in rollback] == ["svc-a"]
    assert rollback[0].features["seconds_since_deploy"] == 60.0
    assert rollback[0].decided_at == rollback[0].ts
    deploy = next(d for d in first if d.metric == "deploy")
    assert deploy.correlation_id == "rel-42"
    assert deploy.anomaly_score == 0.0 and deploy.action.target == "deploy:svc-a"


async def test_decision_ids_derive_from_event_ids() -> None:
    events = mixed_events(seed=5)[:200]
    main = await run(engine(MIXED_POLICY), events)
    for ev, d in zip(events, main, strict=True):
        assert d.event_id == ev.event_id
        assert d.decision_id == derive_decision_id(ev.event_id, "main")
    assert len({d.decision_id for d in main}) == len({ev.event_id for ev in events})
    shadow = await run(engine(MIXED_POLICY, pipeline_id="canary"), events)
    assert not {d.decision_id for d in main} & {d.decision_id for d in shadow}
    # an explicit event id is used as given
    ev = metric("svc-z", "cpu", 1.0, T0).model_copy(update={"event_id": "producer-7"})
    (d,) = await engine(MIXED_POLICY).process([ev])
    assert d.decision_id == derive_decision_id("producer-7")


COOLDOWN_POLICY = """\
version: 1
rules:
  - name: restart
    match: {metric: latency}
    when: {min_score: 0.8, direction: up}
    action: {type: webhook, target: "{entity}"}
    cooldown_s: 60
"""


def cooldown_events() -> tuple[list[TelemetryEvent], dict[str, int]]:
    base = normal_stream("svc-a", "latency", 100, seed=11)
    base += normal_stream("svc-b", "latency", 100, seed=12)
    last = T0 + 99 * STEP_MS
    spikes = {"a1": last + 10_000, "b1": last + 15_000, "a2": last + 40_000,
              "a3": last + 10_000 + 60_000, "a4": last + 10_000 + 65_000}
    # each spike well above what the previous ones taught the baseline
    heights = {"a1": 400.0, "b1": 400.0, "a2": 400.0, "a3": 800.0, "a4": 2000.0}
    for name, ts in spikes.items():
        base.append(metric(f"svc-{name[0]}", "latency", heights[name], ts))
    base.sort(key=lambda e: e.ts)
    return base, spikes


async def test_cooldown_blocks_second_action_on_same_target() -> None:
    events, spikes = cooldown_events()
    claims = MemoryGuardStore()
    eng = engine(COOLDOWN_POLICY, claims=claims)
    decisions = await run(eng, events)
    by_ts = {(d.entity, d.ts): d for d in decisions}
    a1, b1, a2, a3, a4 = (by_ts[(f"svc-{k[0]}", ts)] for k, ts in spikes.items())
    for d in (a1, b1, a2, a3, a4):
        assert d.action is not None and d.anomaly_score >= 0.8, d.rule_trace
    assert a1.mode is Mode.auto
    assert b1.mode is Mode.auto  # another target is not affected
    # 30 s later, same rule and target: blocked, and the trace says why
    assert a2.mode is Mode.blocked
    guard = a2.rule_trace[-1]
    assert guard.rule == "guard:cooldown" and guard.matched
    assert a1.decision_id in guard.reason and "60s" in guard.reason
    # once the cooldown has passed in event time, it acts again, and re-arms
    assert a3.mode is Mode.auto
    assert a4.mode is Mode.blocked and a3.decision_id in a4.rule_trace[-1].reason
    assert eng.stats.guards == {"cooldown": 2}
    assert all(t.rule != "guard:cooldown" for t in a1.rule_trace)


async def test_reprocessing_a_claimed_decision_keeps_it_auto() -> None:
    """A crash after the claim but before the batch is acknowledged replays the batch:
    the decision finds its own claim (same decision id) instead of blocking itself."""
    events, spikes = cooldown_events()
    upto_a2 = [e for e in events if e.ts <= spikes["a2"]]
    claims = MemoryGuardStore()
    live = await run(engine(COOLDOWN_POLICY, claims=claims), upto_a2)
    # the worker dies; a new one (fresh feature state, same claims) replays the events
    replayed = await run(engine(COOLDOWN_POLICY, claims=claims), upto_a2, batch=1000)
    assert [d.model_dump_json() for d in replayed] == [d.model_dump_json() for d in live]
    a1, a2 = live[-3], live[-1]
    assert (a1.ts, a2.ts) == (spikes["a1"], spikes["a2"])
    assert (a1.mode, a2.mode) == (Mode.auto, Mode.blocked)
    # and an immediate redelivery of a1's event, with a1 already folded into the state
    upto_a1 = [e for e in events if e.ts <= spikes["a1"]]
    eng = engine(COOLDOWN_POLICY, claims=MemoryGuardStore())
    first = (await run(eng, upto_a1))[-1]
    (redo,) = await eng.process(upto_a1[-1:])
    assert first.mode is Mode.auto
    assert redo.decision_id == first.decision_id and redo.mode is Mode.auto
    assert eng.stats.guards == {}


async def test_replay_across_a_later_claim_is_identical() -> None:
    events, _ = cooldown_events()
    # The worker's situation: feature and guard state survive the crash.
    claims, store = MemoryGuardStore(), MemoryFeatureStore()
    live = await run(engine(COOLDOWN_POLICY, claims=claims, store=store), events)
    replayed = await run(engine(COOLDOWN_POLICY, claims=claims, store=store), events)
    assert [(d.decision_id, d.mode) for d in replayed] == [
        (d.decision_id, d.mode) for d in live]


async def test_redelivered_batch_after_state_save_decides_the_same() -> None:
    events, spikes = cooldown_events()
    upto_a2 = [e for e in events if e.ts <= spikes["a2"]]
    store, claims = MemoryFeatureStore(), MemoryGuardStore()
    live = await run(engine(COOLDOWN_POLICY, claims=claims, store=store), upto_a2)
    batch = upto_a2[-5:]  # saved, then the worker died before acknowledging it
    again = await engine(COOLDOWN_POLICY, claims=claims, store=store).process(batch)
    assert [(d.decision_id, d.mode) for d in again] == [
        (d.decision_id, d.mode) for d in live[-5:]]


async def test_shadow_and_zero_cooldown_do_not_claim() -> None:
    claims = MemoryGuardStore()
    text = COOLDOWN_POLICY.replace("cooldown_s: 60", "cooldown_s: 0")
    events, _ = cooldown_events()
    decisions = await run(engine(text, claims=claims), events)
    assert not any(d.mode is Mode.blocked for d in decisions)
    assert claims._claims == {}
    shadow = COOLDOWN_POLICY.replace("cooldown_s: 60", "cooldown_s: 60\n    mode: shadow")
    decisions = await run(engine(shadow, claims=claims), events)
    acted = [d for d in decisions if d.action]
    assert len(acted) == 5 and all(d.mode is Mode.shadow for d in acted)
    assert claims._claims == {}


# --- confidence -----------------------------------------------------------------------------


def test_confidence_of() -> None:
    grown = {"n": 100.0}
    assert confidence_of(0.9, grown) == pytest.approx(0.9)
    assert confidence_of(0.9, {"n": float(WARMUP_SAMPLES)}) == pytest.approx(0.45)
    assert confidence_of(0.9, {"n": 0.0}) == 0.0
    assert confidence_of(0.9, {}) == 0.0
    fp = confidence_of(0.9, {**grown, "false_positives": 3.0})
    assert fp == pytest.approx(0.9 / 4)
    assert confidence_of(0.9, {**grown, "false_positives": 3.0, "true_positives": 3.0}) > fp
    assert confidence_of(1.0, {**grown, "true_positives": 50.0}) == 1.0
    assert 0.0 <= confidence_of(5.0, grown) <= 1.0


async def test_false_positive_feedback_lowers_engine_confidence() -> None:
    text = COOLDOWN_POLICY.replace("min_score: 0.8,", "min_score: 0.8, min_confidence: 0.5,")
    events = normal_stream("svc-a", "latency", 100, seed=11)
    spike = metric("svc-a", "latency", 400.0, events[-1].ts + STEP_MS)
    trusted = await run(engine(text), [*events, spike])
    store = MemoryFeatureStore()
    await store.incr_context("svc-a", "fp", 4)
    doubted = await run(engine(text, store=store), [*events, spike])
    t, d = trusted[-1], doubted[-1]
    assert t.anomaly_score == d.anomaly_score > 0.9
    assert t.confidence > 0.9 and t.mode is Mode.auto
    assert d.confidence == pytest.approx(t.confidence / 5, abs=1e-5)
    assert d.action is None and d.rule_trace[0].reason.startswith("confidence")
    # young series: same z-score, less confidence
    young = await run(engine(text), [*events[:8], metric("svc-a", "latency", 400.0,
                                                          events[7].ts + STEP_MS)])
    assert young[-1].confidence < 0.5 * t.confidence


async def test_extreme_values_do_not_break_decisions() -> None:
    """Finite but huge values must not turn the baseline or the Decision into inf/NaN."""
    events = normal_stream("svc-a", "latency", 40, seed=1)
    t = events[-1].ts
    events += [metric("svc-a", "latency", v, t + (i + 1) * STEP_MS)
               for i, v in enumerate([1e200, -1.7e308, 1.7e308, 100.0, 101.0])]
    eng = engine(COOLDOWN_POLICY)
    decisions = await run(eng, events)
    assert len(decisions) == len(events)
    for d in decisions:
        assert all(math.isfinite(v) for v in d.features.values()), d.features
        Decision.model_validate_json(d.model_dump_json())
    assert decisions[-4].anomaly_score == 1.0
    rec = (await eng.store.load(["svc-a"]))["svc-a"].get_series("latency")
    assert math.isfinite(rec.mean) and math.isfinite(rec.var)
