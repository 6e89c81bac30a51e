"""Prometheus remote write, Alertmanager webhooks and CloudEvents -> telemetry events,
and ``ia receive``'s HTTP contract (tokens, 503, limits, de-duplication) on an
in-memory sink: no broker needed."""

from __future__ import annotations

import datetime as dt
import json
import re
import struct
from contextlib import asynccontextmanager
from pathlib import Path

import cramjam
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.v1.event import CloudEvent

from ia.core.errors import ConfigError
from ia.ingest import alertmanager, cloudevents, remote_write
from ia.ingest.mapping import INGEST_REASONS, Refused, Rules
from ia.ingest.prompb_pb2 import WriteRequest
from ia.ingest.receiver import MemorySeenAlerts, Unavailable, build_receiver
from ia.schemas.models import EventKind, TelemetryEvent

RULES = Rules()
TOKEN = "s3cret-token-of-the-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
T0 = 1_700_000_000_000


def write_request(*series: tuple[dict[str, str], list[tuple[float, int]]]) -> WriteRequest:
    req = WriteRequest()
    for labels, samples in series:
        ts = req.timeseries.add()
        for name, value in sorted(labels.items()):
            ts.labels.add(name=name, value=value)
        for value, t in samples:
            ts.samples.add(value=value, timestamp=t)
    return req


def snappy(req: WriteRequest) -> bytes:
    return bytes(cramjam.snappy.compress_raw(req.SerializeToString()))


# --- remote write ---------------------------------------------------------------------


def test_each_sample_is_an_event_named_by_its_labels() -> None:
    body = snappy(write_request(
        ({"__name__": "http_requests", "job": "api", "instance": "h:80", "code": "500"},
         [(3.0, T0), (4.0, T0 + 15_000)]),
        ({"__name__": "up", "job": "db", "instance": "d:5432"}, [(1.0, T0)])))
    out = remote_write.convert(remote_write.decode(body, 1 << 20), RULES, 100)
    assert [(e.entity, e.metric, e.value, e.ts) for e in out.events] == [
        ("api", 'http_requests{code="500",instance="h:80"}', 3.0, T0),
        ("api", 'http_requests{code="500",instance="h:80"}', 4.0, T0 + 15_000),
        ("db", 'up{instance="d:5432"}', 1.0, T0)]
    assert out.events[0].labels == {"ia.source": "prometheus", "__name__": "http_requests",
                                    "code": "500", "instance": "h:80", "job": "api"}
    # The id is derived from the sample: a retried request gives the same events.
    again = remote_write.convert(remote_write.decode(body, 1 << 20), RULES, 100)
    assert [e.event_id for e in again.events] == [e.event_id for e in out.events]


def test_stale_markers_are_skipped_and_unmappable_series_refused() -> None:
    stale = struct.unpack("<d", struct.pack("<Q", 0x7FF0000000000002))[0]  # a stale marker
    body = snappy(write_request(({"__name__": "up", "job": "api"}, [(stale, T0), (1.0, T0)]),
                                ({"__name__": "up", "zone": "a"}, [(1.0, T0)])))
    out = remote_write.convert(remote_write.decode(body, 1 << 20), RULES, 100)
    assert (len(out.events), out.skipped) == (1, 1)
    assert [r.reason for r in out.refused] == ["no_entity"]


def test_bodies_too_large_are_refused_before_decompressing() -> None:
    big = snappy(write_request(({"__name__": "x" * 5000, "job": "a"}, [(1.0, T0)])))
    with pytest.raises(remote_write.TooLarge):
        remote_write.decode(big, 4096)
    many = write_request(({"__name__": "up", "job": "a"}, [(1.0, T0 + i) for i in range(11)]))
    with pytest.raises(remote_write.TooLarge):
        remote_write.convert(many, RULES, 10)
    for garbage in (b"", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", b"\x05abc",
                    bytes(cramjam.snappy.compress_raw(b"\xff\xfe not protobuf"))):
        with pytest.raises((Refused, remote_write.TooLarge)) as err:
            remote_write.decode(garbage, 1 << 20)
        if isinstance(err.value, Refused):
            assert err.value.reason == "undecodable_remote_write"


