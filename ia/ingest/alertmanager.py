"""Alertmanager webhook (version 4) -> telemetry events (``kind: event``).

Each alert of a notification, firing or resolved, becomes one event:

* entity by :mod:`ia.ingest.mapping` from the alert's labels;
* metric ``alert:<alertname>``, value 1 (firing) or 0 (resolved);
* ts: ``startsAt`` of a firing alert, ``endsAt`` of a resolved one;
* labels: the alert's labels, its annotations as ``annotation.<name>``, and
  ``alert.status``, ``alert.fingerprint``, ``alert.starts_at``, ``alert.ends_at``
  (RFC 3339, as sent), ``alert.generator_url``, ``alert.receiver``;
* event id ``am-`` + a hash of fingerprint, status and ``startsAt``: the same state
  of the same alert episode always has the same id.

Alertmanager repeats a notification (every ``group_interval`` while the group
changes, every ``repeat_interval`` while it does not), so the receiver
de-duplicates by :func:`alert_id` (fingerprint + status + ``startsAt``, which tells
a new episode of an alert from a repeat of the old one) before sending.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from ia.ingest.mapping import Refused, Rules, entity_of, event_labels
from ia.schemas.models import EventKind, TelemetryEvent

SOURCE = "alertmanager"
STATUSES = ("firing", "resolved")


@dataclass
class Converted:
    #: (alert id, event) per alert
    alerts: list[tuple[str, TelemetryEvent]] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)


def parse_time(value: Any) -> int | None:
    """RFC 3339 (Go's, nanoseconds and all) as epoch milliseconds; None for Go's zero
    time (an alert that has not ended)."""
    if not isinstance(value, str) or not value:
        return None
    try:
        when = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    ms = int(when.timestamp() * 1000)
    return ms if ms > 0 else None


def alert_id(fingerprint: str, status: str, starts_at: str) -> str:
    return hashlib.sha256(f"{fingerprint}\x1f{status}\x1f{starts_at}".encode()).hexdigest()[:32]


def decode(body: bytes) -> dict:
    """The webhook's JSON (:class:`Refused` ``undecodable_alertmanager`` if it is none)."""
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise Refused("undecodable_alertmanager", f"not JSON: {exc}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("alerts"), list):
        raise Refused("undecodable_alertmanager", "no list of alerts")
    if str(doc.get("version", "4")) != "4":
        raise Refused("undecodable_alertmanager",
                      f"webhook version {doc.get('version')!r}; version 4 is read")
    return doc


def _strings(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        return {}
    return {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in value.items()}


def convert(doc: dict, rules: Rules) -> Converted:
    """Every alert of the notification ``doc`` (module docstring)."""
    out = Converted()
    receiver = doc.get("receiver") if isinstance(doc.get("receiver"), str) else ""
    for alert in doc["alerts"]:
        try:
            out.alerts.append(_alert(alert, rules, receiver))
        except Refused as exc:
            out.refused.append(exc)
    return out


def _alert(alert: Any, rules: Rules, receiver: str) -> tuple[str, TelemetryEvent]:
    if not isinstance(alert, dict):
        raise Refused("undecodable_alertmanager", "an alert that is no JSON object")
    labels = _strings(alert.get("labels"))
    status = alert.get("status")
    fingerprint = alert.get("fingerprint")
    if status not in STATUSES or not isinstance(fingerprint, str) or not fingerprint:
        raise Refused("undecodable_alertmanager",
                      "an alert needs a status (firing or resolved) and a fingerprint")
    starts, ends = alert.get("startsAt", ""), alert.get("endsAt", "")
    ts = parse_time(starts if status == "firing" else ends) or parse_time(starts)
    if ts is None:
        raise Refused("no_timestamp", f"alert {fingerprint} has no startsAt/endsAt")
    entity = entity_of(rules, labels)
    meta = {"alert.status": status, "alert.fingerprint": fingerprint,
            "alert.starts_at": str(starts), "alert.ends_at": str(ends),
            "alert.generator_url": str(alert.get("generatorURL", "")),
            "alert.receiver": receiver}
    annotations = {f"annotation.{k}": v for k, v in _strings(alert.get("annotations")).items()}
    ident = alert_id(fingerprint, status, str(starts))
    try:
        event = TelemetryEvent(
            event_id=f"am-{ident}", entity=entity,
            metric=f"alert:{labels.get('alertname', 'unnamed')}"[:256],
            value=1.0 if status == "firing" else 0.0, ts=ts, kind=EventKind.event,
            labels=event_labels(SOURCE, meta.items(), sorted(labels.items()),
                                sorted(annotations.items())))
    except ValidationError as exc:
        raise Refused("invalid_event", str(exc.errors()[0]["msg"])) from None
    return ident, event
