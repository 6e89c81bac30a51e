"""Features: event-time EWMA series state, point-in-time serving, feature stores.

The series statistics are checked against an independent numpy reference of
the documented recurrence (plain mean/variance of the prefix during warm-up,
event-time exponential weighting after).  The Redis store is exercised on the
real Redis from ``infra`` and must serve exactly what the memory store serves.
"""

from __future__ import annotations

import math
import random
from dataclasses import replace

import numpy as np
import pytest

from ia.bench.features import enrich_batch
from ia.features.enrich import CONTEXT_EVENTS, NEVER_S, context_features
from ia.features.registry import DEFAULT_REGISTRY
from ia.features.series import (
    ABSOLUTE_STD_FLOOR,
    DEFAULT_HALF_LIFE_S,
    RELATIVE_STD_FLOOR,
    WARMUP_SAMPLES,
    SeriesState,
    rebaseline,
    std_of,
)
from ia.features.store import EntityRecord, MemoryFeatureStore, RedisFeatureStore
from ia.schemas.models import EventKind, TelemetryEvent
from tests.reference import features_before, fold, observe

T0 = 1_732_700_000_000


def irregular_series(n: int, seed: int, level: float = 50.0,
                     noise: float = 3.0) -> tuple[np.ndarray, np.ndarray]:
    """Values and strictly increasing ms timestamps with gaps of 0.1 s .. 30 min."""
    rng = np.random.default_rng(seed)
    values = level + rng.normal(0.0, noise, n)
    gaps = rng.choice([100, 1_000, 5_000, 60_000, 300_000, 1_800_000], size=n)
    gaps = gaps + rng.integers(1, 999, n)
    ts = T0 + np.cumsum(gaps)
    return values, ts.astype(np.int64)