# --- Alertmanager -----------------------------------------------------------------------


def notification(status: str = "firing", ends: str = "0001-01-01T00:00:00Z") -> dict:
    return {"version": "4", "status": status, "receiver": "ia", "groupKey": "{}:{}",
            "alerts": [{"status": status, "fingerprint": "a1b2c3d4e5f60708",
                        "labels": {"alertname": "HighLatency", "job": "api",
                                   "severity": "page"},
                        "annotations": {"summary": "p99 over 1 s"},
                        "startsAt": "2023-11-14T22:13:20.123456789Z", "endsAt": ends,
                        "generatorURL": "http://prom/graph"}]}


def test_firing_and_resolved_alerts_are_events_with_everything() -> None:
    firing = alertmanager.convert(notification(), RULES).alerts[0][1]
    resolved = alertmanager.convert(notification("resolved", "2023-11-14T22:15:00Z"),
                                    RULES).alerts[0][1]
    assert (firing.entity, firing.metric, firing.value, firing.kind) == (
        "api", "alert:HighLatency", 1.0, EventKind.event)
    assert firing.ts == 1_700_000_000_123 and resolved.ts == 1_700_000_100_000
    assert resolved.value == 0.0 and resolved.event_id != firing.event_id
    assert firing.labels["annotation.summary"] == "p99 over 1 s"
    assert firing.labels["alert.fingerprint"] == "a1b2c3d4e5f60708"
    assert firing.labels["severity"] == "page" and firing.labels["alert.status"] == "firing"
    assert resolved.labels["alert.ends_at"] == "2023-11-14T22:15:00Z"


def test_bad_webhooks_are_refused() -> None:
    for body in (b"nope", b"[]", b'{"version": "3", "alerts": []}', b'{"alerts": 1}'):
        with pytest.raises(Refused):
            alertmanager.decode(body)
    doc = notification()
    doc["alerts"].append({"status": "pending"})
    out = alertmanager.convert(doc, RULES)
    assert len(out.alerts) == 1 and [r.reason for r in out.refused] == [
        "undecodable_alertmanager"]


# --- CloudEvents ------------------------------------------------------------------------


def _deploy(**attrs: object) -> CloudEvent:
    base = {"id": "run-42", "source": "https://ci.example/pipelines", "specversion": "1.0",
            "type": "dev.cdevents.service.deployed.0.2.0", "subject": "checkout",
            "time": dt.datetime(2023, 11, 14, 22, 13, 20, tzinfo=dt.UTC),
            "datacontenttype": "application/json", **attrs}
    return CloudEvent({k: v for k, v in base.items() if v is not None},
                      {"version": "1.4.2", "replicas": 3})


@pytest.mark.parametrize("mode", ["binary", "structured"])
def test_a_deploy_in_either_mode_is_a_deploy_event(mode: str) -> None:
    msg = (ce_kafka.to_binary_event if mode == "binary" else ce_kafka.to_structured_event)(
        _deploy())
    ev = cloudevents.convert(msg.headers, msg.key, msg.value, None, RULES)
    assert (ev.entity, ev.metric, ev.kind, ev.ts) == ("checkout", "deploy", EventKind.event,
                                                      T0)
    assert ev.labels["data.version"] == "1.4.2" and ev.labels["ce.id"] == "run-42"
    assert ev.event_id.startswith("ce-")


def test_structured_mode_without_headers_and_entity_from_the_data() -> None:
    msg = ce_kafka.to_structured_event(_deploy(subject=None, type="com.acme.config.changed"))
    value = json.loads(msg.value)
    value["data"]["service.name"] = "cart"
    ev = cloudevents.convert(None, None, json.dumps(value).encode(), None, RULES)
    assert (ev.entity, ev.metric) == ("cart", "config_change")


