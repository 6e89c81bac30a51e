"""The edge of the pipeline: raw bytes in, a valid event or a dead letter out."""

from __future__ import annotations

import base64

from ia.core import clock
from ia.schemas.models import DeadLetter, TelemetryEvent
from ia.schemas.serde import DecodeError, decode

# Keep dead letters bounded even when the offending record is huge; the
# original bytes are kept up to this size, which covers any sane event.
MAX_ORIGINAL_BYTES = 64 * 1024
# Event-time guards (cooldowns, rate limits) trust timestamps, so a producer
# with a clock far ahead could arm a cooldown that blocks real incidents for
# hours.  Past timestamps are fine (late data, backfills); the future is not.
MAX_FUTURE_SKEW_MS = 5 * 60 * 1000


def validate_record(raw: bytes | None, *, fmt: str, topic: str, partition: int,
                    offset: int, max_future_skew_ms: int | None = MAX_FUTURE_SKEW_MS,
                    now_ms: int | None = None) -> TelemetryEvent | DeadLetter:
    """Decode and validate one telemetry record; never raises.

    ``max_future_skew_ms=None`` accepts any timestamp (replays of simulated time).
    """
    if raw is None:
        return dead_letter(b"", "empty_record", "record has no value (tombstone)", topic,
                           partition, offset)
    try:
        event = decode(raw, TelemetryEvent, fmt)
    except DecodeError as exc:
        return dead_letter(raw, exc.reason, str(exc), topic, partition, offset)
    if max_future_skew_ms is not None:
        now = clock.now_ms() if now_ms is None else now_ms
        if event.ts > now + max_future_skew_ms:
            return dead_letter(raw, "ts_in_future",
                               f"ts {event.ts} is {(event.ts - now) / 1000:.0f}s ahead of this "
                               f"worker's clock (at most {max_future_skew_ms / 1000:.0f}s "
                               "allowed)", topic, partition, offset)
    return event


def key_mismatch(key: bytes | None, event: TelemetryEvent) -> str | None:
    """Why ``key`` is not the Kafka key ``event`` needs (None: it is its entity).

    The worker keeps an entity's state in one place and relies on one partition, hence
    one worker at a time, owning the entity; records keyed otherwise land on other
    partitions and their updates of the entity's state overwrite each other.
    """
    if key == event.entity.encode():
        return None
    if key is None:
        return f"record has no key; telemetry must be keyed by its entity {event.entity!r}"
    shown = key.decode("utf-8", "backslashreplace")
    return (f"key {_clip(shown)!r} is not the entity {event.entity!r}; telemetry must be "
            "keyed by its entity so one partition owns it")


def dead_letter(raw: bytes, reason: str, error: str, topic: str, partition: int,
                offset: int) -> DeadLetter:
    """The dead letter of the record at ``topic[partition]@offset`` (value ``raw``)."""
    return DeadLetter(
        reason=reason, error=error[:4000], source_topic=topic, source_partition=partition,
        source_offset=offset, failed_at=clock.now_ms(),
        original_b64=base64.b64encode(raw[:MAX_ORIGINAL_BYTES]).decode())


def _clip(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[:limit] + "..."
