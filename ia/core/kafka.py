"""Every Kafka client of ``ia`` is made here, from :class:`~ia.core.settings.KafkaSettings`
(brokers and security), so a TLS or SASL setting reaches all of them: producers,
consumers, admin clients and the Faust apps.  Also the plumbing every process shares:
creating topics, and reading whole topics with a plain consumer (no group, no commits).

A client's own settings are a mapping of librdkafka properties (``{"linger.ms": 5}``),
laid over the connection settings.  A bare ``host:port`` string instead of the
settings is a plaintext cluster: the embedded broker, tests and benchmarks.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Mapping
from typing import Any

from confluent_kafka import (
    OFFSET_BEGINNING,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient, NewTopic

from ia.core.errors import IaError, Unavailable
from ia.core.settings import KafkaSettings

Brokers = KafkaSettings | str


class TopicSetupError(IaError):
    """The broker did not create or list the topics in time."""


def kafka_settings(kafka: Brokers) -> KafkaSettings:
    """``kafka`` as settings: a bare bootstrap string is a plaintext cluster."""
    return kafka if isinstance(kafka, KafkaSettings) else KafkaSettings(bootstrap_servers=kafka)


class _Summarised(logging.Logger):
    """librdkafka's log, once per kind of message a minute: an unreachable broker is
    otherwise logged every second per connection, hundreds of lines that hide the one
    error that matters. Forwarded to the ``ia.kafka`` logger."""

    EVERY_S = 60.0

    def __init__(self) -> None:
        super().__init__("ia.kafka.librdkafka", logging.DEBUG)
        self.propagate = False
        self._last: dict[str, float] = {}
        self._out = logging.getLogger("ia.kafka")

    def handle(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        kind = re.sub(r"\d+", "#", message.split("]: ", 1)[-1])[:120]
        now = time.monotonic()
        if now - self._last.get(kind, -self.EVERY_S) >= self.EVERY_S:
            self._last[kind] = now
            self._out.log(record.levelno, "librdkafka: %s", message)


LIBRDKAFKA_LOG = _Summarised()


def client_config(kafka: Brokers, config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A librdkafka configuration: the connection of ``kafka`` and the client's own
    ``config``; the client's log is summarised (:class:`_Summarised`)."""
    return {**kafka_settings(kafka).librdkafka(), "logger": LIBRDKAFKA_LOG, **(config or {})}


def producer(kafka: Brokers, config: Mapping[str, Any] | None = None) -> Producer:
    return Producer(client_config(kafka, config))


def consumer(kafka: Brokers, group: str,
             config: Mapping[str, Any] | None = None) -> Consumer:
    """A consumer of ``group``; it joins the group only when it subscribes (readers that
    assign partitions themselves never do)."""
    return Consumer(client_config(kafka, {"group.id": group, **(config or {})}))


def admin(kafka: Brokers, config: Mapping[str, Any] | None = None) -> AdminClient:
    return AdminClient(client_config(kafka, config))


def faust_app_options(kafka: KafkaSettings) -> dict[str, Any]:
    """The ``faust.App`` options that say where the brokers are and how to authenticate;
    Faust hands the credentials to every aiokafka client it makes."""
    import faust  # only Faust processes need it

    auth = kafka.aiokafka()
    options: dict[str, Any] = {
        "broker": ";".join(f"kafka://{host}" for host in auth["bootstrap_servers"])}
    if kafka.uses_sasl:
        options["broker_credentials"] = faust.SASLCredentials(
            username=auth["sasl_plain_username"], password=auth["sasl_plain_password"],
            mechanism=auth["sasl_mechanism"], ssl_context=auth.get("ssl_context"))
    elif kafka.uses_tls:
        options["broker_credentials"] = faust.SSLCredentials(auth["ssl_context"])
    return options


def _reader(kafka: Brokers) -> Consumer:
    # Partition EOF events mark the end of each partition as seen by the
    # fetches themselves: some brokers (tansu) answer watermark queries with a
    # high watermark that lags the records a fetch returns.
    return consumer(kafka, "ia-reader", {"enable.auto.commit": False,
                                         "auto.offset.reset": "earliest",
                                         "enable.partition.eof": True})


def from_beginning(kafka: Brokers, topics: list[str], group: str = "ia-reader",
                   config: Mapping[str, Any] | None = None) -> Consumer:
    """A consumer assigned to every partition of ``topics`` from the first record: it
    joins no group and commits nothing (``config``: further librdkafka settings)."""
    c = consumer(kafka, group, {"enable.auto.commit": False, "log.connection.close": False,
                                **(config or {})})
    c.assign([TopicPartition(t, p, OFFSET_BEGINNING)
              for t in topics for p in c.list_topics(t, timeout=10).topics[t].partitions])
    return c


