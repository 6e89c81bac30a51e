"""``ia ingest``: the OTLP metrics topic and the CloudEvents topic -> telemetry events.

Plumbing only (:class:`ia.ingest.translate.Translator` does the work): a consumer
group of its own (``IA_INGEST_APP_ID``) reads ``IA_INGEST_OTLP_TOPIC`` (default
``otlp_metrics``, where the OpenTelemetry Collector's Kafka exporter writes) and the
CloudEvents topic; each batch's events go onto the telemetry topic keyed by entity
(so each entity keeps one partition and its order, as the worker requires), its dead
letters onto the DLQ, and the batch is acknowledged only after the broker confirmed
all of them.  A crash replays the batch; the events come out the same (event ids are
derived from their content, cumulative deltas from the points kept in Redis), so
their decisions keep their ids.
"""

from __future__ import annotations

import logging

import faust

from ia.core import metrics
from ia.core.redis import client as redis_client
from ia.core.settings import Settings
from ia.ingest.cumulative import RedisCumulativeStore
from ia.ingest.mapping import Rules
from ia.ingest.translate import Record, Translated, Translator
from ia.schemas.serde import encode
from ia.streams.app import confirm, make_app, raw_topic, send_batched, with_retry

log = logging.getLogger("ia.ingest")


def ingest_topics(settings: Settings) -> list[str]:
    """The topics ``ia ingest`` reads (created if missing, as a collector expects)."""
    return [settings.ingest.otlp_topic, cloudevents_topic(settings)]


def cloudevents_topic(settings: Settings) -> str:
    return settings.ingest.cloudevents_topic or settings.topics.cloudevents


def _record(ev) -> Record:  # type: ignore[no-untyped-def]
    m = ev.message
    ts = int(m.timestamp * 1000) if m.timestamp else None
    return Record(m.key, m.value, m.topic, m.partition, m.offset, m.headers, ts)


def build_ingest(settings: Settings) -> faust.App:
    app = make_app(settings, settings.ingest.app_id)
    topics = settings.topics
    otlp_t = raw_topic(app, settings.ingest.otlp_topic)
    ce_t = raw_topic(app, cloudevents_topic(settings))
    fmt = settings.wire_format
    settings.require_endpoints()
    client = redis_client(settings.redis)
    translator = Translator(Rules.of(settings.ingest),
                            RedisCumulativeStore(client, settings.redis.prefix,
                                                 settings.ingest.rate_ttl_s),
                            settings.ingest.otlp_encoding)
    metrics.serve(settings.metrics_port, settings.metrics_host, role="ingest")

    async def publish(out: Translated, input_: str) -> None:
        futures = await send_batched(app, topics.dlq,
                                     [(k, encode(dl, "json")) for k, dl in out.dead_letters])
        futures += await send_batched(app, topics.telemetry,
                                      [(e.entity.encode(), encode(e, fmt)) for e in out.events])
        await confirm(futures)
        metrics.EVENTS_OUT.labels(topics.telemetry).inc(len(out.events))
        metrics.INGEST_EVENTS.labels(input_).inc(len(out.events))
        for _, dl in out.dead_letters:
            metrics.DLQ_RECORDS.labels(dl.reason).inc()

    @app.agent(otlp_t)
    async def translate_otlp(stream: faust.StreamT) -> None:
        async for events in stream.take_events(100, within=0.05):
            metrics.EVENTS_IN.labels(settings.ingest.otlp_topic).inc(len(events))
            batch = [_record(ev) for ev in events]
            # Redis away: retried, the batch unacknowledged (the points it recorded
            # already are answered the same way when asked again).
            out = await with_retry("ingest", lambda b=batch: translator.otlp(b), app)
            await with_retry("publish", lambda o=out: publish(o, "otlp"), app)

    @app.agent(ce_t)
    async def translate_cloudevents(stream: faust.StreamT) -> None:
        async for events in stream.take_events(100, within=0.05):
            metrics.EVENTS_IN.labels(ce_t.get_topic_name()).inc(len(events))
            out = translator.cloudevents([_record(ev) for ev in events])
            await with_retry("publish", lambda o=out: publish(o, "cloudevents"), app)

    return app
