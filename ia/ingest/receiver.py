"""``ia receive``: Prometheus remote write and Alertmanager webhooks over HTTP -> telemetry.

HTTP (aiohttp, as ``ia api``)::

    GET  /healthz          no authentication; {"ok": true}
    POST /api/v1/write     Prometheus remote write 1.0 (snappy protobuf WriteRequest) -> 204
    POST /alertmanager     Alertmanager webhook, version 4 (JSON) -> 200

Every ``POST`` needs ``Authorization: Bearer <token>``, a token of the file
``IA_RECEIVE_TOKEN_FILE`` (one per line, ``token`` or ``name token``); a receiver
without tokens does not start, and a request without a valid one gets 401 before its
body is read.  A request is answered only once the broker has confirmed every record
it produced (``acks=all``): 2xx means nothing is lost, and anything else leaves the
retry to the sender, which Prometheus and Alertmanager both do for 5xx:

* 503 while the broker does not confirm within ``IA_RECEIVE_DELIVERY_TIMEOUT_S``
  (records are given up by the producer at that same deadline, so a retried request
  is not also delivered late), or Redis is away (alert de-duplication);
* 413 for a body over ``IA_RECEIVE_MAX_REQUEST_BYTES`` (compressed or, as the snappy
  header declares, uncompressed) or over ``IA_RECEIVE_MAX_SAMPLES`` samples/alerts;
* 400 for a body that is not what the path takes, or with series or alerts that
  cannot be mapped (the rest is sent; the answer says what was refused, why and how
  often), which the sender does not retry.

Retried samples are the same events (ids derived from entity, metric, time and
value), so their decisions keep their ids.  Alerts are de-duplicated by fingerprint,
status and start (:mod:`ia.ingest.alertmanager`), remembered in Redis once sent.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

from aiohttp import web

from ia.core import metrics
from ia.core.errors import ConfigError
from ia.core.keys import Keys
from ia.core.settings import KafkaSettings, Settings
from ia.governance.api import _authenticate, load_tokens
from ia.ingest import alertmanager, remote_write
from ia.ingest.mapping import Refused, Rules
from ia.ingest.translate import summary
from ia.schemas.models import TelemetryEvent
from ia.schemas.serde import encode

log = logging.getLogger("ia.receive")
ALERT_SEEN_TTL_S = 7 * 24 * 3600

Records = Sequence[tuple[bytes | None, bytes]]


class Unavailable(Exception):
    """The broker (or Redis) did not take the records: answer 503."""


class Sink(Protocol):
    async def send(self, records: Records) -> None:
        """Return once every record is confirmed; :class:`Unavailable` otherwise."""


class KafkaSink:
    """Records to one topic through confluent-kafka, each request awaiting its own
    records' delivery reports (a thread serves the producer's callbacks)."""

    def __init__(self, kafka: KafkaSettings, topic: str, timeout_s: float) -> None:
        self.kafka, self.topic, self.timeout_s = kafka, topic, timeout_s
        self._fatal = False
        self.producer = self._producer()
        self._running = True
        self._poller = threading.Thread(target=self._poll, name="ia-receive-kafka", daemon=True)
        self._poller.start()

    def _producer(self):  # type: ignore[no-untyped-def]
        from ia.core.kafka import producer

        return producer(self.kafka, {
            # Not idempotent: after batches time out, an idempotent producer bumps its
            # epoch, which some brokers (tansu) then fence for good; a retried record may
            # be written twice instead, which is harmless (same event id, same decision
            # id).  One request in flight per connection keeps each entity's order.
            "acks": "all", "enable.idempotence": False,
            "max.in.flight.requests.per.connection": 1, "linger.ms": 5,
            # Given up at the request's own deadline: a 503'd request is not delivered later.
            "message.timeout.ms": int(self.timeout_s * 1000),
            # The Java client's (and aiokafka's) partitioner, so an entity lands on the
            # same partition whichever producer sent it.
            "partitioner": "murmur2_random", "error_cb": self._on_error})

    def _on_error(self, err) -> None:  # type: ignore[no-untyped-def]
        # A producer that failed for good is replaced at the next request, which would
        # otherwise get 503 for ever.
        if err.fatal():
            log.error("Kafka producer failed for good (%s); replacing it", err)
            self._fatal = True

    def _poll(self) -> None:
        while self._running:
            self.producer.poll(0.1)

    async def send(self, records: Records) -> None:
        if not records:
            return
        if self._fatal:
            self._fatal = False
            self.producer = self._producer()
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future] = []

        def on_delivery(fut: asyncio.Future):  # type: ignore[no-untyped-def]
            def done(err, _msg) -> None:  # type: ignore[no-untyped-def]
                loop.call_soon_threadsafe(_settle, fut, err)
            return done

        try:
            for key, value in records:
                fut = loop.create_future()
                futures.append(fut)
                self.producer.produce(self.topic, key=key, value=value,
                                      on_delivery=on_delivery(fut))
        except BufferError as exc:  # the local queue is full: the broker is not keeping up
            for fut in futures:
                fut.cancel()
            raise Unavailable(f"producer queue full: {exc}") from None
        try:
            errors = await asyncio.wait_for(asyncio.gather(*futures), self.timeout_s + 5)
        except TimeoutError:
            raise Unavailable("no delivery report in time") from None
        failed = [e for e in errors if e is not None]
        if failed:
            raise Unavailable(f"{len(failed)} of {len(records)} records not delivered: "
                              f"{failed[0]}")

    def close(self) -> None:
        self._running = False
        self._poller.join(2)
        self.producer.flush(5)


def _settle(fut: asyncio.Future, err: object) -> None:
    if not fut.done():
        fut.set_result(err)


class SeenAlerts(Protocol):
    async def unseen(self, ids: list[str]) -> list[bool]: ...
    async def mark(self, ids: list[str]) -> None: ...


class RedisSeenAlerts:
    def __init__(self, client, prefix: str) -> None:  # type: ignore[no-untyped-def]
        self.client, self.keys = client, Keys(prefix)

    async def unseen(self, ids: list[str]) -> list[bool]:
        if not ids:
            return []
        pipe = self.client.pipeline(transaction=False)
        for i in ids:
            pipe.exists(self.keys.alert_seen(i))
        return [not n for n in await pipe.execute()]

    async def mark(self, ids: list[str]) -> None:
        if not ids:
            return
        pipe = self.client.pipeline(transaction=False)
        for i in ids:
            pipe.set(self.keys.alert_seen(i), b"1", ex=ALERT_SEEN_TTL_S)
        await pipe.execute()


class MemorySeenAlerts:
    def __init__(self) -> None:
        self.ids: set[str] = set()

    async def unseen(self, ids: list[str]) -> list[bool]:
        return [i not in self.ids for i in ids]

    async def mark(self, ids: list[str]) -> None:
        self.ids.update(ids)


def _records(events: list[TelemetryEvent], fmt: str) -> list[tuple[bytes | None, bytes]]:
    return [(e.entity.encode(), encode(e, fmt)) for e in events]


def _refusal(refused: list[Refused], input_: str, sent: int) -> web.Response:
    for r in refused:
        metrics.INGEST_REFUSED.labels(input_, r.reason).inc()
    return web.json_response({"error": "refused", "refused": summary(refused), "sent": sent},
                             status=400)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def build_receiver(sink: Sink, seen: SeenAlerts, tokens: dict[str, str], rules: Rules, *,
                   fmt: str = "json", max_bytes: int = 4 * 1024 * 1024,
                   max_samples: int = 50_000) -> web.Application:
    """The receiver's application (module docstring); ``tokens`` as
    :func:`ia.governance.api.load_tokens` reads them."""
    if not tokens:
        raise ConfigError("no receiver token: set IA_RECEIVE_TOKEN_FILE")

    @web.middleware
    async def observe(request: web.Request, handler: Handler) -> web.StreamResponse:
        started = time.perf_counter()
        path = request.path if request.path in ("/api/v1/write", "/alertmanager",
                                                "/healthz") else "other"
        try:
            response = await _guarded(request, handler)
        except web.HTTPException as exc:  # 404, 405, 413 from aiohttp itself
            response = exc
        metrics.RECEIVE_REQUESTS.labels(path, str(response.status)).inc()
        metrics.RECEIVE_SECONDS.labels(path).observe(time.perf_counter() - started)
        if isinstance(response, web.HTTPException):
            raise response
        return response

    async def _guarded(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/healthz":
            return await handler(request)
        if _authenticate(request, tokens) is None:
            log.warning("unauthenticated %s %s from %s", request.method, request.path,
                        request.remote)
            return web.json_response({"error": "unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="ia"'})
        if request.content_length is not None and request.content_length > max_bytes:
            return _error(413, f"body over {max_bytes} bytes")
        try:
            return await handler(request)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, f"body over {max_bytes} bytes")
        except Unavailable as exc:
            log.warning("%s: answering 503: %s", request.path, exc)
            return _error(503, "the broker did not confirm the records; retry")

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def write(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            req = remote_write.decode(body, max_bytes)
            out = remote_write.convert(req, rules, max_samples)
        except remote_write.TooLarge as exc:
            return _error(413, str(exc))
        except Refused as exc:
            return _refusal([exc], "prometheus", 0)
        await sink.send(_records(out.events, fmt))
        metrics.INGEST_EVENTS.labels("prometheus").inc(len(out.events))
        metrics.EVENTS_OUT.labels("telemetry").inc(len(out.events))
        metrics.RECEIVE_SKIPPED.inc(out.skipped)
        if out.refused:
            return _refusal(out.refused, "prometheus", len(out.events))
        return web.Response(status=204)

    async def alerts(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            doc = alertmanager.decode(body)
            if len(doc["alerts"]) > max_samples:
                return _error(413, f"{len(doc['alerts'])} alerts, more than {max_samples}")
            out = alertmanager.convert(doc, rules)
        except Refused as exc:
            return _refusal([exc], "alertmanager", 0)
        ids = [i for i, _ in out.alerts]
        try:
            fresh = await seen.unseen(ids)
        except Exception as exc:  # Redis away: the sender retries
            raise Unavailable(f"cannot check alerts already sent: {exc}") from exc
        todo = [(i, ev) for (i, ev), new in zip(out.alerts, fresh, strict=True) if new]
        metrics.RECEIVE_DUPLICATES.inc(len(out.alerts) - len(todo))
        await sink.send(_records([ev for _, ev in todo], fmt))
        metrics.INGEST_EVENTS.labels("alertmanager").inc(len(todo))
        metrics.EVENTS_OUT.labels("telemetry").inc(len(todo))
        try:
            await seen.mark([i for i, _ in todo])
        except Exception as exc:  # sent but not remembered: a repeat is sent again (same id)
            log.warning("alerts sent but not remembered as sent: %s", exc)
        if out.refused:
            return _refusal(out.refused, "alertmanager", len(todo))
        return web.json_response({"sent": len(todo), "duplicates": len(out.alerts) - len(todo)})

    app = web.Application(middlewares=[observe], client_max_size=max_bytes)
    app.add_routes([web.get("/healthz", healthz), web.post("/api/v1/write", write),
                    web.post("/alertmanager", alerts)])
    return app


def serve(settings: Settings, host: str | None = None, port: int | None = None) -> None:
    """``ia receive``: serve until interrupted."""
    from ia.core.kafka import ensure_topics
    from ia.core.redis import client as redis_client

    settings.require_endpoints()
    conf = settings.receive
    if conf.token_file is None:
        raise ConfigError("no receiver token: set IA_RECEIVE_TOKEN_FILE")
    try:
        tokens = load_tokens(None, conf.token_file)
    except ConfigError as exc:
        raise ConfigError(f"IA_RECEIVE_TOKEN_FILE {conf.token_file}: {exc}") from None
    if not tokens:
        raise ConfigError(f"no token in {conf.token_file} (IA_RECEIVE_TOKEN_FILE)")
    try:
        ensure_topics(settings.kafka, [settings.topics.telemetry, settings.topics.dlq],
                      settings.topic_partitions, timeout=5.0)
    except Exception as exc:  # the broker may be away now: requests get 503 until it is back
        log.warning("could not check the telemetry topic (%s); serving anyway", exc)
    metrics.serve(settings.metrics_port, settings.metrics_host, role="receiver")

    async def make() -> web.Application:
        client = redis_client(settings.redis)
        sink = KafkaSink(settings.kafka, settings.topics.telemetry, conf.delivery_timeout_s)
        app = build_receiver(sink, RedisSeenAlerts(client, settings.redis.prefix), tokens,
                             Rules.of(settings.ingest), fmt=settings.wire_format,
                             max_bytes=conf.max_request_bytes, max_samples=conf.max_samples)

        async def _cleanup(_app: web.Application) -> None:
            await asyncio.to_thread(sink.close)
            await client.aclose()

        app.on_cleanup.append(_cleanup)
        return app

    web.run_app(make(), host=host or conf.host, port=conf.port if port is None else port,
                print=None, access_log=None)
