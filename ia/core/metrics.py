"""Prometheus metrics of the worker and the actuator (conventional names, SI units)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

EVENTS_IN = Counter("ia_events_in_total", "Records consumed", ["topic"])
EVENTS_OUT = Counter("ia_events_out_total", "Records produced", ["topic"])
DLQ_RECORDS = Counter("ia_dlq_records_total", "Records sent to the dead-letter topic", ["reason"])
DECISIONS = Counter("ia_decisions_total", "Decisions published", ["action", "mode"])
OUTCOMES = Counter("ia_outcomes_total", "Action outcomes", ["action", "status"])
GUARD_INTERVENTIONS = Counter("ia_guard_interventions_total",
                              "Decisions a guard blocked or downgraded", ["guard"])
FEEDBACK = Counter("ia_feedback_total", "Feedback and outcome records applied", ["kind"])
RETRIES = Counter("ia_batch_retries_total", "Batches retried after a dependency failure",
                  ["stage"])
STAGE_SECONDS = Histogram(
    "ia_stage_duration_seconds", "Time per batch spent in each pipeline stage", ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
EVENT_TO_DECISION = Histogram(
    "ia_event_to_decision_seconds", "Event time to decision publication",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60))
# Live consumers (ia.core.gaps): offset gaps opened in a partition and how each ended:
# refetched (the skipped records came on a re-fetch) or accepted (no record behind it).
OFFSET_GAPS = Counter("ia_offset_gaps_total",
                      "Offset gaps a live consumer found in a partition, by outcome",
                      ["topic", "outcome"])
BATCH_SIZE = Histogram("ia_batch_size", "Events per processed batch",
                       buckets=(1, 10, 50, 100, 250, 500, 1000, 2000))
# Feature store (ia.features.enrich): samples at or before their series' watermark --
# folded (within the allowed lateness), dropped (later), duplicate, redelivered.
FEATURE_LATE_EVENTS = Counter("ia_feature_late_events_total",
                              "Samples at or before their series' watermark, by outcome",
                              ["outcome"])
# Governance: approvals and the audit log (ia actuate, ia api, ia audit-writer).
APPROVALS = Counter("ia_approval_events_total", "Approval events published", ["status"])
AUDIT_RECORDS = Counter("ia_audit_records_total", "Records appended to the audit chain",
                        ["kind"])
AUDIT_COMPLETENESS = Gauge(
    "ia_audit_completeness_ratio",
    "Decisions with a complete audit record / (those + decisions overdue for one)")
AUDIT_DECISIONS = Gauge("ia_audit_decisions", "Decisions known to the audit log by state",
                        ["state"])
AUDIT_HEAD_SEQ = Gauge("ia_audit_head_seq", "Sequence number of the audit chain's head")


def serve(port: int, host: str = "127.0.0.1") -> None:
    """Expose ``/metrics`` on ``host:port`` (port 0 disables)."""
    if port:
        start_http_server(port, addr=host)
