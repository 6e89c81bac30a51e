"""The inputs from operators' own tools: ``ia ingest`` (OpenTelemetry metrics and
CloudEvents from Kafka) and ``ia receive`` (Prometheus remote write and Alertmanager
webhooks over HTTP)."""

from __future__ import annotations

import click

from ia.cli.common import settings


@click.command()
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics on this port.")
def ingest(metrics_port: int | None) -> None:
    """Translate OTLP metrics (IA_INGEST_OTLP_TOPIC, default otlp_metrics) and CloudEvents
    (<prefix>.cloudevents) into telemetry events."""
    from ia.core.kafka import ensure_topics
    from ia.streams.app import run_faust
    from ia.streams.ingest import build_ingest, ingest_topics

    s = settings(metrics_port=metrics_port)
    s.require_endpoints()
    ensure_topics(s.kafka, ingest_topics(s), s.topic_partitions)
    run_faust(build_ingest(s), s)


@click.command()
@click.option("--host", default=None,
              help="Bind address (default: $IA_RECEIVE_HOST or 127.0.0.1).")
@click.option("--port", type=int, default=None,
              help="Port (default: $IA_RECEIVE_PORT or 8471).")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics on this port.")
def receive(host: str | None, port: int | None, metrics_port: int | None) -> None:
    """Receive Prometheus remote write (POST /api/v1/write) and Alertmanager webhooks
    (POST /alertmanager); bearer tokens from IA_RECEIVE_TOKEN_FILE."""
    from ia.ingest.receiver import serve

    serve(settings(metrics_port=metrics_port), host, port)
