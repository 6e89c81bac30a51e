"""The closed loop through the real broker and Redis, driven by plain Kafka clients."""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path

import pytest

from ia.core.kafka import ensure_topics
from ia.core.redis import sync_client
from ia.core.settings import Topics
from tests.kafka_client import produce, read_topic
from tests.support import IaProcess, WebhookSink, ia_env, series, signed_label, wait_until

pytestmark = pytest.mark.integration

POLICY = """
version: 1
defaults: {{cooldown_s: 600, max_event_age_s: false}}  # historical timestamps
rules:
  - name: page-on-latency
    match: {{entity: "it-*", metric: latency_ms}}
    when: {{min_score: 0.8, min_confidence: 0.5, direction: up}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    mode: auto
"""


def normal(n: int, seed: int, level: float = 100.0, noise: float = 2.0) -> list[float]:
    rng = random.Random(seed)
    return [level + rng.gauss(0, noise) for _ in range(n)]


@pytest.fixture(scope="module")
def loop(infra, tmp_path_factory):
    """One worker and one actuator on their own topics, with a counting webhook."""
    tmp = tmp_path_factory.mktemp("loop")
    prefix = "it" + tmp.name[-6:].replace("_", "")
    with WebhookSink() as sink:
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY.format(url=sink.url))
        env = ia_env(infra, prefix, policy, IA_LOG_LEVEL="info")
        ensure_topics(infra.kafka, Topics(prefix).all(), 4)
        worker = IaProcess(["worker"], env, tmp / "worker.log").start()
        actuator = IaProcess(["actuate"], env, tmp / "actuator.log").start()
        try:
            yield {
                "prefix": prefix,
                "sink": sink,
                "infra": infra,
                "worker": worker,
                "actuator": actuator,
                "env": env,
                "tmp": tmp,
            }
        finally:
            worker.stop()
            actuator.stop()


def _decisions_for(loop, entity: str, n: int, timeout_s: float = 90.0) -> list[dict]:
    topic = f"{loop['prefix']}.decisions"
    recs = read_topic(
        loop["infra"].kafka,
        topic,
        timeout_s=timeout_s,
        until=lambda rs: len({r["event_id"] for r in rs if r["entity"] == entity}) >= n,
    )
    mine = [r for r in recs if r["entity"] == entity]
    assert len({r["event_id"] for r in mine}) >= n, (
        f"expected {n} decisions for {entity}, got {len(mine)}\n"
        f"worker log:\n{loop['worker'].tail()}"
    )
    return mine


def test_injected_anomaly_yields_action_and_succeeded_outcome(loop):
    kafka, prefix = loop["infra"].kafka, loop["prefix"]
    values = [*normal(60, seed=1), 400.0]
    produce(
        kafka,
        f"{prefix}.telemetry",
        series("it-web-1", "latency_ms", values),
        key=lambda r: r["entity"],
    )

    decisions = _decisions_for(loop, "it-web-1", len(values))
    actions = [d for d in decisions if d["action"]]
    assert len(actions) == 1, [d["rule_trace"] for d in actions]
    spike = actions[0]
    assert spike["value"] == 400.0
    assert spike["mode"] == "auto" and spike["action"]["type"] == "webhook"
    assert spike["anomaly_score"] >= 0.8
    assert spike["rule_trace"][-1]["rule"] == "page-on-latency"
    assert spike["model"]["id"] and spike["features"]["zscore"] > 10

    outcomes = read_topic(
        kafka,
        f"{prefix}.outcomes",
        timeout_s=60,
        until=lambda rs: any(o["decision_id"] == spike["decision_id"] for o in rs),
    )
    mine = [o for o in outcomes if o["decision_id"] == spike["decision_id"]]
    assert [o["status"] for o in mine] == ["succeeded"], loop["actuator"].tail()
    assert loop["sink"].calls[spike["decision_id"]] == 1


def test_normal_stream_yields_no_action(loop):
    kafka, prefix = loop["infra"].kafka, loop["prefix"]
    values = normal(150, seed=2)
    produce(
        kafka,
        f"{prefix}.telemetry",
        series("it-calm-1", "latency_ms", values),
        key=lambda r: r["entity"],
    )
    decisions = _decisions_for(loop, "it-calm-1", len(values))
    assert all(d["action"] is None and d["mode"] == "none" for d in decisions)
    assert max(d["anomaly_score"] for d in decisions) < 0.8


def test_malformed_records_go_to_dlq_and_good_ones_still_flow(loop):
    kafka, prefix = loop["infra"].kafka, loop["prefix"]
    bad = [
        b"not json",
        b"\xff\xfe\xfd",
        json.dumps({"entity": "it-bad"}).encode(),
        b'{"entity":"it-bad","metric":"m","value":NaN,"ts":1}',
        json.dumps({"entity": "x" * 5000, "metric": "m", "value": 1, "ts": 1}).encode(),
    ]
    good = series("it-after-bad", "latency_ms", normal(10, seed=3))
    produce(kafka, f"{prefix}.telemetry", bad)
    produce(kafka, f"{prefix}.telemetry", good, key=lambda r: r["entity"])

    dead = read_topic(
        kafka, f"{prefix}.telemetry.dlq", timeout_s=60, until=lambda rs: len(rs) >= len(bad)
    )
    assert len(dead) == len(bad)
    assert {base64.b64decode(d["original_b64"]) for d in dead} == set(bad)
    assert all(d["reason"] and d["error"] for d in dead)
    assert {"invalid_json", "invalid_utf8", "schema_validation"} <= {d["reason"] for d in dead}
    _decisions_for(loop, "it-after-bad", len(good))
    assert loop["worker"].alive()


