"""Prometheus metrics of every ``ia`` process (conventional names, SI units).

The families are created unregistered; :func:`serve` exposes, for each process, only
the families that process updates (:data:`FAMILIES`), so an audit gauge is never read
as 0 from a worker, nor a worker counter from the audit writer.
"""

from __future__ import annotations

from typing import Literal

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    start_http_server,
)
from prometheus_client.registry import Collector

Role = Literal["worker", "actuator", "audit", "api", "bench", "ingest", "receiver"]


def _counter(name: str, doc: str, labels: tuple[str, ...] | list[str] = ()) -> Counter:
    return Counter(name, doc, labels, registry=None)


def _gauge(name: str, doc: str, labels: tuple[str, ...] | list[str] = ()) -> Gauge:
    return Gauge(name, doc, labels, registry=None)


def _histogram(name: str, doc: str, labels: tuple[str, ...] | list[str] = (), *,
               buckets: tuple[float, ...]) -> Histogram:
    return Histogram(name, doc, labels, buckets=buckets, registry=None)


EVENTS_IN = _counter("ia_events_in_total", "Records consumed", ["topic"])
EVENTS_OUT = _counter("ia_events_out_total", "Records produced", ["topic"])
DLQ_RECORDS = _counter("ia_dlq_records_total", "Records sent to the dead-letter topic", ["reason"])
DECISIONS = _counter("ia_decisions_total", "Decisions published", ["action", "mode"])
OUTCOMES = _counter("ia_outcomes_total", "Action outcomes", ["action", "status"])
GUARD_INTERVENTIONS = _counter("ia_guard_interventions_total",
                               "Decisions a guard blocked or downgraded", ["guard"])
FEEDBACK = _counter("ia_feedback_total", "Feedback and outcome records applied", ["kind"])
# Labels that must not count (ia.decisions.learning): unauthenticated, unknown decision,
# another entity than the decision's, over the entity's cap. Nothing changed.
FEEDBACK_REFUSED = _counter("ia_feedback_refused_total",
                            "Feedback labels refused and ignored", ["reason"])
# A shared model checkpoint that failed validation (ia.decisions.learning): ignored, never run.
CHECKPOINTS_REJECTED = _counter("ia_checkpoints_rejected_total",
                                "Model checkpoints read from Redis that failed validation",
                                ["model"])
RETRIES = _counter("ia_batch_retries_total", "Batches retried after a dependency failure",
                   ["stage"])
STAGE_SECONDS = _histogram(
    "ia_stage_duration_seconds", "Seconds per batch spent in each pipeline stage",
    ["stage"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5))
# Two latencies, two metrics: how long the worker takes with a record, and how far behind
# the events' own clocks its decisions are (which no worker speed-up can fix).
RECORD_TO_DECISION = _histogram(
    "ia_record_to_decision_seconds",
    "Processing latency in seconds: from a telemetry record's arrival at the worker (fetched "
    "from Kafka) until its decision (or dead letter) is confirmed by the broker",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
EVENT_TIME_LAG = _histogram(
    "ia_event_time_lag_seconds",
    "Event-time lag in seconds: a decision's publication time minus its event's own "
    "timestamp (ts); includes the producer's delay, consumer lag and, for replayed "
    "history, its age",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 3600))
# Live consumers (ia.core.gaps): offset gaps opened in a partition and how each ended:
# refetched (the skipped records came on a re-fetch) or accepted (no record behind it).
OFFSET_GAPS = _counter("ia_offset_gaps_total",
                       "Offset gaps a live consumer found in a partition, by outcome",
                       ["topic", "outcome"])
BATCH_SIZE = _histogram("ia_batch_size", "Events per processed batch",
                        buckets=(1, 10, 50, 100, 250, 500, 1000, 2000))
# Feature store (ia.features.enrich): samples at or before their series' watermark --
# folded (within the allowed lateness), dropped (later), duplicate, redelivered.
FEATURE_LATE_EVENTS = _counter("ia_feature_late_events_total",
                               "Samples at or before their series' watermark, by outcome",
                               ["outcome"])
OUTCOMES_REFUSED = _counter(
    "ia_outcomes_refused_total",
    "Action outcomes the worker did not record: no remembered action decision has that id "
    "(unmatched), or it was of another entity (wrong_entity)", ["reason"])
# The actuator (ia.core.signing): action decisions refused before anything else, by reason.
DECISIONS_REJECTED = _counter("ia_decisions_rejected_total",
                              "Action decisions the actuator refused to execute "
                              "(unsigned, badly signed, unknown key, too old, or not what "
                              "its current policy allows)", ["reason"])
