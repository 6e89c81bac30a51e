"""Real OpenTelemetry metric exports, as the Collector's Kafka exporter writes them.

Metrics are recorded with the official Python SDK (``opentelemetry-sdk``) and
collected by a reader; each collection is encoded with the OTLP exporter's own
encoder (``opentelemetry-exporter-otlp-proto-common``) into the
``ExportMetricsServiceRequest`` that an OTLP exporter sends.  The Collector's Kafka
exporter puts one such request in each record's value: its protobuf bytes for
``encoding: otlp_proto`` (the default), its OTLP/JSON form for ``otlp_json`` (the
protobuf JSON mapping with enums as integers, as OTLP/JSON specifies), without a key
or headers by default.
"""

from __future__ import annotations

from google.protobuf import json_format
from opentelemetry.exporter.otlp.proto.common.metrics_encoder import encode_metrics
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.resources import Resource


def kafka_value(request, encoding: str) -> bytes:  # type: ignore[no-untyped-def]
    """The record value the Collector's Kafka exporter writes for ``request``."""
    if encoding == "otlp_proto":
        return request.SerializeToString()
    assert encoding == "otlp_json", encoding
    return json_format.MessageToJson(request, use_integers_for_enums=True,
                                     indent=None).encode()


class OtlpService:
    """One instrumented service: a meter provider with a resource, and its readings."""

    def __init__(self, service: str, instance: str = "i-1", **resource: str) -> None:
        self.reader = InMemoryMetricReader()
        self.provider = MeterProvider(
            resource=Resource.create({"service.name": service, "service.instance.id": instance,
                                      **resource}),
            metric_readers=[self.reader])
        self.meter = self.provider.get_meter("ia-tests", "1.0")

    def export(self):  # type: ignore[no-untyped-def]
        """The ExportMetricsServiceRequest of everything recorded so far (cumulative)."""
        return encode_metrics(self.reader.get_metrics_data())

    def value(self, encoding: str) -> bytes:
        return kafka_value(self.export(), encoding)

    def close(self) -> None:
        self.provider.shutdown()