def end_offsets(kafka: Brokers, topic: str, timeout_s: float = 30.0) -> dict[int, int]:
    """The offset after the last record of each partition of ``topic``.

    Read, not asked for: tansu answers a high-watermark query with the base offset of
    the partition's last batch plus one, so the last batch is read from there to the
    partition's end.
    """
    c = _reader(kafka)
    try:
        parts = list(c.list_topics(topic, timeout=10).topics[topic].partitions)
        ends: dict[int, int] = {}
        starts = []
        for p in parts:
            low, high = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            ends[p] = max(high, 0)
            starts.append(TopicPartition(topic, p, max(low, high - 1, 0)))
        c.assign(starts)
        pending = set(parts)
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for m in c.consume(10_000, timeout=0.2):
                err = m.error()
                if err is None:
                    ends[m.partition()] = max(ends[m.partition()], m.offset() + 1)
                elif err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(m.partition())
        if pending:
            raise TimeoutError(f"{topic}: partitions {sorted(pending)} not read to their end")
        return ends
    finally:
        c.close()


def record_count(kafka: Brokers, topic: str) -> int:
    """Approximate records in ``topic`` (sum of watermark ranges); cheap, may lag."""
    c = _reader(kafka)
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        total = 0
        for p in meta.partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += hi - lo
        return total
    finally:
        c.close()


def read_all(kafka: Brokers, topic: str, timeout_s: float = 60.0) -> list[dict]:
    """Every JSON record in ``topic`` up to its current end, in partition order."""
    c = _reader(kafka)
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        pending = set(meta.partitions)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        out: list[dict] = []
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for m in c.consume(1000, timeout=0.2):
                err = m.error()
                if err is None:
                    out.append(json.loads(m.value()))
                elif err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(m.partition())
        return out
    finally:
        c.close()


REACHABLE_TIMEOUT_S = 10.0


class _QuietLog(logging.Logger):
    """Takes librdkafka's log lines (a refused connection is logged every second per
    broker) so a failure can be summarised in one line instead of hundreds."""

    def __init__(self) -> None:
        super().__init__("ia.kafka.client", logging.DEBUG)
        self.propagate = False
        self.count = 0
        self.last = ""

    def handle(self, record: logging.LogRecord) -> None:
        self.count += 1
        self.last = record.getMessage()


def _require_reachable(client: AdminClient, kafka: Brokers, noise: _QuietLog,
                       timeout_s: float) -> None:
    try:
        client.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        servers = kafka if isinstance(kafka, str) else kafka.bootstrap_servers
        detail = f"; last client message: {noise.last}" if noise.last else ""
        err = exc.args[0] if exc.args else exc
        reason = err.str() if isinstance(err, KafkaError) else str(err)
        raise Unavailable(
            f"cannot reach Kafka at {servers} within {timeout_s:.0f}s ({reason}{detail}). "
            'Is it running? Check KAFKA_BOOTSTRAP_SERVERS (eval "$(ia up)" starts one)'
        ) from None


def ensure_topics(
    kafka: Brokers,
    topics: list[str],
    partitions: int,
    *,
    replication_factor: int = 1,
    timeout: float = 30.0,
) -> list[str]:
    """Create ``topics`` if missing and wait until metadata lists all of them.

    Idempotent: topics that already exist are left untouched (whatever their
    partition count). Returns the names that were newly created.
    """
    wanted = list(dict.fromkeys(topics))
    if not wanted:
        return []
    deadline = time.monotonic() + timeout
    noise = _QuietLog()
    client = admin(kafka, {"logger": noise})
    _require_reachable(client, kafka, noise, min(timeout, REACHABLE_TIMEOUT_S))
    futures = client.create_topics(
        [
            NewTopic(t, num_partitions=partitions, replication_factor=replication_factor)
            for t in wanted
        ],
        request_timeout=timeout,
    )
    created: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=max(0.1, deadline - time.monotonic()))
            created.append(name)
        except KafkaException as exc:
            err = exc.args[0] if exc.args else None
            if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise
    missing = wanted
    while True:
        try:
            metadata = client.list_topics(timeout=max(0.1, min(5.0, deadline - time.monotonic())))
            missing = [
                t
                for t in wanted
                if t not in metadata.topics
                or metadata.topics[t].error is not None
                or not metadata.topics[t].partitions
            ]
        except KafkaException:
            pass
        if not missing:
            return created
        if time.monotonic() >= deadline:
            raise TopicSetupError(
                f"topics not visible in {kafka_settings(kafka).bootstrap_servers} metadata "
                f"after {timeout:.0f}s: {missing}"
            )
        time.sleep(0.1)
