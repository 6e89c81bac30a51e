"""OTLP metrics -> telemetry events (ia.ingest.otlp, ia.ingest.cumulative): real SDK
exports in both Kafka encodings, and hand-built points for resets, replays and
out-of-order delivery."""

from __future__ import annotations

import json
import time
import uuid

import pytest
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2 as m

from ia.ingest import otlp
from ia.ingest.cumulative import FIRST, NEW, REPLAY, STALE, MemoryCumulativeStore
from ia.ingest.mapping import Refused, Rules
from ia.ingest.translate import Record, Translator
from tests.otlp_producer import OtlpService, kafka_value

S = 1_000_000_000  # nanoseconds per second
T0 = 1_700_000_000 * S
RULES = Rules()


def _kv(**attrs: str) -> list[KeyValue]:
    return [KeyValue(key=k.replace("__", "."), value=AnyValue(string_value=v))
            for k, v in attrs.items()]


def _request(*metrics: m.Metric, service: str | None = "checkout") -> ExportMetricsServiceRequest:
    req = ExportMetricsServiceRequest()
    rm = req.resource_metrics.add()
    if service:
        rm.resource.attributes.extend(_kv(service__name=service, host__name="h1"))
    rm.scope_metrics.add().metrics.extend(metrics)
    return req


def _counter(value: float, t_s: float, start_s: float = 0.0, *, monotonic: bool = True,
             temporality: int = m.AGGREGATION_TEMPORALITY_CUMULATIVE, **attrs: str) -> m.Metric:
    point = m.NumberDataPoint(as_double=value, time_unix_nano=T0 + int(t_s * S),
                              start_time_unix_nano=T0 + int(start_s * S), attributes=_kv(**attrs))
    return m.Metric(name="requests", sum=m.Sum(data_points=[point], is_monotonic=monotonic,
                                                aggregation_temporality=temporality))


def _histogram(count: int, total: float, counts: list[int], t_s: float,
               temporality: int = m.AGGREGATION_TEMPORALITY_CUMULATIVE) -> m.Metric:
    point = m.HistogramDataPoint(count=count, sum=total, bucket_counts=counts,
                                 explicit_bounds=[10.0, 100.0], time_unix_nano=T0 + int(t_s * S),
                                 start_time_unix_nano=T0)
    return m.Metric(name="latency_ms", histogram=m.Histogram(
        data_points=[point], aggregation_temporality=temporality))


async def _events(req: ExportMetricsServiceRequest, store: MemoryCumulativeStore,
                  rules: Rules = RULES) -> list[tuple[str, str, float, int]]:
    out = await otlp.to_events(req, rules, store)
    assert not out.refused, out.refused
    return [(e.entity, e.metric, round(e.value, 6), e.ts) for e in out.events]


# --- real exports of the SDK ---------------------------------------------------------


