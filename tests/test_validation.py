"""The pipeline's edge: every bad record becomes a dead letter with a reason."""

from __future__ import annotations

import base64
import json

from ia.schemas.models import DeadLetter, TelemetryEvent
from ia.schemas.validation import MAX_FUTURE_SKEW_MS, validate_record

NOW = 1_800_000_000_000


def check(raw: bytes | None, **kw) -> TelemetryEvent | DeadLetter:
    return validate_record(raw, fmt="json", topic="t", partition=2, offset=41, now_ms=NOW, **kw)


def event(ts: int) -> bytes:
    return json.dumps({"entity": "a", "metric": "m", "value": 1.0, "ts": ts}).encode()


def test_valid_record_passes() -> None:
    assert isinstance(check(event(NOW - 3_600_000)), TelemetryEvent)


def test_tombstone_is_a_dead_letter() -> None:
    dead = check(None)
    assert isinstance(dead, DeadLetter) and dead.reason == "empty_record"
    assert (dead.source_topic, dead.source_partition, dead.source_offset) == ("t", 2, 41)


def test_far_future_timestamp_is_rejected_with_reason() -> None:
    raw = event(NOW + MAX_FUTURE_SKEW_MS + 1)
    dead = check(raw)
    assert isinstance(dead, DeadLetter) and dead.reason == "ts_in_future"
    assert base64.b64decode(dead.original_b64) == raw
    assert isinstance(check(event(NOW + MAX_FUTURE_SKEW_MS)), TelemetryEvent)


def test_future_check_can_be_disabled_for_simulated_time() -> None:
    assert isinstance(check(event(NOW + 10**9), max_future_skew_ms=None), TelemetryEvent)


def test_original_bytes_are_capped() -> None:
    dead = check(b"{" * 200_000)
    assert isinstance(dead, DeadLetter)
    assert len(base64.b64decode(dead.original_b64)) == 64 * 1024
