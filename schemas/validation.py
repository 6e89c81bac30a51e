"""The edge of the pipeline: raw bytes in, a valid event or a dead letter out."""

from __future__ import annotations

import base64
import time

from schemas.models import DeadLetter, TelemetryEvent
from schemas.serde import DecodeError, decode

# Keep dead letters bounded even when the offending record is huge; the
# original bytes are kept up to this size, which covers any sane event.
MAX_ORIGINAL_BYTES = 64 * 1024


def validate_record(raw: bytes | None, *, fmt: str, topic: str, partition: int,
                    offset: int) -> TelemetryEvent | DeadLetter:
    """Decode and validate one telemetry record; never raises."""
    if raw is None:
        return _dead(b"", "empty_record", "record has no value (tombstone)", topic, partition,
                     offset)
    try:
        return decode(raw, TelemetryEvent, fmt)
    except DecodeError as exc:
        return _dead(raw, exc.reason, str(exc), topic, partition, offset)


def _dead(raw: bytes, reason: str, error: str, topic: str, partition: int,
          offset: int) -> DeadLetter:
    return DeadLetter(
        reason=reason, error=error[:4000], source_topic=topic, source_partition=partition,
        source_offset=offset, failed_at=int(time.time() * 1000),
        original_b64=base64.b64encode(raw[:MAX_ORIGINAL_BYTES]).decode())