@pytest.mark.parametrize("encoding", ["otlp_proto", "otlp_json"])
async def test_sdk_exports_become_samples_rates_and_quantiles(encoding: str) -> None:
    svc = OtlpService("checkout", instance="pod-7")
    requests = svc.meter.create_counter("http.requests")
    latency = svc.meter.create_histogram("http.latency", unit="ms")
    queue = svc.meter.create_gauge("queue.depth")
    store = MemoryCumulativeStore()
    requests.add(10, {"route": "/pay"})
    latency.record(3.0)
    queue.set(4)
    first = svc.export()
    time.sleep(0.01)  # event times are milliseconds: the two exports must be apart
    requests.add(30, {"route": "/pay"})
    for v in (3.0, 7.0, 60.0, 60.0):
        latency.record(v)
    queue.set(9)
    second = svc.export()

    before = await _events(otlp.decode(kafka_value(first, encoding), encoding), store)
    after = await _events(otlp.decode(kafka_value(second, encoding), "auto"), store)

    # A first cumulative point has no predecessor: only the gauge is a sample yet.
    assert [(e, metric, v) for e, metric, v, _ in before] == [
        ("checkout", 'queue.depth{service.instance.id="pod-7"}', 4.0)]
    got = {metric: v for _, metric, v, _ in after}
    points = {mt.name: mt for mt in second.resource_metrics[0].scope_metrics[0].metrics}
    t1 = first.resource_metrics[0].scope_metrics[0].metrics[0].sum.data_points[0].time_unix_nano
    t2 = points["http.requests"].sum.data_points[0].time_unix_nano
    assert got['http.requests_rate{route="/pay",service.instance.id="pod-7"}'] == \
        round(30 / ((t2 // 1_000_000 - t1 // 1_000_000) / 1000), 6)
    assert got['queue.depth{service.instance.id="pod-7"}'] == 9.0
    # The second interval's four observations: mean 32.5; buckets (5, 10] and (50, 75].
    assert got['http.latency_mean{service.instance.id="pod-7"}'] == 32.5
    assert 5.0 < got['http.latency_p50{service.instance.id="pod-7"}'] <= 10.0
    assert 50.0 < got['http.latency_p95{service.instance.id="pod-7"}'] <= 75.0
    svc.close()


async def test_both_encodings_give_the_same_events() -> None:
    svc = OtlpService("cart")
    svc.meter.create_up_down_counter("sessions").add(5, {"region": "eu"})
    svc.meter.create_gauge("cpu").set(0.5)
    req = svc.export()
    proto = await _events(otlp.decode(kafka_value(req, "otlp_proto")), MemoryCumulativeStore())
    as_json = await _events(otlp.decode(kafka_value(req, "otlp_json")), MemoryCumulativeStore())
    assert proto == as_json and len(proto) == 2
    # An up-down counter is a level, not a rate.
    assert ("cart", 'sessions{region="eu",service.instance.id="i-1"}', 5.0) in \
        [(e, mt, v) for e, mt, v, _ in proto]
    svc.close()


def test_json_exemplars_with_hex_ids_are_ignored_not_fatal() -> None:
    doc = json.loads(kafka_value(_request(_counter(1, 1)), "otlp_json"))
    point = doc["resourceMetrics"][0]["scopeMetrics"][0]["metrics"][0]["sum"]["dataPoints"][0]
    point["exemplars"] = [{"traceId": "5b8efff798038103d269b633813fc60c", "asDouble": 1.0}]
    req = otlp.decode(json.dumps(doc).encode(), "otlp_json")
    assert req.resource_metrics[0].scope_metrics[0].metrics[0].name == "requests"


# --- counters: reset-aware rates ------------------------------------------------------


async def test_counter_rate_is_the_increase_per_second() -> None:
    store = MemoryCumulativeStore()
    assert await _events(_request(_counter(100, 10)), store) == []
    assert await _events(_request(_counter(160, 40)), store) == [
        ("checkout", "requests_rate", 2.0, 1_700_000_040_000)]


async def test_a_counter_that_went_down_restarted_from_zero() -> None:
    store = MemoryCumulativeStore()
    await _events(_request(_counter(100, 10)), store)
    # Lower than before, same start time: a reset; the increase is the new value.
    assert await _events(_request(_counter(30, 40)), store) == [
        ("checkout", "requests_rate", 1.0, 1_700_000_040_000)]


async def test_a_new_start_time_is_a_restart_measured_from_it() -> None:
    store = MemoryCumulativeStore()
    await _events(_request(_counter(100, 10)), store)
    # The process restarted at t=30 and counted 500 by t=40: 50/s, though 500 > 100.
    assert await _events(_request(_counter(500, 40, start_s=30)), store) == [
        ("checkout", "requests_rate", 50.0, 1_700_000_040_000)]


async def test_a_redelivered_point_gets_the_same_rate_and_event_id() -> None:
    store = MemoryCumulativeStore()
    await otlp.to_events(_request(_counter(100, 10)), RULES, store)
    first = await otlp.to_events(_request(_counter(160, 40)), RULES, store)
    await otlp.to_events(_request(_counter(190, 50)), RULES, store)
    again = await otlp.to_events(_request(_counter(160, 40)), RULES, store)
    assert [e.model_dump() for e in again.events] == [e.model_dump() for e in first.events]


async def test_statuses_of_the_store() -> None:
    store = MemoryCumulativeStore()
    out = otlp.convert(_request(_counter(1, 10), _counter(2, 20)), RULES)
    points = [p.point for p in out.pending]
    assert [s for s, _ in await store.previous(points)] == [FIRST, NEW]
    assert [s for s, _ in await store.previous(points[1:])] == [REPLAY]
    older = otlp.convert(_request(_counter(0.5, 5)), RULES).pending[0].point
    assert [s for s, _ in await store.previous([older])] == [FIRST]  # before every kept point


async def test_points_read_out_of_order_still_get_their_own_delta() -> None:
    """The Collector does not key records by series, so a series' points can arrive in
    another order than written (two partitions): each gets the delta since the point
    before it in time, and a redelivery answers what it answered the first time."""
    store = MemoryCumulativeStore()
    p1, p2, p3 = (otlp.convert(_request(_counter(float(t), 10 * t)), RULES).pending[0].point
                  for t in (1, 2, 3))
    got = await store.previous([p3, p1, p2])
    assert [(s, prev.ts_ms if prev else None) for s, prev in got] == [
        (FIRST, None), (FIRST, None), (NEW, p1.ts_ms)]
    again = await store.previous([p3, p2, p1])
    assert [(s, prev.ts_ms if prev else None) for s, prev in again] == [
        (FIRST, None), (REPLAY, p1.ts_ms), (FIRST, None)]


async def test_series_of_one_entity_are_told_apart_by_their_attributes() -> None:
    store = MemoryCumulativeStore()
    await _events(_request(_counter(1, 10, code="200"), _counter(1, 10, code="500")), store)
    got = await _events(_request(_counter(11, 20, code="200"), _counter(3, 20, code="500")),
                        store)
    assert sorted((mt, v) for _, mt, v, _ in got) == [
        ('requests_rate{code="200"}', 1.0), ('requests_rate{code="500"}', 0.2)]


async def test_delta_counters_need_no_state() -> None:
    delta = _counter(50, 20, start_s=10, temporality=m.AGGREGATION_TEMPORALITY_DELTA)
    assert await _events(_request(delta), MemoryCumulativeStore()) == [
        ("checkout", "requests_rate", 5.0, 1_700_000_020_000)]


# --- histograms --------------------------------------------------------------------------


async def test_cumulative_histograms_give_the_last_intervals_quantiles_and_mean() -> None:
    store = MemoryCumulativeStore()
    await _events(_request(_histogram(10, 50.0, [10, 0, 0], 10)), store)
    # Since then: 10 observations, all in (10, 100], summing 500.
    got = {mt: v for _, mt, v, _ in await _events(
        _request(_histogram(20, 550.0, [10, 10, 0], 20)), store)}
    assert got == {"latency_ms_p50": 55.0, "latency_ms_p95": 95.5, "latency_ms_p99": 99.1,
                   "latency_ms_mean": 50.0}


async def test_chosen_quantiles_and_no_mean() -> None:
    rules = Rules(quantiles=(0.9,), histogram_mean=False)
    delta = _histogram(4, 40.0, [4, 0, 0], 20, temporality=m.AGGREGATION_TEMPORALITY_DELTA)
    assert [(mt, v) for _, mt, v, _ in await _events(_request(delta), MemoryCumulativeStore(),
                                                     rules)] == [("latency_ms_p90", 9.0)]


def test_bucket_quantile_overflow_bucket_is_the_highest_bound() -> None:
    assert otlp.bucket_quantile(0.99, (0, 0, 3), (10.0, 100.0)) == 100.0


# --- refusals ---------------------------------------------------------------------------


def test_garbage_is_undecodable_in_either_encoding() -> None:
    for payload, encoding in ((b"\x0a\xff\xff\xff", "otlp_proto"), (b"{not json", "auto"),
                              (b"[1, 2]", "otlp_json"),
                              (b'{"resourceMetrics": 3}', "otlp_json")):
        with pytest.raises(Refused) as err:
            otlp.decode(payload, encoding)
        assert err.value.reason == "undecodable_otlp"


async def test_points_without_an_entity_are_refused_and_the_rest_kept() -> None:
    out = await otlp.to_events(_request(_counter(1, 1, monotonic=False), service=None), RULES,
                               MemoryCumulativeStore())
    assert out.events == [] and [r.reason for r in out.refused] == ["no_entity"]
    # job works as well as service.name (the default rules)
    out = await otlp.to_events(_request(_counter(1, 1, monotonic=False, job="api"),
                                        service=None), RULES, MemoryCumulativeStore())
    assert [(e.entity, e.metric) for e in out.events] == [("api", "requests")]


async def test_a_nan_gauge_and_a_no_value_point_are_not_samples() -> None:
    nan = m.Metric(name="temp", gauge=m.Gauge(data_points=[
        m.NumberDataPoint(as_double=float("nan"), time_unix_nano=T0),
        m.NumberDataPoint(as_double=1.0, time_unix_nano=T0 + S, flags=1)]))
    out = await otlp.to_events(_request(nan), RULES, MemoryCumulativeStore())
    assert out.events == [] and [r.reason for r in out.refused] == ["not_finite"]


async def test_a_record_with_refused_points_is_a_dead_letter_with_its_reasons() -> None:
    t = Translator(RULES, MemoryCumulativeStore())
    ok = kafka_value(_request(_counter(1, 1, monotonic=False)), "otlp_proto")
    bad = kafka_value(_request(_counter(1, 1, monotonic=False), service=None), "otlp_proto")
    out = await t.otlp([Record(None, ok, "otlp_metrics", 0, 7),
                        Record(None, bad, "otlp_metrics", 1, 8),
                        Record(None, b"\xff\x00", "otlp_metrics", 2, 9)])
    assert [e.entity for e in out.events] == ["checkout"]
    assert [(dl.reason, dl.source_partition, dl.source_offset)
            for _, dl in out.dead_letters] == [("undecodable_otlp", 2, 9), ("no_entity", 1, 8)]
    assert "no_entity x1" in out.dead_letters[1][1].error


async def test_labels_carry_resource_and_point_attributes_within_bounds() -> None:
    many = {f"k{i}": "v" for i in range(100)}
    out = await otlp.to_events(_request(_counter(1, 1, monotonic=False, **many)), RULES,
                               MemoryCumulativeStore())
    ev = out.events[0]
    assert ev.labels["ia.source"] == "otlp" and len(ev.labels) == 64
    assert len(ev.metric) <= 256 and ev.metric.startswith("requests{")


@pytest.mark.integration
async def test_the_redis_store_answers_as_the_memory_store(aredis) -> None:
    """The Lua script and the memory store agree on every status and predecessor: new
    points, points out of order, a redelivered one, a stale one, and a history longer
    than it keeps."""
    from ia.ingest.cumulative import KEEP, RedisCumulativeStore

    prefix = f"t{uuid.uuid4().hex[:8]}"
    redis_store = RedisCumulativeStore(aredis, prefix, ttl_s=60)
    memory = MemoryCumulativeStore()
    points = [otlp.convert(_request(_counter(float(i), 10 + i)), RULES).pending[0].point
              for i in range(KEEP + 3)]
    sequence = [*points[:5], points[3], points[4], points[1], points[7], points[6],
                points[5], points[6], *points[8:], points[0],  # evicted
                points[2], points[-1]]
    got = await redis_store.previous(sequence)
    want = await memory.previous(sequence)
    assert got == want
    assert [s for s, _ in got[:12]] == [FIRST, NEW, NEW, NEW, NEW, REPLAY, REPLAY, REPLAY,
                                        NEW, NEW, NEW, REPLAY]  # 7, 6, 5 out of order
    assert [prev.ts_ms for _, prev in got[8:12]] == [points[4].ts_ms, points[4].ts_ms,
                                                     points[4].ts_ms, points[4].ts_ms]
    assert [s for s, _ in got[-3:]] == [STALE, STALE, REPLAY]
