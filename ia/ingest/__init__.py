"""Inputs from the tools operators already run: OpenTelemetry metrics (OTLP over Kafka),
Prometheus remote write and Alertmanager webhooks (``ia receive``), and CloudEvents
(deploys, config changes).  Each converter here is pure (bytes in, telemetry events
out) and testable without Kafka; the Kafka readers are in :mod:`ia.streams.ingest`,
the HTTP service in :mod:`ia.ingest.receiver`."""