def test_extensions_name_the_event_and_entity_and_record_time_fills_in() -> None:
    msg = ce_kafka.to_binary_event(_deploy(iaevent="scale", iaentity="web-3"))
    headers = {k: v for k, v in msg.headers.items() if k != "ce_time"}
    ev = cloudevents.convert(headers, None, msg.value, T0 + 5, RULES)
    assert (ev.entity, ev.metric, ev.ts) == ("web-3", "scale", T0 + 5)


def test_not_cloudevents_are_refused() -> None:
    no_id = {k: v for k, v in ce_kafka.to_binary_event(_deploy()).headers.items()
             if k != "ce_id"}
    for headers, value in (({}, b"\xff"), ({}, b"[1]"), ({}, b'{"id": "1"}'),
                           ({"ce_id": b"1"}, b"{}"), (no_id, b"{}")):
        with pytest.raises(Refused) as err:
            cloudevents.convert(headers, None, value, T0, RULES)
        assert err.value.reason == "undecodable_cloudevent"
    msg = ce_kafka.to_binary_event(_deploy(subject=None))
    with pytest.raises(Refused, match="no_entity"):
        cloudevents.convert(msg.headers, None, msg.value, T0, RULES)


# --- ia receive, on an in-memory sink -----------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.records: list[TelemetryEvent] = []
        self.down = False

    async def send(self, records) -> None:  # type: ignore[no-untyped-def]
        if self.down:
            raise Unavailable("broker down")
        for key, value in records:
            ev = TelemetryEvent.model_validate_json(value)
            assert key == ev.entity.encode()
            self.records.append(ev)


@asynccontextmanager
async def receiver(sink: Sink, **kw: int):  # type: ignore[no-untyped-def]
    app = build_receiver(sink, MemorySeenAlerts(), {TOKEN: "tests"}, RULES, **kw)
    async with TestClient(TestServer(app)) as client:
        yield client


async def test_every_post_needs_a_token() -> None:
    sink = Sink()
    async with receiver(sink) as client:
        for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                        {"Authorization": f"Basic {TOKEN}"}):
            for path in ("/api/v1/write", "/alertmanager"):
                resp = await client.post(path, data=b"x", headers=headers)
                assert resp.status == 401
        assert (await client.get("/healthz")).status == 200
    assert sink.records == []
    with pytest.raises(ConfigError):
        build_receiver(sink, MemorySeenAlerts(), {}, RULES)


async def test_remote_write_is_204_once_sent_and_503_while_the_broker_is_away() -> None:
    sink = Sink()
    body = snappy(write_request(({"__name__": "up", "job": "api"}, [(1.0, T0)])))
    headers = {**AUTH, "Content-Encoding": "snappy", "Content-Type": "application/x-protobuf"}
    async with receiver(sink) as client:
        sink.down = True
        assert (await client.post("/api/v1/write", data=body, headers=headers)).status == 503
        sink.down = False
        assert (await client.post("/api/v1/write", data=body, headers=headers)).status == 204
        bad = await client.post("/api/v1/write", data=b"\x03abc", headers=headers)
        assert bad.status == 400 and "undecodable_remote_write" in (await bad.json())["refused"]
    assert [(e.entity, e.metric) for e in sink.records] == [("api", "up")]


async def test_request_bounds_give_413() -> None:
    sink = Sink()
    many = snappy(write_request(({"__name__": "up", "job": "a"},
                                 [(1.0, T0 + i) for i in range(20)])))
    async with receiver(sink, max_bytes=2048, max_samples=10) as client:
        assert (await client.post("/api/v1/write", data=many, headers=AUTH)).status == 413
        big = await client.post("/alertmanager", data=b" " * 4096, headers=AUTH)
        assert big.status == 413
    assert sink.records == []


