"""Faust application factory: Kafka plumbing only, no business logic."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

import faust

from ia.metrics import RETRIES
from ia.settings import Settings

log = logging.getLogger("ia.streams")
T = TypeVar("T")


def faust_broker_url(bootstrap: str) -> str:
    return ";".join(f"kafka://{h.strip()}" for h in bootstrap.split(",") if h.strip())


def make_app(settings: Settings, app_id: str) -> faust.App:
    bootstrap, _ = settings.require_endpoints()
    return faust.App(
        app_id,
        broker=faust_broker_url(bootstrap),
        store="memory://",
        web_enabled=False,
        autodiscover=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=1,
        broker_session_timeout=settings.session_timeout_s,
        broker_heartbeat_interval=settings.heartbeat_interval_s,
        consumer_auto_offset_reset="earliest",
        producer_acks=-1,
        broker_commit_every=1000,
        broker_commit_interval=1.0,
    )


def raw_topic(app: faust.App, name: str) -> faust.TopicT:
    return app.topic(name, key_type=bytes, value_type=bytes, key_serializer="raw",
                     value_serializer="raw")


async def with_retry(stage: str, fn: Callable[[], Awaitable[T]], app: faust.App) -> T:
    """Retry a batch step until its dependency (Redis, the broker) is back.

    The batch stays unacknowledged meanwhile, so nothing is lost; the worker
    only stops when it is asked to.
    """
    delay = 0.1
    while True:
        try:
            return await fn()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            if getattr(app, "should_stop", False):
                raise
            RETRIES.labels(stage).inc()
            log.warning("%s failed (%s: %s); retrying in %.1fs", stage, type(exc).__name__,
                        exc, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)


async def confirm(futures: list) -> None:
    """Wait until every produced record is acknowledged by the broker."""
    if futures:
        await asyncio.gather(*futures)
