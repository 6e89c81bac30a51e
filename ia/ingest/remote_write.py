"""Prometheus remote write 1.0 -> telemetry events.

The body is a snappy-compressed (block format, not framed) protobuf ``WriteRequest``
(``prompb.proto`` beside this file, compiled to ``prompb_pb2``).  Each sample of each
series becomes one event: entity, metric (``__name__`` and the series' other labels)
and labels by :mod:`ia.ingest.mapping`, value and timestamp (milliseconds) as sent.
Remote write carries no metric types (metadata comes in separate requests), so a
counter arrives as its cumulative value; send rates with a recording rule
(``rate(x[1m])``) and ``write_relabel_configs`` keeping them.

Stale markers (a special NaN) and other non-finite values are skipped and counted;
a series without an entity label is refused.  The uncompressed size a body declares
is checked against the limit before anything is decompressed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import cramjam
from google.protobuf.message import DecodeError
from pydantic import ValidationError

from ia.ingest.mapping import Refused, Rules, entity_label, entity_of, event_labels, metric_name
from ia.ingest.prompb_pb2 import WriteRequest
from ia.schemas.models import TelemetryEvent

SOURCE = "prometheus"


class TooLarge(ValueError):
    """The body would be larger than allowed once uncompressed, or has too many samples."""


def declared_length(body: bytes) -> int:
    """The uncompressed length a snappy block declares (its leading varint)."""
    result, shift = 0, 0
    for i, byte in enumerate(body[:10]):
        result |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return result
        shift += 7
        if i == 9:
            break
    raise Refused("undecodable_remote_write", "no snappy length header")


def decode(body: bytes, max_bytes: int) -> WriteRequest:
    """The ``WriteRequest`` of a remote write body (:class:`TooLarge` past ``max_bytes``
    uncompressed, :class:`Refused` if it is none)."""
    size = declared_length(body)
    if size > max_bytes:
        raise TooLarge(f"the body uncompresses to {size} bytes, more than {max_bytes}")
    try:
        raw = bytes(cramjam.snappy.decompress_raw(body))
    except Exception as exc:  # cramjam raises its own DecompressionError
        raise Refused("undecodable_remote_write", f"snappy: {exc}") from None
    req = WriteRequest()
    try:
        req.ParseFromString(raw)
    except DecodeError as exc:
        raise Refused("undecodable_remote_write", f"protobuf: {exc}") from None
    return req


@dataclass
class Converted:
    events: list[TelemetryEvent] = field(default_factory=list)
    refused: list[Refused] = field(default_factory=list)
    #: stale markers and other NaN/infinite samples, skipped (not errors)
    skipped: int = 0


def convert(req: WriteRequest, rules: Rules, max_samples: int) -> Converted:
    """Every sample of ``req`` as an event (module docstring)."""
    total = sum(len(ts.samples) for ts in req.timeseries)
    if total > max_samples:
        raise TooLarge(f"{total} samples in one request, more than {max_samples}")
    out = Converted()
    for ts in req.timeseries:
        labels = {lb.name: lb.value for lb in ts.labels}
        name = labels.get("__name__", "")
        try:
            if not name:
                raise Refused("invalid_event", "a series without __name__")
            entity = entity_of(rules, labels)
        except Refused as exc:
            out.refused.append(exc)
            continue
        label = entity_label(rules, labels)
        metric = metric_name(rules, name, labels, entity_label=label)
        tags = event_labels(SOURCE, sorted(labels.items()))
        for sample in ts.samples:
            if not math.isfinite(sample.value):
                out.skipped += 1
                continue
            try:
                if sample.timestamp <= 0:
                    raise Refused("no_timestamp", f"{name} has a sample without a time")
                out.events.append(TelemetryEvent(entity=entity, metric=metric,
                                                 value=sample.value, ts=sample.timestamp,
                                                 labels=tags))
            except ValidationError as exc:
                out.refused.append(Refused("invalid_event", str(exc.errors()[0]["msg"])))
            except Refused as exc:
                out.refused.append(exc)
    return out