# Governance: approvals and the audit log (ia actuate, ia api, ia audit-writer).
APPROVALS = _counter("ia_approval_events_total", "Approval events published", ["status"])
APPROVALS_REFUSED = _counter(
    "ia_approvals_refused_total",
    "Approved (or approved-on-expiry) requests the actuator did not run: their signed "
    "records do not verify (forged or tampered in Redis)")
APPROVAL_EVENTS_IGNORED = _counter(
    "ia_approval_events_ignored_total",
    "Answers on the approvals topic the actuator did not act on, because Redis (the only "
    "authority for an approval's state) says otherwise: unknown (no such request) or "
    "still_requested (a forged or early answer)", ["reason"])
API_REFUSED = _counter("ia_api_refused_total",
                       "Approval API requests refused (unauthenticated, forbidden, "
                       "rate_limited)", ["reason"])
AUDIT_RECORDS = _counter("ia_audit_records_total", "Records appended to the audit chain",
                         ["kind"])
AUDIT_COMPLETENESS = _gauge(
    "ia_audit_completeness_ratio",
    "Decisions with a complete audit record / (those + decisions overdue for one)")
AUDIT_DECISIONS = _gauge("ia_audit_decisions", "Decisions known to the audit log by state",
                         ["state"])
AUDIT_HEAD_SEQ = _gauge("ia_audit_head_seq", "Sequence number of the audit chain's head")
# Inputs (ia.ingest): `ia ingest` (OTLP, CloudEvents over Kafka) and `ia receive` (HTTP).
INGEST_EVENTS = _counter("ia_ingest_events_total",
                         "Telemetry events made from an input and confirmed by the broker",
                         ["input"])
INGEST_REFUSED = _counter("ia_ingest_refused_total",
                          "Records, points, samples or alerts of an input refused, by reason "
                          "(ia.ingest.mapping.INGEST_REASONS)", ["input", "reason"])
RECEIVE_REQUESTS = _counter("ia_receive_requests_total",
                            "Requests to `ia receive` by path and HTTP status", ["path", "code"])
RECEIVE_SECONDS = _histogram(
    "ia_receive_request_duration_seconds",
    "Seconds from a request's arrival to its answer (includes the broker's confirmation)",
    ["path"], buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
RECEIVE_DUPLICATES = _counter("ia_receive_duplicate_alerts_total",
                              "Alertmanager alerts already sent on (same fingerprint, status "
                              "and start), not sent again")
RECEIVE_SKIPPED = _counter("ia_receive_skipped_samples_total",
                           "Remote-write samples skipped: stale markers and other NaN values")


FAMILIES: dict[Role, tuple[Collector, ...]] = {
    "worker": (EVENTS_IN, EVENTS_OUT, DLQ_RECORDS, DECISIONS, GUARD_INTERVENTIONS, FEEDBACK,
               FEEDBACK_REFUSED, OUTCOMES_REFUSED, RETRIES, STAGE_SECONDS, RECORD_TO_DECISION,
               EVENT_TIME_LAG, BATCH_SIZE, FEATURE_LATE_EVENTS, OFFSET_GAPS, CHECKPOINTS_REJECTED),
    "actuator": (EVENTS_IN, EVENTS_OUT, OUTCOMES, APPROVALS, RETRIES, OFFSET_GAPS,
                 DECISIONS_REJECTED, APPROVALS_REFUSED, APPROVAL_EVENTS_IGNORED),
    "audit": (EVENTS_IN, AUDIT_RECORDS, AUDIT_COMPLETENESS, AUDIT_DECISIONS, AUDIT_HEAD_SEQ,
              RETRIES, OFFSET_GAPS),
    "api": (APPROVALS, API_REFUSED),
    "bench": (EVENTS_IN, EVENTS_OUT, BATCH_SIZE, OFFSET_GAPS),
    "ingest": (EVENTS_IN, EVENTS_OUT, DLQ_RECORDS, INGEST_EVENTS, INGEST_REFUSED, RETRIES,
               OFFSET_GAPS),
    "receiver": (EVENTS_OUT, INGEST_EVENTS, INGEST_REFUSED, RECEIVE_REQUESTS, RECEIVE_SECONDS,
                 RECEIVE_DUPLICATES, RECEIVE_SKIPPED),
}


def registry_of(role: Role) -> CollectorRegistry:
    """The families of one process, with Python's process, platform and GC collectors."""
    registry = CollectorRegistry(auto_describe=True)
    for collector in (*FAMILIES[role], PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
        registry.register(collector)
    return registry


def serve(port: int, host: str = "127.0.0.1", *, role: Role) -> None:
    """Expose ``role``'s families on ``http://host:port/metrics`` (port 0 disables)."""
    if port:
        start_http_server(port, addr=host, registry=registry_of(role))