def test_repeated_false_positive_feedback_lowers_confidence(loop):
    kafka, prefix = loop["infra"].kafka, loop["prefix"]
    # Three earlier action decisions of the entity, as the worker remembers them: only
    # labels of known decisions count.
    _remember(loop, [(f"dc-x{i}", "it-fb-1") for i in range(3)])
    produce(
        kafka,
        f"{prefix}.feedback",
        [
            signed_label({
                "decision_id": f"dc-x{i}",
                "label": "false_positive",
                "by": "oncall@example.com",
                "at": 1,
                "entity": "it-fb-1",
            })
            for i in range(3)
        ],
    )
    values = [*normal(60, seed=4), 400.0]
    wait_until(lambda: _fp_count(loop, "it-fb-1") == 3, 60, "feedback applied")
    produce(
        kafka,
        f"{prefix}.telemetry",
        series("it-fb-1", "latency_ms", values),
        key=lambda r: r["entity"],
    )
    decisions = _decisions_for(loop, "it-fb-1", len(values))
    spike = max(decisions, key=lambda d: d["value"])
    assert spike["anomaly_score"] >= 0.8
    assert spike["confidence"] <= spike["anomaly_score"] / 4 + 1e-6
    assert spike["action"] is None
    assert "confidence" in spike["rule_trace"][0]["reason"]


def _remember(loop, decisions: list[tuple[str, str]]) -> None:
    """Make the worker remember action decisions (id, entity) that later labels name."""
    from ia.core.keys import Keys

    r = sync_client(loop["infra"].redis)
    for decision_id, entity in decisions:
        r.set(Keys(loop["prefix"]).remembered_decision(decision_id),
              json.dumps({"action": "webhook", "entity": entity, "x": {}}), ex=3600)
    r.close()


def _fp_count(loop, entity: str) -> int:

    r = sync_client(loop["infra"].redis)
    raw = r.hget(f"{loop['prefix']}:f:v1:{entity}", "c:fp")
    r.close()
    return int(raw or 0)


def test_worker_metrics_endpoint(loop):
    """The worker's Prometheus endpoint counts what it did."""
    import httpx

    from ia.runtime.embedded import free_port

    port = free_port()
    env = {**loop["env"], "IA_METRICS_PORT": str(port)}
    extra = IaProcess(["worker"], env, Path(loop["tmp"]) / "worker-metrics.log").start()
    try:

        def scraped() -> bool:
            try:
                return "ia_events_in_total" in httpx.get(f"http://127.0.0.1:{port}/metrics").text
            except httpx.HTTPError:
                return False

        wait_until(scraped, 60, "metrics endpoint")
        text = httpx.get(f"http://127.0.0.1:{port}/metrics").text
        assert "ia_event_time_lag_seconds_bucket" in text
        assert "ia_record_to_decision_seconds_bucket" in text
        assert "ia_stage_duration_seconds" in text and "ia_dlq_records_total" in text
    finally:
        extra.stop()


def test_external_confluent_kafka_client_round_trip(loop):
    """The README's client (plain confluent-kafka, no project imports) gets its decisions."""
    import subprocess
    import sys

    script = Path(__file__).parent.parent / "examples" / "external_client.py"
    assert "from ia" not in script.read_text() and "import ia" not in script.read_text()
    env = {"PATH": "/usr/bin:/bin", "KAFKA_BOOTSTRAP_SERVERS": loop["infra"].kafka,
           "IA_TOPIC_PREFIX": loop["prefix"]}
    run = subprocess.run([sys.executable, str(script), "--entity", "it-ext-1"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr + run.stdout
    summary = json.loads(run.stdout.strip().splitlines()[-1])
    assert summary == {"decisions": 60, "actions": 1, "outcomes": {"succeeded": 1}}


def test_worker_and_actuator_say_they_are_ready(loop):
    """Each long-running process prints one line on start: group, partitions, policy
    version and endpoints (never a secret)."""
    prefix = loop["prefix"]

    def ready(proc, role: str) -> str | None:
        found = [line for line in proc.log.read_text(errors="replace").splitlines()
                 if f"{role} ready: " in line]
        return found[0] if found else None

    wait_until(lambda: ready(loop["worker"], "worker") and ready(loop["actuator"], "actuator"),
               60, "ready lines")
    worker = ready(loop["worker"], "worker")
    assert f"worker ready: group {prefix}-pipeline, 4 partitions of {prefix}.telemetry, " \
        "policy " in worker and f"broker {loop['infra'].kafka}" in worker
    assert " v" in worker and "redis redis://" in worker
    actuator = ready(loop["actuator"], "actuator")
    assert f"group {prefix}-actuator, 4 partitions of {prefix}.decisions" in actuator
    assert "action types command, log, notify, simulator, webhook" in actuator
