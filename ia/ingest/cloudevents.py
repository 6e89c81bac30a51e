"""CloudEvents 1.0 over Kafka (binary and structured content modes) -> ``kind: event``.

Read with the CloudEvents SDK (``cloudevents.core.bindings.kafka``): a record with
``ce_*`` headers is in binary mode (attributes in headers, data in the value),
otherwise in structured mode (``application/cloudevents+json``: the whole event in
the value).  Meant for deploys and config changes, which feed the context features
``seconds_since_deploy``, ``deploy_within_15m``, ``seconds_since_config_change``, ...

* metric (the event's name): the extension attribute ``iaevent`` if set; else the
  CloudEvents ``type``'s last segment, trailing version segments dropped
  (``dev.cdevents.service.deployed.0.2.0`` -> ``deployed``), lower-cased, ``-`` as
  ``_``, then by :data:`ALIASES` (``deployed`` -> ``deploy``, ``config-changed`` ->
  ``config_change``, ...), where the last two segments joined by ``_`` are tried
  first (``com.acme.config.changed`` -> ``config_changed`` -> ``config_change``);
* entity: the extension ``iaentity``; else ``subject``; else the mapping rules'
  entity labels (``IA_INGEST_ENTITY_LABELS``) among the data's top-level fields;
  else refused (``no_entity``);
* ts: ``time``, else the Kafka record's timestamp;
* value 1; event id ``ce-`` + a hash of ``source`` and ``id`` (which identify a
  CloudEvent), so a re-sent event is the same event;
* labels: ``ce.id``, ``ce.source``, ``ce.type``, ``ce.subject`` and the data's
  top-level scalar fields as ``data.<name>``.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from cloudevents.core.bindings import kafka as ce_kafka
from pydantic import ValidationError

from ia.ingest.mapping import Refused, Rules, entity_of, event_labels
from ia.schemas.models import EventKind, TelemetryEvent

SOURCE = "cloudevents"

#: Event names as producers spell them -> the names ``ia``'s context features track.
ALIASES = {
    **dict.fromkeys(("deploy", "deployed", "deployment", "deployment_finished", "release",
                     "released", "rollout", "upgraded", "rolledback", "rolled_back"),
                    "deploy"),
    **dict.fromkeys(("config_change", "config_changed", "configchanged", "configchange",
                     "configuration_changed", "config_updated", "config", "modified"),
                    "config_change"),
    **dict.fromkeys(("restart", "restarted"), "restart"),
    **dict.fromkeys(("scale", "scaled"), "scale"),
}

_VERSION = re.compile(r"^\d+$")

Headers = Mapping[str, bytes] | Iterable[tuple[str, bytes]] | None


def _headers(headers: Headers) -> dict[str, bytes]:
    if headers is None:
        return {}
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {str(k): bytes(v) if v is not None else b"" for k, v in items}


def event_name(ce_type: str) -> str:
    """The ``ia`` event name of a CloudEvents ``type`` (module docstring).

    >>> event_name("dev.cdevents.service.deployed.0.2.0")
    'deploy'
    >>> event_name("com.example.Config-Changed")
    'config_change'
    """
    parts = [p for p in ce_type.split(".") if p]
    while len(parts) > 1 and _VERSION.match(parts[-1]):
        parts.pop()
    words = [p.lower().replace("-", "_") for p in parts] or [ce_type.lower()]
    if len(words) > 1 and f"{words[-2]}_{words[-1]}" in ALIASES:  # com.acme.config.changed
        return ALIASES[f"{words[-2]}_{words[-1]}"]
    return ALIASES.get(words[-1], words[-1])


def convert(headers: Headers, key: bytes | None, value: bytes | None, record_ts_ms: int | None,
            rules: Rules) -> TelemetryEvent:
    """The event of one Kafka record (:class:`Refused` if it is none)."""
    message = ce_kafka.KafkaMessage(headers=_headers(headers), key=key, value=value or b"")
    try:
        ce = ce_kafka.from_kafka_event(message)
    except Exception as exc:  # the SDK parses untrusted bytes: any failure is the record's
        raise Refused("undecodable_cloudevent", f"{type(exc).__name__}: {exc}") from None
    attrs = ce.get_attributes()
    # The SDK makes up an id (a UUID) and a time (now) an event lacks: a made-up id
    # would differ on every delivery, and a made-up time is no event time.
    given = _given(message)
    if "id" not in given:
        raise Refused("undecodable_cloudevent", "no id attribute (CloudEvents requires one)")
    if attrs.get("specversion") != "1.0":
        raise Refused("undecodable_cloudevent",
                      f"specversion {attrs.get('specversion')!r}; 1.0 is read")
    data = _data(ce.get_data())
    name = str(attrs.get("iaevent") or event_name(str(attrs["type"])))
    entity = attrs.get("iaentity") or attrs.get("subject")
    if not entity:
        entity = entity_of(rules, {k: v for k, v in data.items() if isinstance(v, str)})
    when = attrs.get("time") if "time" in given else None
    ts = int(when.timestamp() * 1000) if when is not None else record_ts_ms
    if not ts or ts <= 0:
        raise Refused("no_timestamp", "no time attribute and no record timestamp")
    ident = hashlib.sha256(f"{attrs['source']}\x1f{attrs['id']}".encode()).hexdigest()[:32]
    scalars = sorted((f"data.{k}", v if isinstance(v, str) else json.dumps(v))
                     for k, v in data.items() if isinstance(v, str | int | float | bool))
    meta = [("ce.id", str(attrs["id"])), ("ce.source", str(attrs["source"])),
            ("ce.type", str(attrs["type"]))]
    if attrs.get("subject"):
        meta.append(("ce.subject", str(attrs["subject"])))
    try:
        return TelemetryEvent(event_id=f"ce-{ident}", entity=str(entity), metric=name[:256],
                              value=1.0, ts=ts, kind=EventKind.event,
                              labels=event_labels(SOURCE, meta, scalars))
    except ValidationError as exc:
        raise Refused("invalid_event", str(exc.errors()[0]["msg"])) from None


def _given(message: ce_kafka.KafkaMessage) -> set[str]:
    """The attributes the record itself carries (headers in binary mode, the JSON
    envelope's members in structured mode)."""
    names = {k.lower()[3:] for k in message.headers if k.lower().startswith("ce_")}
    if names:
        return names
    try:
        doc = json.loads(message.value)
    except (ValueError, RecursionError):
        return set()
    return set(doc) if isinstance(doc, dict) else set()


def _data(data: Any) -> dict[str, Any]:
    """The event's data as a JSON object, if it is one (else nothing is read from it)."""
    if isinstance(data, bytes | str):
        try:
            data = json.loads(data)
        except (ValueError, RecursionError):
            return {}
    return data if isinstance(data, dict) else {}
