"""Faust application factory: Kafka plumbing only, no business logic."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar
from urllib.parse import urlsplit

import faust
from aiokafka.errors import KafkaError
from confluent_kafka import KafkaException
from pydantic import BaseModel

from ia.core.kafka import ensure_topics, faust_app_options
from ia.core.metrics import RETRIES
from ia.core.redis import UNAVAILABLE
from ia.core.settings import Settings
from ia.schemas.serde import DecodeError, decode
from ia.streams.consumer import use_gap_guarded_consumer

log = logging.getLogger("ia.streams")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def make_app(settings: Settings, app_id: str) -> faust.App:
    settings.require_endpoints()
    app = faust.App(
        app_id,
        **faust_app_options(settings.kafka),
        store="memory://",
        web_enabled=False,
        autodiscover=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=1,
        broker_session_timeout=settings.kafka.session_timeout_s,
        broker_heartbeat_interval=settings.kafka.heartbeat_interval_s,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_every=settings.kafka.commit_every,
        broker_commit_interval=settings.kafka.commit_interval_s,
        # Room for a whole batch of decisions per partition in one record batch.
        producer_max_batch_size=256 * 1024,
    )
    use_gap_guarded_consumer(app, settings.kafka.fetch_max_wait_s)
    return app


def raw_topic(app: faust.App, name: str) -> faust.TopicT:
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw")


#: A dependency that is away or overloaded (Redis, the broker, the network), as opposed
#: to a step failing on its input: retried for as long as it lasts.
DEPENDENCY_ERRORS: tuple[type[Exception], ...] = (*UNAVAILABLE, KafkaError, KafkaException)


class GaveUp(Exception):
    """A step failed on every one of its attempts with an error no dependency explains
    (the cause is the last one)."""


async def with_retry(stage: str, fn: Callable[[], Awaitable[T]], app: faust.App,
                     fatal: tuple[type[Exception], ...] = (), *,
                     attempts: int | None = None) -> T:
    """Retry a batch step until its dependency (Redis, the broker, the disk) is back.

    The batch stays unacknowledged meanwhile, so nothing is lost; the worker
    only stops when it is asked to.  ``fatal`` errors are raised at once: no
    retry can fix them (e.g. an audit chain that cannot be extended safely).
    With ``attempts``, any other error but :data:`DEPENDENCY_ERRORS` -- the step
    fails on its input, and will again -- is tried that many times in all and
    then raised as :class:`GaveUp`, so the caller can set the input aside
    instead of stalling its partition for good.
    """
    delay = 0.1
    failures = 0
    while True:
        try:
            return await fn()
        except asyncio.CancelledError:
            raise
        except fatal:
            raise
        except Exception as exc:
            if getattr(app, "should_stop", False):
                raise
            if attempts is not None and not isinstance(exc, DEPENDENCY_ERRORS):
                failures += 1
                if failures >= attempts:
                    raise GaveUp(f"{stage} failed {failures} times") from exc
            RETRIES.labels(stage).inc()
            log.warning("%s failed (%s: %s); retrying in %.1fs", stage, type(exc).__name__,
                        exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def confirm(futures: list) -> None:
    """Wait until every produced record is acknowledged by the broker."""
    if futures:
        await asyncio.gather(*futures)


async def send_batched(app: faust.App, topic: str,
                       records: Sequence[tuple[bytes | None, bytes]]) -> list:
    """Queue ``(key, value)`` records for ``topic``; return futures to :func:`confirm`.

    Records are grouped per partition (the producer's key partitioner, so an
    entity's records keep one partition and their order) and handed to the
    Kafka client as whole record batches: one await per batch instead of
    several per record through ``Topic.send``.
    """
    if not records:
        return []
    producer = await app.maybe_start_producer()
    kafka = producer._ensure_producer()  # the aiokafka producer Faust drives
    await kafka.partitions_for(topic)  # metadata for the partitioner
    by_partition: dict[int, list[tuple[bytes | None, bytes]]] = {}
    for key, value in records:
        by_partition.setdefault(kafka._partition(topic, None, key, value, key, value),
                                []).append((key, value))
    futures = []
    for partition, recs in by_partition.items():
        futures.extend(await _send_partition(kafka, topic, partition, recs))
    return futures


async def _send_partition(kafka, topic: str, partition: int,  # type: ignore[no-untyped-def]
                          records: list[tuple[bytes | None, bytes]]) -> list:
    futures, batch = [], kafka.create_batch()
    for key, value in records:
        if batch.append(key=key, value=value, timestamp=None) is not None:
            continue
        if batch.record_count():
            futures.append(await kafka.send_batch(batch, topic, partition=partition))
            batch = kafka.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:  # larger than a batch
            futures.append(await kafka.send(topic, value, key=key, partition=partition))
    if batch.record_count():
        futures.append(await kafka.send_batch(batch, topic, partition=partition))
    return futures


async def send_confirmed(app: faust.App, topic: str,
                         records: Sequence[tuple[bytes | None, bytes]]) -> None:
    """Send ``(key, value)`` records to ``topic`` and wait until all are acknowledged."""
    await confirm(await send_batched(app, topic, records))


def decode_events(events: list, model_cls: type[M], fmt: str, what: str) -> list[M]:
    """Decode a batch of records of our own topics, logging (not raising on) bad ones.

    These topics are written by ``ia`` itself, so an undecodable record is a
    bug or a foreign writer: it is logged with its position and skipped.
    """
    out: list[M] = []
    for ev in events:
        try:
            out.append(decode(ev.message.value, model_cls, fmt))
        except DecodeError as exc:
            log.error("undecodable %s at %s[%d]@%d: %s", what, ev.message.topic,
                      ev.message.partition, ev.message.offset, exc)
    return out


def redis_address(url: str | None) -> str:
    """``url`` without its user info: ``redis://host:port/db``. A password in a Redis URL
    must not reach a log line."""
    if not url:
        return "-"
    parts = urlsplit(url)
    host = parts.hostname or "?"
    port = f":{parts.port}" if parts.port else ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def endpoints(settings: Settings) -> str:
    """``broker ..., redis ..., metrics ...`` for a ready line: addresses only, no secret."""
    metrics_at = (f"http://{settings.metrics_host}:{settings.metrics_port}/metrics"
                  if settings.metrics_port else "off")
    return (f"broker {settings.kafka.bootstrap_servers}, "
            f"redis {redis_address(settings.redis.url)}, metrics {metrics_at}")


async def partitions_of(app: faust.App, topic: str) -> int | None:
    """How many partitions ``topic`` has, from the producer's metadata (None: unknown)."""
    try:
        producer = await app.maybe_start_producer()
        found = await producer._ensure_producer().partitions_for(topic)
    except Exception as exc:  # the ready line must not stop a process that runs
        log.debug("partitions of %s: %s", topic, exc)
        return None
    return len(found) if found else None


def announce_ready(app: faust.App, describe: Callable[[], Awaitable[str]]) -> None:
    """Write ``describe()`` to stderr once ``app`` has started: the line that tells a
    person at a terminal that the process is up, and where it is connected."""

    @app.task
    async def _ready() -> None:
        try:
            line = await describe()
        except Exception as exc:  # never fail a running process over its greeting
            line = f"{app.conf.id} ready ({type(exc).__name__} describing it)"
        # The real stderr: Faust's worker redirects sys.stderr into its log.
        out = sys.__stderr__ or sys.stderr
        out.write(line + "\n")
        out.flush()


def tune_gc() -> None:
    """Collector settings for a long-running stream processor (measured with ``ia
    bench``: about 10% more events/s per worker).  What exists at start-up (modules,
    the app, compiled plans) lives as long as the process, so it is moved out of the
    collector's sight; and the youngest generation is collected every 50,000
    allocations instead of 700, because per-event objects are freed by reference
    counting anyway and each collection walks every young object."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(50_000, 20, 100)


def run_faust(app: faust.App, settings: Settings) -> None:
    """Run a Faust app in this process until it is stopped (its topics created first)."""
    from faust.worker import Worker

    settings.require_endpoints()
    ensure_topics(settings.kafka, settings.topics.all(), settings.topic_partitions)
    tune_gc()
    Worker(app, loglevel=settings.log_level, quiet=True).execute_from_commandline()
