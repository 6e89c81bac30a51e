"""kill -9 the worker mid-stream: no event without a decision, no action twice."""

from __future__ import annotations

import random
import threading
import time

import pytest

from ia.core.kafka import ensure_topics, record_count
from ia.core.settings import Topics
from tests.kafka_client import produce, read_topic
from tests.support import IaProcess, WebhookSink, ia_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

POLICY = """
version: 1
defaults: {{cooldown_s: 0, max_event_age_s: false}}  # historical timestamps
rules:
  - name: act-on-spike
    match: {{entity: "crash-*", metric: load}}
    when: {{min_score: 0.8, min_confidence: 0.5, direction: up}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    mode: auto
"""

ENTITIES = 24
SAMPLES = 150
SPIKES_AT = (70, 110, 140)


def workload() -> list[dict]:
    rng = random.Random(11)
    events = []
    for i in range(SAMPLES):
        for e in range(ENTITIES):
            value = 50.0 + rng.gauss(0, 1.0)
            if i in SPIKES_AT:
                value = 200.0
            events.append({"entity": f"crash-{e:02d}", "metric": "load", "value": value,
                           "ts": 1_700_000_000_000 + i * 10_000})
    return events


def test_kill9_worker_mid_stream_loses_nothing_and_acts_once(infra, tmp_path, topic_prefix):
    topics = Topics(topic_prefix)
    ensure_topics(infra.kafka, topics.all(), 4)
    events = workload()
    with WebhookSink() as sink:
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(url=sink.url))
        env = ia_env(infra, topic_prefix, policy, IA_BATCH_SIZE="50")
        worker = IaProcess(["worker"], env, tmp_path / "worker.log").start()
        actuator = IaProcess(["actuate"], env, tmp_path / "actuator.log").start()
        try:
            feeder = threading.Thread(target=_feed, args=(infra.kafka, topics.telemetry, events))
            feeder.start()
            # Kill twice, each time while records are still flowing.
            for kill_at in (len(events) // 4, len(events) // 2):
                wait_until(lambda n=kill_at: record_count(infra.kafka, topics.decisions) >= n, 120,
                           f"{kill_at} decisions before the kill")
                worker.kill9()
                assert record_count(infra.kafka, topics.decisions) < len(events), "not mid-stream"
                worker = IaProcess(["worker"], env, tmp_path / "worker.log").start()
            feeder.join()

            ids = {_event_key(e) for e in events}
            decisions = read_topic(
                infra.kafka, topics.decisions, timeout_s=180,
                until=lambda rs: {(r["entity"], r["ts"]) for r in rs} >= ids)
            decided = {(r["entity"], r["ts"]) for r in decisions}
            assert not ids - decided, f"{len(ids - decided)} events without a decision\n" \
                                      f"{worker.tail()}"

            acting = {r["decision_id"] for r in decisions if r["action"] and r["mode"] == "auto"}
            assert len(acting) >= ENTITIES  # spikes really triggered actions
            outcomes = read_topic(
                infra.kafka, topics.outcomes, timeout_s=120,
                until=lambda rs: {o["decision_id"] for o in rs} >= acting)
            assert {o["decision_id"] for o in outcomes} >= acting, actuator.tail()
            wait_until(lambda: set(sink.calls) >= acting, 30, "webhook calls")
            twice = {d: n for d, n in sink.calls.items() if n != 1}
            assert not twice, f"actions executed more than once: {twice}"
            assert set(sink.calls) == acting
            succeeded = {o["decision_id"] for o in outcomes if o["status"] == "succeeded"}
            assert succeeded == acting
        finally:
            worker.stop()
            actuator.stop()


def _event_key(e: dict) -> tuple[str, int]:
    return (e["entity"], e["ts"])


def _feed(bootstrap: str, topic: str, events: list[dict]) -> None:
    for i in range(0, len(events), 200):
        produce(bootstrap, topic, events[i:i + 200], key=lambda r: r["entity"])
        time.sleep(0.05)
