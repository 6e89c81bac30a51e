"""The rules that turn foreign labels into an ``ia`` entity, metric name and labels.

Shared by every input (OTLP, Prometheus remote write, Alertmanager, CloudEvents) so
that one service is one entity whichever way its signals arrive.  The rules, with
their settings (README "Ingest"):

* **entity**: the value of the first label of ``IA_INGEST_ENTITY_LABELS``
  (default ``service.name,job``) that is present -- for OTLP the resource's
  attributes are looked at first, then the point's.  A point without any of them
  is refused (``no_entity``): guessing an entity would mix services.
* **metric**: the metric's name, then its series' labels in Prometheus selector
  spelling, sorted: ``http_requests{code="500",method="GET"}``.  A series' labels
  are all of its own labels (a Prometheus series', an OTLP point's attributes)
  except the entity's and ``IA_INGEST_IGNORE_LABELS``, plus the resource attributes
  named in ``IA_INGEST_SERIES_LABELS`` (default ``service.instance.id``).  Two
  series of one entity thus never share a metric (the feature store keeps one
  state per entity and metric); a name longer than 256 characters keeps its first
  part and a hash of the rest.
* **labels**: everything, the point's first, then the resource's, capped to the
  event's bounds (64 labels, keys of 128 characters, values of 1024), plus
  ``ia.source`` (``otlp``, ``prometheus``, ``alertmanager``, ``cloudevents``).

>>> rules = Rules(entity_labels=("service.name", "job"))
>>> entity_of(rules, {"job": "api", "instance": "h:9100"})
'api'
>>> metric_name(rules, "up", {"job": "api", "instance": "h:9100"}, entity_label="job")
'up{instance="h:9100"}'
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Final

from ia.core.settings import IngestSettings
from ia.schemas.models import (
    _CONTROL_CHARS,
    MAX_LABEL_KEY_LEN,
    MAX_LABEL_VALUE_LEN,
    MAX_LABELS,
    MAX_NAME_LEN,
)

SOURCE_LABEL = "ia.source"

#: Why a record of an input, or one of its points, was refused.  Stable: they are the
#: ``reason`` of dead letters (``ia.telemetry.dlq``), of 400 answers of ``ia receive``,
#: and a label of ``ia_ingest_refused_total``.
INGEST_REASONS: Final = {
    "undecodable_otlp": "the record is no ExportMetricsServiceRequest in the configured "
                        "encoding (otlp_proto or otlp_json)",
    "undecodable_cloudevent": "the record is no CloudEvent 1.0 in binary or structured mode",
    "undecodable_remote_write": "the body is no snappy-compressed remote write 1.0 "
                                "WriteRequest",
    "undecodable_alertmanager": "the body is no Alertmanager webhook (version 4) JSON",
    "no_entity": "none of IA_INGEST_ENTITY_LABELS is among its labels",
    "no_timestamp": "its timestamp is missing or zero",
    "not_finite": "its value is NaN or infinite (a Prometheus stale marker, for instance)",
    "unsupported_metric_type": "an OTLP metric type ia does not convert (exponential "
                               "histograms)",
    "invalid_event": "the converted event breaks the telemetry contract",
}


class Refused(ValueError):
    """One point or record that cannot become telemetry; ``reason`` is a key of
    :data:`INGEST_REASONS`."""

    def __init__(self, reason: str, detail: str) -> None:
        assert reason in INGEST_REASONS, reason
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


def _names(value: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in value.split(",") if part.strip())


@dataclass(frozen=True)
class Rules:
    """The mapping rules (module docstring); :meth:`of` reads them from the settings."""

    entity_labels: tuple[str, ...] = ("service.name", "job")
    series_labels: tuple[str, ...] = ("service.instance.id",)
    ignore_labels: frozenset[str] = field(default_factory=frozenset)
    quantiles: tuple[float, ...] = (0.5, 0.95, 0.99)
    histogram_mean: bool = True

    @classmethod
    def of(cls, settings: IngestSettings) -> Rules:
        return cls(entity_labels=_names(settings.entity_labels),
                   series_labels=_names(settings.series_labels),
                   ignore_labels=frozenset(_names(settings.ignore_labels)),
                   quantiles=tuple(float(q) for q in _names(settings.quantiles)),
                   histogram_mean=settings.histogram_mean)


def entity_label(rules: Rules, *label_sets: Mapping[str, str]) -> str | None:
    """The first of ``rules.entity_labels`` with a usable value in the first of
    ``label_sets`` that has one."""
    for name in rules.entity_labels:
        for labels in label_sets:
            value = labels.get(name)
            if value and len(value) <= MAX_NAME_LEN and not _CONTROL_CHARS.search(value):
                return name
    return None


def entity_of(rules: Rules, *label_sets: Mapping[str, str]) -> str:
    """The entity named by ``label_sets`` (:class:`Refused` ``no_entity`` if none)."""
    name = entity_label(rules, *label_sets)
    if name is None:
        raise Refused("no_entity", f"none of {', '.join(rules.entity_labels)} is set "
                                   f"(to a printable name of at most {MAX_NAME_LEN} characters)")
    return next(labels[name] for labels in label_sets if labels.get(name))


def _quote(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def metric_name(rules: Rules, name: str, labels: Mapping[str, str], *,
                entity_label: str | None = None, resource: Mapping[str, str] | None = None,
                suffix: str = "") -> str:
    """``name`` + ``suffix`` and the series' labels, ``name{k="v",...}`` (module docstring)."""
    own = {k: v for k, v in labels.items()
           if k != entity_label and k not in rules.ignore_labels and k != "__name__"}
    for key in rules.series_labels:
        if resource and key in resource and key != entity_label:
            own.setdefault(key, resource[key])
    base = _CONTROL_CHARS.sub("_", name + suffix) or "_"
    if not own:
        full = base
    else:
        full = base + "{" + ",".join(f'{k}="{_quote(own[k])}"' for k in sorted(own)) + "}"
    full = _CONTROL_CHARS.sub("_", full)
    if len(full) <= MAX_NAME_LEN:
        return full
    digest = hashlib.sha256(full.encode()).hexdigest()[:16]
    return full[:MAX_NAME_LEN - 19] + "{#" + digest + "}"


def event_labels(source: str, *label_sets: Iterable[tuple[str, str]]) -> dict[str, str]:
    """Every label of ``label_sets`` (earlier sets win), within the event's bounds."""
    out = {SOURCE_LABEL: source}
    for labels in label_sets:
        for key, value in labels:
            if len(out) >= MAX_LABELS:
                return out
            if not key or len(key) > MAX_LABEL_KEY_LEN or key in out:
                continue
            out[key] = value[:MAX_LABEL_VALUE_LEN]
    return out
