"""Each process exports its own metric families only, with help that says what they are."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ia.core import metrics
from ia.runtime.embedded import free_port


def _families(role: metrics.Role) -> set[str]:
    return {f.name for c in metrics.FAMILIES[role] for f in c.describe()}


def test_only_the_audit_writer_exports_audit_completeness() -> None:
    owners = {role for role in metrics.FAMILIES
              if "ia_audit_completeness_ratio" in _families(role)}
    assert owners == {"audit"}
    assert not _families("worker") & {"ia_audit_head_seq", "ia_audit_decisions",
                                      "ia_outcomes"}
    assert "ia_decisions" not in _families("actuator") | _families("audit")


def test_every_family_has_a_process_and_a_help_string() -> None:
    defined = [obj for obj in vars(metrics).values()
               if isinstance(obj, metrics.Counter | metrics.Gauge | metrics.Histogram)]
    served = {c for cs in metrics.FAMILIES.values() for c in cs}
    assert set(defined) <= served, "a metric no process exports"
    assert all(len(d.documentation) > 10 for c in defined for d in c.describe())


def test_a_served_process_exposes_its_families_only() -> None:
    port = free_port()
    metrics.serve(port, role="audit")
    metrics.AUDIT_HEAD_SEQ.set(7)
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    names = {f.name for f in text_string_to_metric_families(text)}
    ours = {n for n in names if n.startswith("ia_") and not n.endswith("_created")}
    assert ours == _families("audit")
    assert "ia_decisions" not in names and "process_cpu_seconds" in names


def test_the_two_latencies_are_two_metrics_that_say_what_they_measure() -> None:
    worker = {d.name: d.documentation for c in metrics.FAMILIES["worker"] for d in c.describe()}
    assert "ia_event_to_decision_seconds" not in worker  # it was the lag, named as latency
    assert "arrival at the worker" in worker["ia_record_to_decision_seconds"]
    assert "event's own timestamp" in worker["ia_event_time_lag_seconds"]
    seconds = {name: doc for role in metrics.FAMILIES
               for c in metrics.FAMILIES[role] for d in c.describe()
               for name, doc in [(d.name, d.documentation)] if name.endswith("_seconds")}
    assert seconds and all("seconds" in doc.lower() for doc in seconds.values()), seconds
