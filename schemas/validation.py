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
        return _dead(b"", "empty_record", "record has no value (tombstone)", topic, partition,
                     offset)
    try:
        event = decode(raw, TelemetryEvent, fmt)
    except DecodeError as exc:
        return _dead(raw, exc.reason, str(exc), topic, partition, offset)
    if max_future_skew_ms is not None:
        now = clock.now_ms() if now_ms is None else now_ms
        if event.ts > now + max_future_skew_ms:
            return _dead(raw, "ts_in_future",
                         f"ts {event.ts} is {(event.ts - now) / 1000:.0f}s ahead of this "
                         f"worker's clock (at most {max_future_skew_ms / 1000:.0f}s allowed)",
                         topic, partition, offset)
    return event


def _dead(raw: bytes, reason: str, error: str, topic: str, partition: int,
          offset: int) -> DeadLetter:
    return DeadLetter(
        reason=reason, error=error[:4000], source_topic=topic, source_partition=partition,
        source_offset=offset, failed_at=clock.now_ms(),
        original_b64=base64.b64encode(raw[:MAX_ORIGINAL_BYTES]).decode())
