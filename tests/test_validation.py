"""The pipeline's edge: every bad record becomes a dead letter with a reason."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path

from ia.schemas.models import REJECT_REASONS, DeadLetter, TelemetryEvent
from ia.schemas.serde import DECODE_REASONS
from ia.schemas.validation import MAX_FUTURE_SKEW_MS, key_mismatch, validate_record

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()

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


def test_the_key_must_be_the_entity() -> None:
    ev = TelemetryEvent(entity="web-1", metric="m", value=1.0, ts=1)
    assert key_mismatch(b"web-1", ev) is None
    assert "no key" in (key_mismatch(None, ev) or "")
    assert "'web-2' is not the entity 'web-1'" in (key_mismatch(b"web-2", ev) or "")
    assert "\\xff" in (key_mismatch(b"\xff" * 500, ev) or "")  # shown, and clipped
    assert len(key_mismatch(b"x" * 10_000, ev) or "") < 400


def test_every_dead_letter_reason_is_documented_in_the_readme() -> None:
    """DLQ readers and dashboards match on reasons: each one the code can give is listed."""
    section = README.split("**DeadLetter** `reason`s", 1)[1].split("\n\n**", 1)[0]
    documented = set(re.findall(r"`([a-z0-9_]+)`", section))
    assert DECODE_REASONS | set(REJECT_REASONS) <= documented