async def test_alerts_are_sent_once_per_fingerprint_and_status() -> None:
    sink = Sink()
    async with receiver(sink) as client:
        for doc in (notification(), notification(),
                    notification("resolved", "2023-11-14T22:15:00Z"),
                    notification("resolved", "2023-11-14T22:15:00Z")):
            resp = await client.post("/alertmanager", json=doc, headers=AUTH)
            assert resp.status == 200
        # A new alert while the broker is away: 503, and not remembered as sent, so
        # Alertmanager's retry gets it through.
        other = notification()
        other["alerts"][0]["fingerprint"] = "ffff0000ffff0000"
        sink.down = True
        assert (await client.post("/alertmanager", json=other, headers=AUTH)).status == 503
        sink.down = False
        assert (await client.post("/alertmanager", json=other, headers=AUTH)).status == 200
    assert [(e.value, e.labels["alert.fingerprint"]) for e in sink.records] == [
        (1.0, "a1b2c3d4e5f60708"), (0.0, "a1b2c3d4e5f60708"), (1.0, "ffff0000ffff0000")]


def test_every_ingest_reason_is_documented_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = readme.split("## Inputs: OpenTelemetry", 1)[1].split("\n## ", 1)[0]
    table = section.split("| reason | the record, point, sample or alert |", 1)[1]
    assert set(INGEST_REASONS) <= set(re.findall(r"^\| `([a-z_]+)` \|", table, re.M))


async def test_a_receiver_whose_broker_is_unreachable_answers_503() -> None:
    """The real Kafka sink, pointed at a closed port: the request waits for the delivery
    deadline, then gets 503 (and nothing is delivered late: the records expired)."""
    from ia.core.settings import KafkaSettings
    from ia.ingest.receiver import KafkaSink
    from ia.runtime.embedded import free_port

    sink = KafkaSink(KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"),
                     "t.telemetry", timeout_s=1.0)
    body = snappy(write_request(({"__name__": "up", "job": "api"}, [(1.0, T0)])))
    try:
        app = build_receiver(sink, MemorySeenAlerts(), {TOKEN: "tests"}, RULES)
        async with TestClient(TestServer(app)) as client:
            resp = await client.post("/api/v1/write", data=body, headers=AUTH)
            assert resp.status == 503
            assert "retry" in (await resp.json())["error"]
    finally:
        sink.close()


def test_the_rules_come_from_the_settings() -> None:
    from ia.core.settings import Settings

    s = Settings(_env={"IA_INGEST_ENTITY_LABELS": "team, app", "IA_INGEST_QUANTILES": "0.9",
                       "IA_INGEST_IGNORE_LABELS": "pod", "IA_INGEST_HISTOGRAM_MEAN": "false"})
    rules = Rules.of(s.ingest)
    assert rules == Rules(entity_labels=("team", "app"), quantiles=(0.9,),
                          ignore_labels=frozenset({"pod"}), histogram_mean=False)
    body = snappy(write_request(({"__name__": "up", "app": "web", "pod": "p-1"}, [(1.0, T0)])))
    out = remote_write.convert(remote_write.decode(body, 1 << 20), rules, 10)
    assert [(e.entity, e.metric, e.labels["pod"]) for e in out.events] == [("web", "up", "p-1")]
    with pytest.raises(ValueError, match="quantiles"):
        Settings(_env={"IA_INGEST_QUANTILES": "1.5"})


def test_cloudevent_records_that_are_none_are_dead_letters() -> None:
    from ia.ingest.cumulative import MemoryCumulativeStore
    from ia.ingest.translate import Record, Translator

    good = ce_kafka.to_binary_event(_deploy())
    out = Translator(RULES, MemoryCumulativeStore()).cloudevents([
        Record(b"checkout", good.value, "ia.cloudevents", 0, 1, good.headers, T0),
        Record(b"k", b"\xff", "ia.cloudevents", 0, 2, [], T0)])
    assert [e.metric for e in out.events] == ["deploy"]
    assert [(k, dl.reason, dl.source_offset) for k, dl in out.dead_letters] == [
        (b"k", "undecodable_cloudevent", 2)]