def reference_ewma(values: np.ndarray, ts: np.ndarray,
                   half_life_s: float = DEFAULT_HALF_LIFE_S) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance after each sample, straight from the documented recurrence."""
    n = len(values)
    means, variances = np.empty(n), np.empty(n)
    warm = min(n, WARMUP_SAMPLES)
    for k in range(warm):  # warm-up: the plain (population) statistics of the prefix
        means[k] = np.mean(values[: k + 1])
        variances[k] = np.var(values[: k + 1])
    dt_s = np.diff(ts) / 1000.0
    alphas = np.maximum(1.0 - np.power(2.0, -dt_s / half_life_s), 1.0 / (10 * WARMUP_SAMPLES))
    mean, var = means[warm - 1], variances[warm - 1]
    for k in range(warm, n):
        a = alphas[k - 1]
        d = values[k] - mean
        mean = mean + a * d
        var = (1.0 - a) * (var + a * d * d)
        means[k], variances[k] = mean, var
    return means, variances


def fold_all(values, ts, state: SeriesState | None = None) -> SeriesState:
    s = state or SeriesState()
    for v, t in zip(values, ts, strict=True):
        _, s = observe(s, float(v), int(t))
    return s


# --- series statistics -------------------------------------------------------------------


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_ewma_matches_numpy_reference(seed: int) -> None:
    values, ts = irregular_series(300, seed)
    ref_mean, ref_var = reference_ewma(values, ts)
    s = SeriesState()
    for k, (v, t) in enumerate(zip(values, ts, strict=True)):
        _, s = observe(s, float(v), int(t))
        assert s.n == k + 1
        assert s.mean == pytest.approx(ref_mean[k], rel=1e-9, abs=1e-9)
        assert s.var == pytest.approx(ref_var[k], rel=1e-9, abs=1e-9)
    assert s.late == 0
    # the warm-up really is the plain running mean/variance
    warm = fold_all(values[:WARMUP_SAMPLES], ts[:WARMUP_SAMPLES])
    assert warm.mean == pytest.approx(float(np.mean(values[:WARMUP_SAMPLES])), rel=1e-12)
    assert warm.var == pytest.approx(float(np.var(values[:WARMUP_SAMPLES])), rel=1e-9)


def test_event_time_alpha_depends_on_gap_not_on_sample_count() -> None:
    """After warm-up, one sample after a half-life moves the mean half way."""
    s = fold_all([10.0] * WARMUP_SAMPLES, [T0 + i * 1000 for i in range(WARMUP_SAMPLES)])
    one_half_life = s.last_ts + int(DEFAULT_HALF_LIFE_S * 1000)
    after = fold(s, 20.0, one_half_life)
    assert after.mean == pytest.approx(15.0)
    # a tiny gap is floored at alpha = 1 / (10 * WARMUP_SAMPLES), not zero
    quick = fold(s, 20.0, s.last_ts + 1)
    assert quick.mean == pytest.approx(10.0 + 10.0 / (10 * WARMUP_SAMPLES))


def test_std_floor() -> None:
    flat = fold_all([200.0] * 30, [T0 + i * 1000 for i in range(30)])
    assert flat.var == pytest.approx(0.0, abs=1e-12)
    assert std_of(flat) == pytest.approx(200.0 * RELATIVE_STD_FLOOR)
    assert std_of(SeriesState(n=5, mean=0.0, var=0.0)) == ABSOLUTE_STD_FLOOR
    feats = features_before(flat, 204.0, flat.last_ts + 1000)
    assert feats["zscore"] == pytest.approx(2.0)


def test_served_features_are_point_in_time() -> None:
    """Features served for event k depend only on events[:k]."""
    values, ts = irregular_series(120, seed=7)
    served = []
    s = SeriesState()
    for v, t in zip(values, ts, strict=True):
        f, s = observe(s, float(v), int(t))
        served.append(f)
    for k in [0, 1, 2, 5, 19, 20, 21, 40, 77, 119]:
        prefix = fold_all(values[:k], ts[:k])
        expected = features_before(prefix, float(values[k]), int(ts[k]))
        assert served[k] == expected
        if k:
            dt = (ts[k] - ts[k - 1]) / 1000.0
            assert served[k]["seconds_since_last"] == pytest.approx(dt)
            assert served[k]["rate_of_change"] == pytest.approx((values[k] - values[k - 1]) / dt)
            assert served[k]["n"] == k
            assert served[k]["zscore"] == pytest.approx(
                (values[k] - prefix.mean) / std_of(prefix))
    # the first sample has no baseline: neutral features
    assert served[0]["zscore"] == 0.0 and served[0]["n"] == 0.0


async def test_enrich_batch_is_point_in_time() -> None:
    """The same holds through enrich_batch, across entities and batch boundaries."""
    events = mixed_events(seed=11, n=90)
    full = MemoryFeatureStore()
    served = []
    for batch in batches(events, seed=11):
        served.extend(await enrich_batch(batch, full))
    for k in [0, 3, 17, 40, 63, 89]:
        prefix_store = MemoryFeatureStore()
        if k:
            await enrich_batch(events[:k], prefix_store)
        (alone,) = await enrich_batch([events[k]], prefix_store)
        assert alone == served[k], k


def test_late_and_duplicate_events_are_not_folded() -> None:
    values, ts = irregular_series(60, seed=5)
    in_order = fold_all(values, ts)
    rng = random.Random(5)
    s, injected = SeriesState(), 0
    for v, t in zip(values, ts, strict=True):
        _, s = observe(s, float(v), int(t))
        if s.n > 1 and rng.random() < 0.3:
            # an exact duplicate, or an older sample arriving late with a wild value
            late_ts = s.last_ts if rng.random() < 0.5 else s.last_ts - rng.randint(1, 10_000)
            feats, s2 = observe(s, 1e6, late_ts)
            assert s2.late == s.late + 1
            assert replace(s2, late=s.late) == s  # nothing else moved
            assert feats["value"] == 1e6
            s, injected = s2, injected + 1
    assert injected > 5
    assert s == replace(in_order, late=injected)


def test_replaying_a_sequence_is_idempotent() -> None:
    values, ts = irregular_series(80, seed=9)
    once = fold_all(values, ts)
    twice = fold_all(values, ts, once)
    assert twice == replace(once, late=len(values))
    assert (twice.n, twice.mean, twice.var, twice.last_value, twice.last_ts) == (
        once.n, once.mean, once.var, once.last_value, once.last_ts)


def test_series_state_view_round_trips_through_the_stored_blob() -> None:
    """get_series/put_series see the EWMA part of the packed series state."""
    rng = random.Random(3)
    states = [SeriesState(), fold_all(*irregular_series(50, seed=3))]
    states += [SeriesState(n=rng.randint(0, 2**32 - 1), mean=rng.uniform(-1e12, 1e12),
                           var=rng.uniform(0, 1e20), last_value=rng.uniform(-1e9, 1e9),
                           last_ts=rng.randint(-1, 2**62), late=rng.randint(0, 2**31),
                           dropped=rng.randint(0, 2**31))
               for _ in range(50)]
    for s in states:
        rec = EntityRecord()
        rec.put_series("cpu", s)
        blob = rec.changes()[b"s1:cpu"]
        assert len(blob) == DEFAULT_REGISTRY.plan("cpu").size
        assert EntityRecord.from_items([(b"s1:cpu", blob)]).get_series("cpu") == s
    assert EntityRecord().get_series("nothing") == SeriesState()


def test_rebaseline_keeps_level_and_forgets_history() -> None:
    values, ts = irregular_series(100, seed=4)
    s = fold_all(values, ts)
    _, s = observe(s, 500.0, int(ts[-1]) + 1000)  # the new level
    r = rebaseline(s)
    assert (r.n, r.mean, r.var) == (1, 500.0, 0.0)
    assert (r.last_value, r.last_ts, r.late) == (s.last_value, s.last_ts, s.late)
    # warm-up restarts: the next sample is averaged with the single remembered one
    nxt = fold(r, 502.0, r.last_ts + 1000)
    assert nxt.mean == pytest.approx(501.0)
    assert nxt.var == pytest.approx(1.0)
    # and a sample at the new level no longer stands out
    assert abs(features_before(r, 501.0, r.last_ts + 1000)["zscore"]) < 1.0


# --- stores and enrichment -----------------------------------------------------------------


def ev(entity: str, metric: str, value: float, ts: int,
       kind: EventKind = EventKind.metric) -> TelemetryEvent:
    return TelemetryEvent(entity=entity, metric=metric, value=value, ts=ts, kind=kind)


def mixed_events(seed: int, n: int) -> list[TelemetryEvent]:
    """Metrics of three entities, deploys, a late sample and a duplicate."""
    rng = random.Random(seed)
    out, t = [], T0
    for i in range(n):
        t += rng.randint(500, 40_000)
        entity = rng.choice(["svc-a", "svc-b", "db-1"])
        if i % 23 == 5:
            out.append(ev(entity, "deploy", 1.0, t, EventKind.event))
        elif i % 31 == 9:
            out.append(ev(entity, "restart", 1.0, t, EventKind.event))
        else:
            metric = rng.choice(["cpu", "latency"])
            out.append(ev(entity, metric, rng.gauss(100 if metric == "latency" else 40, 5), t))
    out.insert(n // 2, ev("svc-a", "cpu", 999.0, T0 + 1))  # very late
    out.append(out[-3].model_copy())  # redelivered duplicate
    return out


def batches(events: list, seed: int) -> list[list]:
    rng = random.Random(seed)
    out, i = [], 0
    while i < len(events):
        size = rng.randint(1, 12)
        out.append(events[i:i + size])
        i += size
    return out


class CountingPipeline:
    """Forwards to a real redis pipeline, counting executions and queued commands."""

    def __init__(self, owner: CountingClient, pipe) -> None:
        self._owner, self._pipe = owner, pipe

    async def __aenter__(self) -> CountingPipeline:
        await self._pipe.__aenter__()
        return self

    async def __aexit__(self, *exc):
        return await self._pipe.__aexit__(*exc)

    def __getattr__(self, name: str):
        return getattr(self._pipe, name)

    async def execute(self, *args, **kwargs):
        self._owner.executions += 1
        self._owner.queued.append(len(self._pipe.command_stack))
        return await self._pipe.execute(*args, **kwargs)


class CountingClient:
    """Forwards everything to a real redis.asyncio client; counts round trips."""

    def __init__(self, client) -> None:
        self._client = client
        self.executions = 0
        self.direct_calls = 0
        self.queued: list[int] = []
        self.calls: list[tuple[str, tuple]] = []

    def pipeline(self, *args, **kwargs) -> CountingPipeline:
        return CountingPipeline(self, self._client.pipeline(*args, **kwargs))

    def __getattr__(self, name: str):
        attr = getattr(self._client, name)
        if not callable(attr):
            return attr

        def call(*args, **kwargs):
            self.direct_calls += 1
            self.calls.append((name, args))
            return attr(*args, **kwargs)

        return call

    def reset(self) -> None:
        self.executions, self.direct_calls, self.queued, self.calls = 0, 0, [], []


def test_context_features_from_deploy_events() -> None:
    rec = EntityRecord()
    assert context_features(rec, T0)["seconds_since_deploy"] == NEVER_S
    rec.put_context("event:deploy", str(T0))
    feats = context_features(rec, T0 + 90_000)
    assert feats["seconds_since_deploy"] == 90.0
    # a deploy recorded in the future of this event is not visible to it
    assert context_features(rec, T0 - 1)["seconds_since_deploy"] == NEVER_S
    assert set(CONTEXT_EVENTS) >= {"deploy"}


async def test_memory_store_deploy_context_and_late_deploy() -> None:
    store = MemoryFeatureStore()
    evs = [ev("svc-a", "cpu", 40.0, T0), ev("svc-a", "deploy", 1.0, T0 + 10_000, EventKind.event),
           ev("svc-a", "cpu", 41.0, T0 + 70_000),
           ev("svc-a", "deploy", 1.0, T0 + 5_000, EventKind.event),  # late: older than 10 s
           ev("svc-a", "cpu", 42.0, T0 + 130_000), ev("svc-b", "cpu", 42.0, T0 + 130_000)]
    feats = await enrich_batch(evs[:3], store)
    feats += await enrich_batch(evs[3:], store)
    assert feats[0]["seconds_since_deploy"] == NEVER_S
    assert feats[1]["seconds_since_deploy"] == 0.0
    assert feats[2]["seconds_since_deploy"] == 60.0
    assert feats[4]["seconds_since_deploy"] == 120.0
    assert feats[5]["seconds_since_deploy"] == NEVER_S  # other entity
    assert "zscore" not in feats[1]  # a discrete event has no series features
    recs = await store.load(["svc-a"])
    # the late deploy is kept too (newest first), for late samples that need it
    assert recs["svc-a"].context["event:deploy"] == f"{T0 + 10_000},{T0 + 5_000}"
    assert recs["svc-a"].get_series("cpu").n == 3


@pytest.mark.integration
async def test_redis_and_memory_stores_serve_identical_features(aredis, topic_prefix) -> None:
    events = mixed_events(seed=21, n=150)
    positions = [(0, offset) for offset in range(len(events))]
    mem = MemoryFeatureStore()
    counting = CountingClient(aredis)
    red = RedisFeatureStore(counting, prefix=topic_prefix)
    await red.load_scripts()
    mem_feats, red_feats = [], []
    start = 0
    for batch in batches(events, seed=21):
        where = positions[start:start + len(batch)]
        start += len(batch)
        mem_feats.extend(await enrich_batch(batch, mem, where))
        counting.reset()
        red_feats.extend(await enrich_batch(batch, red, where))
        # one round trip (one script call) to read the batch's entities, one to write
        assert [name for name, _ in counting.calls] == ["evalsha", "evalsha"]
        assert counting.executions == 0
        assert counting.calls[0][1][1] == len({e.entity for e in batch})  # numkeys
    assert red_feats == mem_feats
    assert any(f.get("seconds_since_deploy", NEVER_S) < NEVER_S for f in red_feats)
    assert any(f.get("seconds_since_restart", NEVER_S) < NEVER_S for f in red_feats)
    entities = ["svc-a", "svc-b", "db-1"]
    for e in entities:  # the very same bytes in both stores
        assert await aredis.hgetall(red.keys.entity(e)) == mem.raw(e)
    red_recs = await red.load(entities)
    assert red_recs["svc-a"].get_series("cpu").dropped >= 1  # the very late sample, counted

    # a redelivered stretch (same partition and offsets) is served, not folded again
    before = {e: mem.raw(e) for e in entities}
    again = await enrich_batch(events[:30], mem, positions[:30])
    await enrich_batch(events[:30], red, positions[:30])
    for e in entities:
        assert mem.raw(e) == before[e]
        assert await aredis.hgetall(red.keys.entity(e)) == before[e]
    assert len(again) == 30


@pytest.mark.integration
async def test_redis_store_round_trips_and_ttl(aredis, topic_prefix) -> None:
    counting = CountingClient(aredis)
    store = RedisFeatureStore(counting, prefix=topic_prefix, ttl_s=1000)
    await store.load_scripts()
    counting.reset()
    entities = [f"e{i}" for i in range(7)]
    recs = await store.load(entities + entities)
    assert [(n, args[1]) for n, args in counting.calls] == [("evalsha", 7)]
    for i, e in enumerate(entities):
        recs[e].put_series("cpu", fold(SeriesState(), float(i), T0))
        recs[e].put_context("note", f"x{i}")
    counting.reset()
    await store.save(recs)
    # one atomic script call writes every entity (HSET + EXPIRE each, server side)
    assert [(n, args[1]) for n, args in counting.calls] == [("evalsha", 7)]
    assert counting.executions == 0
    assert all(not r.dirty() for r in recs.values())
    counting.reset()
    await store.save(recs)  # nothing dirty: no round trip at all
    assert counting.direct_calls == 0
    for e in entities:
        ttl = await aredis.ttl(store.keys.entity(e))
        assert 990 <= ttl <= 1000
    assert store.keys.entity("e0") == f"{topic_prefix}:f:v1:e0"
    raw = await aredis.hgetall(store.keys.entity("e3"))
    assert EntityRecord.from_hash(raw).get_series("cpu").mean == 3.0
    assert raw[b"c:note"] == b"x3"


async def check_context_counters(store, aredis=None) -> None:
    await store.incr_context("svc-x", "fp")
    await store.incr_context("svc-x", "fp", 2)
    await store.incr_context("svc-x", "tp")
    await store.set_context("svc-x", {"event:deploy": str(T0), "owner": "team-a"})
    # an owner's batch writing series state does not clobber the counters
    (f0,) = await enrich_batch([ev("svc-x", "cpu", 10.0, T0 + 30_000)], store)
    await store.incr_context("svc-x", "failed", 4)
    (f1,) = await enrich_batch([ev("svc-x", "cpu", 11.0, T0 + 60_000)], store)
    assert f0["false_positives"] == 3.0 and f0["true_positives"] == 1.0
    assert f0["seconds_since_deploy"] == 30.0
    assert f1["actions_failed"] == 4.0 and f1["n"] == 1.0
    rec = (await store.load(["svc-x"]))["svc-x"]
    assert rec.context["owner"] == "team-a"
    assert rec.context["fp"] == "3"
    if aredis is not None:
        assert 490 <= await aredis.ttl(store.keys.entity("svc-x")) <= 500
        await store.incr_context("fresh", "fp")  # a brand-new key gets a TTL too
        assert 490 <= await aredis.ttl(store.keys.entity("fresh")) <= 500
        await store.set_context("fresh2", {"a": "b"})
        assert 490 <= await aredis.ttl(store.keys.entity("fresh2")) <= 500


async def test_incr_and_set_context_memory() -> None:
    await check_context_counters(MemoryFeatureStore())


@pytest.mark.integration
async def test_incr_and_set_context_redis(aredis, topic_prefix) -> None:
    await check_context_counters(RedisFeatureStore(aredis, prefix=topic_prefix, ttl_s=500),
                                 aredis)


def test_overflowing_sample_keeps_the_baseline_finite() -> None:
    """A finite but enormous value must not leave inf/NaN in the state for good."""
    values, ts = irregular_series(40, seed=8)
    s = fold_all(values, ts)
    t = int(ts[-1])
    for i, huge in enumerate([1e200, -1.7e308, 1.7e308]):
        feats, s2 = observe(s, huge, t + (i + 1) * 1000)
        assert all(math.isfinite(v) for v in feats.values()), feats
        assert abs(feats["zscore"]) > 1e100
        assert math.isfinite(s2.mean) and math.isfinite(s2.var)
        assert s2.n == s.n + 1 and s2.last_value == huge
        s = s2
    feats, s = observe(s, 50.0, t + 10_000)
    assert all(math.isfinite(v) for v in feats.values())
    assert math.isfinite(std_of(s)) and std_of(s) < 1e6
