"""OpenTelemetry metrics (OTLP) -> telemetry events.

Reads what the OpenTelemetry Collector's Kafka exporter writes: one
``ExportMetricsServiceRequest`` per record, as protobuf (``otlp_proto``) or its
protobuf JSON mapping (``otlp_json``), decoded with the official definitions (the
``opentelemetry-proto`` package).  Per metric type:

* gauge, and a sum that is not monotonic (an up-down counter): each point is a sample
  of ``<name>{<series labels>}``;
* a monotonic sum (a counter): its per-second rate, ``<name>_rate{...}`` -- a delta
  point's value over its interval, a cumulative point's increase since the series'
  previous point (reset-aware, :mod:`ia.ingest.cumulative`);
* a histogram: the chosen quantiles (``<name>_p50``, ... of ``IA_INGEST_QUANTILES``,
  interpolated within the buckets as Prometheus' ``histogram_quantile`` does) and the
  mean (``<name>_mean``) of the observations in the point's interval (for a
  cumulative histogram: since the previous point);
* a summary: its quantiles among the chosen ones, as reported;
* an exponential histogram is refused (``unsupported_metric_type``).

Entity, metric names and labels follow :mod:`ia.ingest.mapping`.  A point flagged
"no recorded value", or with a NaN value, is refused; so is one without an entity.

The conversion is pure: :func:`convert` returns the samples and the cumulative
points, and :func:`finish` turns cumulative points and their predecessors (from a
:class:`~ia.ingest.cumulative.CumulativeStore`) into events.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.protobuf import json_format
from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1 import metrics_pb2
from pydantic import ValidationError

from ia.ingest.cumulative import CumulativePoint, CumulativeStore, Delta, Previous, delta
from ia.ingest.mapping import (
    Refused,
    Rules,
    entity_label,
    entity_of,
    event_labels,
    metric_name,
)
from ia.schemas.models import TelemetryEvent

SOURCE = "otlp"
CUMULATIVE = metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
NO_RECORDED_VALUE = metrics_pb2.DATA_POINT_FLAGS_NO_RECORDED_VALUE_MASK


def decode(payload: bytes, encoding: str = "auto") -> ExportMetricsServiceRequest:
    """The request in ``payload`` (:class:`Refused` ``undecodable_otlp`` if it is none).

    ``auto`` tells the encodings apart by the first byte that is not white space:
    JSON starts with ``{``, and a protobuf request never does (``{`` would be field 15,
    which ExportMetricsServiceRequest does not have).
    """
    if encoding == "auto":
        encoding = "otlp_json" if payload.lstrip()[:1] == b"{" else "otlp_proto"
    req = ExportMetricsServiceRequest()
    try:
        if encoding == "otlp_json":
            doc = json.loads(payload)
            if not isinstance(doc, dict):
                raise ValueError("not a JSON object")
            json_format.ParseDict(_without_exemplars(doc), req, ignore_unknown_fields=True)
        else:
            req.ParseFromString(payload)
            if req.FindInitializationErrors():  # pragma: no cover - proto3 has none
                raise DecodeError("incomplete message")
    except (DecodeError, ValueError, json_format.ParseError, RecursionError) as exc:
        raise Refused("undecodable_otlp", f"{encoding}: {exc}") from None
    return req


def _without_exemplars(doc: Any) -> Any:
    """``doc`` without its exemplars: OTLP JSON spells their trace and span ids in hex,
    where the protobuf JSON mapping expects base64 (and ``ia`` does not use them)."""
    if isinstance(doc, dict):
        return {k: _without_exemplars(v) for k, v in doc.items() if k != "exemplars"}
    if isinstance(doc, list):
        return [_without_exemplars(v) for v in doc]
    return doc


def any_value(v: AnyValue) -> str:
    """An attribute's value as a label value."""
    kind = v.WhichOneof("value")
    if kind == "string_value":
        return v.string_value
    if kind == "bool_value":
        return "true" if v.bool_value else "false"
    if kind == "int_value":
        return str(v.int_value)
    if kind == "double_value":
        return repr(v.double_value)
    if kind == "bytes_value":
        return v.bytes_value.hex()
    if kind == "array_value":
        return json.dumps([any_value(x) for x in v.array_value.values])
    if kind == "kvlist_value":
        return json.dumps(attributes(v.kvlist_value.values), sort_keys=True)
    return ""


def attributes(kvs: Iterable[KeyValue]) -> dict[str, str]:
    return {kv.key: any_value(kv.value) for kv in kvs}


@dataclass
class Pending:
    """A cumulative point waiting for its predecessor, and how to name its events."""

    point: CumulativePoint
    kind: str  # "counter" or "histogram"
    entity: str
    name: str
    attrs: dict[str, str]
    resource: dict[str, str]
    entity_label: str | None


@dataclass
class Converted:
    """What one request became: ready events, cumulative points to finish, refusals."""

    events: list[TelemetryEvent] = field(default_factory=list)
    pending: list[Pending] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)


def _ms(nanos: int) -> int:
    return nanos // 1_000_000


class _Series:
    """One metric's points under one resource: naming and event building."""

    def __init__(self, rules: Rules, resource: dict[str, str], name: str,
                 out: Converted) -> None:
        self.rules, self.resource, self.name, self.out = rules, resource, name, out

    def context(self, attrs: dict[str, str]) -> tuple[str, str | None]:
        label = entity_label(self.rules, self.resource, attrs)
        return entity_of(self.rules, self.resource, attrs), label

    def event(self, entity: str, label: str | None, attrs: Mapping[str, str], value: float,
              ts_ms: int, suffix: str = "") -> TelemetryEvent:
        return make_event(self.rules, entity, label, self.name, attrs, self.resource, value,
                          ts_ms, suffix)


def make_event(rules: Rules, entity: str, label: str | None, name: str,
               attrs: Mapping[str, str], resource: Mapping[str, str], value: float,
               ts_ms: int, suffix: str = "") -> TelemetryEvent:
    """One sample, named and labelled by the rules (:class:`Refused` if it is invalid)."""
    if not math.isfinite(value):
        raise Refused("not_finite", f"{name}{suffix} = {value}")
    if ts_ms <= 0:
        raise Refused("no_timestamp", f"{name}{suffix} has no time")
    metric = metric_name(rules, name, attrs, entity_label=label, resource=resource,
                         suffix=suffix)
    try:
        return TelemetryEvent(entity=entity, metric=metric, value=float(value), ts=ts_ms,
                              labels=event_labels(SOURCE, attrs.items(), resource.items()))
    except ValidationError as exc:
        raise Refused("invalid_event", str(exc.errors()[0]["msg"])) from None


def convert(req: ExportMetricsServiceRequest, rules: Rules) -> Converted:
    """The events and cumulative points of ``req`` (module docstring)."""
    out = Converted()
    for rm in req.resource_metrics:
        resource = attributes(rm.resource.attributes)
        for sm in rm.scope_metrics:
            for metric in sm.metrics:
                _metric(_Series(rules, resource, metric.name, out), metric)
    return out


def _metric(s: _Series, metric: metrics_pb2.Metric) -> None:
    kind = metric.WhichOneof("data")
    if kind == "gauge":
        _numbers(s, metric.gauge.data_points, rate=False, cumulative=False)
    elif kind == "sum":
        monotonic = metric.sum.is_monotonic
        _numbers(s, metric.sum.data_points, rate=monotonic,
                 cumulative=monotonic and metric.sum.aggregation_temporality == CUMULATIVE)
    elif kind == "histogram":
        _histograms(s, metric.histogram.data_points,
                    metric.histogram.aggregation_temporality == CUMULATIVE)
    elif kind == "summary":
        _summaries(s, metric.summary.data_points)
    elif kind is not None:
        s.out.refused.append(Refused("unsupported_metric_type", f"{metric.name}: {kind}"))


def _value(p: metrics_pb2.NumberDataPoint) -> float:
    return float(p.as_int) if p.WhichOneof("value") == "as_int" else p.as_double


def _each(s: _Series, points: Iterable) -> Iterable[tuple[Any, dict[str, str], str, str | None]]:
    """The points worth converting, with their attributes and entity; refusals noted."""
    for p in points:
        if p.flags & NO_RECORDED_VALUE:
            continue  # the series went away: nothing was measured
        attrs = attributes(p.attributes)
        try:
            entity, label = s.context(attrs)
            if p.time_unix_nano <= 0:
                raise Refused("no_timestamp", f"{s.name} has a point without a time")
        except Refused as exc:
            s.out.refused.append(exc)
            continue
        yield p, attrs, entity, label


def _numbers(s: _Series, points: Iterable, *, rate: bool, cumulative: bool) -> None:
    for p, attrs, entity, label in _each(s, points):
        ts, value = _ms(p.time_unix_nano), _value(p)
        try:
            if cumulative:
                if not math.isfinite(value):
                    raise Refused("not_finite", f"{s.name} = {value}")
                s.out.pending.append(_pending(s, "counter", entity, label, attrs, p, (value,)))
            elif rate:  # a delta counter: its increase over its own interval
                seconds = (p.time_unix_nano - p.start_time_unix_nano) / 1e9
                if p.start_time_unix_nano and seconds > 0:
                    s.out.events.append(s.event(entity, label, attrs, value / seconds, ts,
                                                "_rate"))
            else:
                s.out.events.append(s.event(entity, label, attrs, value, ts))
        except Refused as exc:
            s.out.refused.append(exc)


def _pending(s: _Series, kind: str, entity: str, label: str | None, attrs: dict[str, str],
             p: Any, values: tuple[float, ...], bounds: tuple[float, ...] = ()) -> Pending:
    metric = metric_name(s.rules, s.name, attrs, entity_label=label, resource=s.resource)
    point = CumulativePoint(f"{kind}\x1f{entity}\x1f{metric}", _ms(p.start_time_unix_nano),
                            _ms(p.time_unix_nano), values, bounds)
    return Pending(point, kind, entity, s.name, attrs, s.resource, label)


def _histograms(s: _Series, points: Iterable, cumulative: bool) -> None:
    for p, attrs, entity, label in _each(s, points):
        counts = tuple(float(c) for c in p.bucket_counts)
        bounds = tuple(p.explicit_bounds)
        if cumulative:
            s.out.pending.append(_pending(s, "histogram", entity, label, attrs, p,
                                          (float(p.count), p.sum, *counts), bounds))
            continue
        _histogram_events(s.rules, s.out, entity, label, s.name, attrs, s.resource,
                          _ms(p.time_unix_nano), float(p.count), p.sum, counts, bounds)


def _histogram_events(rules: Rules, out: Converted, entity: str, label: str | None, name: str,
                      attrs: Mapping[str, str], resource: Mapping[str, str], ts: int,
                      count: float, total: float, counts: tuple[float, ...],
                      bounds: tuple[float, ...]) -> None:
    if count <= 0:
        return  # nothing observed in the interval: no quantile, no mean
    values: list[tuple[str, float]] = []
    if counts and len(counts) == len(bounds) + 1:
        values += [(f"_p{_q_name(q)}", bucket_quantile(q, counts, bounds))
                   for q in rules.quantiles]
    if rules.histogram_mean:
        values.append(("_mean", total / count))
    for suffix, value in values:
        try:
            out.events.append(make_event(rules, entity, label, name, attrs, resource, value,
                                         ts, suffix))
        except Refused as exc:
            out.refused.append(exc)


def _q_name(q: float) -> str:
    """``0.95`` -> ``95``, ``0.999`` -> ``99.9``, ``0.5`` -> ``50``."""
    return f"{q * 100:g}"


def bucket_quantile(q: float, counts: tuple[float, ...], bounds: tuple[float, ...]) -> float:
    """The ``q`` quantile of a histogram's bucket counts, interpolated linearly within
    its bucket; as Prometheus' ``histogram_quantile``: the first bucket starts at 0
    (when its upper bound is positive) and a quantile in the overflow bucket is the
    highest finite bound.

    >>> bucket_quantile(0.5, (0, 10, 0), (1.0, 2.0))
    1.5
    >>> bucket_quantile(0.99, (0, 5, 5), (1.0, 2.0))
    2.0
    """
    total = sum(counts)
    if total <= 0 or not bounds:
        return math.nan
    rank = q * total
    seen = 0.0
    for i, c in enumerate(counts):
        if seen + c >= rank and c > 0:
            if i == len(bounds):
                return bounds[-1]
            upper = bounds[i]
            lower = bounds[i - 1] if i > 0 else min(0.0, upper)
            return lower + (upper - lower) * ((rank - seen) / c)
        seen += c
    return bounds[-1]


def _summaries(s: _Series, points: Iterable) -> None:
    wanted = {round(q, 9) for q in s.rules.quantiles}
    for p, attrs, entity, label in _each(s, points):
        ts = _ms(p.time_unix_nano)
        for qv in p.quantile_values:
            if round(qv.quantile, 9) not in wanted:
                continue
            try:
                s.out.events.append(s.event(entity, label, attrs, qv.value, ts,
                                            f"_p{_q_name(qv.quantile)}"))
            except Refused as exc:
                s.out.refused.append(exc)


def finish(rules: Rules, pending: Pending, prev: Previous | None, out: Converted) -> None:
    """Add the events of a cumulative point, given the point before it, to ``out``."""
    d = delta(prev, pending.point)
    if d is None:
        return
    p = pending.point
    if pending.kind == "counter":
        try:
            out.events.append(make_event(rules, pending.entity, pending.entity_label,
                                         pending.name, pending.attrs, pending.resource,
                                         d.values[0] / d.seconds, p.ts_ms, "_rate"))
        except Refused as exc:
            out.refused.append(exc)
        return
    _finish_histogram(rules, pending, d, out)


def _finish_histogram(rules: Rules, pending: Pending, d: Delta, out: Converted) -> None:
    count, total, *counts = d.values
    _histogram_events(rules, out, pending.entity, pending.entity_label, pending.name,
                      pending.attrs, pending.resource, pending.point.ts_ms, count, total,
                      tuple(counts), pending.point.bounds)


async def to_events(req: ExportMetricsServiceRequest, rules: Rules,
                    store: CumulativeStore) -> Converted:
    """:func:`convert`, then the cumulative points finished against ``store``."""
    out = convert(req, rules)
    answers = await store.previous([p.point for p in out.pending])
    for pending, (_status, prev) in zip(out.pending, answers, strict=True):
        finish(rules, pending, prev, out)
    out.pending = []
    return out
