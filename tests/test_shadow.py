"""Shadow mode: a candidate beside production never reaches an actuator; report,
promotion and rollback are explicit and logged in a hash-chained promotion log."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer

from ia.core.kafka import ensure_topics
from ia.core.settings import Settings, Topics
from ia.decisions.policy import Policy, PolicyError
from ia.decisions.shadow import as_shadow, intended_mode
from ia.governance.promotion import Places, PromotionError, PromotionLog, promote, rollback
from ia.offline.backtest import Row
from ia.offline.shadow import shadow_settings
from ia.offline.topic_slice import SliceSpec, read_slice
from ia.schemas.models import Action, Decision, Mode, ModelInfo
from ia.streams.worker import output_topics
from tests.kafka_client import produce, read_topic
from tests.support import IaProcess, WebhookSink, ia_env, series, wait_until

PROD = """\
version: 1
rules:
  - name: page-never
    match: {entity: "nothing-*"}
    when: {min_score: 0.8}
    action: {type: log, target: "{entity}"}
"""
CANDIDATE = """
version: 1
defaults: {{max_event_age_s: false}}  # historical timestamps
rules:
  - name: page-on-latency
    match: {{entity: "sh-*", metric: latency_ms}}
    when: {{min_score: 0.8, min_confidence: 0.5, direction: up}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    mode: auto
"""


def decision(action: bool, mode: Mode = Mode.auto) -> Decision:
    return Decision(decision_id="dc-1", correlation_id="c", event_id="ev-1", entity="e",
                    metric="m", value=1.0, ts=1, decided_at=1, anomaly_score=0.9,
                    confidence=0.9, model=ModelInfo(id="x", version="1"),
                    action=Action(type="log", target="e") if action else None,
                    mode=mode if action else Mode.none)


def test_shadow_decisions_never_carry_an_acting_mode() -> None:
    d = as_shadow(decision(True, Mode.needs_approval))
    assert d.mode is Mode.shadow and d.rule_trace[-1].rule == "shadow"
    assert intended_mode(d) is Mode.needs_approval
    assert as_shadow(d) == d  # idempotent (a redelivered batch is marked once)
    assert Row.of(d).mode == "needs_approval" and Row.of(d).acts
    quiet = decision(False)
    assert as_shadow(quiet) == quiet


def test_shadow_settings_are_namespaced() -> None:
    s = shadow_settings(Settings(_env={}, worker={"app_id": "ia-pipeline"}, redis={"prefix": "ia"}))
    assert (s.worker.app_id, s.redis.prefix) == ("ia-pipeline-shadow", "ia.shadow")
    assert s.topics.decisions_shadow == "ia.decisions.shadow"
    assert s.topics.decisions_shadow not in s.topics.all()


def test_a_shadow_worker_writes_its_dead_letters_to_a_topic_of_its_own() -> None:
    topics = Topics("ia")
    assert output_topics(topics, shadow=False) == ("ia.decisions", "ia.telemetry.dlq")
    assert output_topics(topics, shadow=True) == ("ia.decisions.shadow",
                                                  "ia.telemetry.dlq.shadow")
    assert topics.dlq_shadow not in topics.all()


@pytest.fixture
def files(tmp_path: Path) -> tuple[Path, Path, Places]:
    prod, cand = tmp_path / "prod.yaml", tmp_path / "cand.yaml"
    prod.write_text(PROD)
    cand.write_text(CANDIDATE.format(url="http://127.0.0.1:9/x"))
    return prod, cand, Places(tmp_path / "audit" / "ia.promotions.jsonl",
                              tmp_path / "audit" / "policy-versions")


def test_promote_then_rollback_restores_and_logs(files) -> None:
    prod, cand, places = files
    v_prod, v_cand = Policy.from_file(prod).version, Policy.from_file(cand).version
    rec = promote(cand, prod, places, "alice", "shadow report looked good")
    assert prod.read_text() == cand.read_text()
    assert (rec["action"], rec["from_version"], rec["to_version"]) == ("promote", v_prod, v_cand)
    with pytest.raises(PromotionError, match="already"):
        promote(cand, prod, places, "alice", "again")
    rec = rollback(prod, places, "bob", "too many pages")
    assert prod.read_text() == PROD
    assert (rec["from_version"], rec["to_version"], rec["undoes"]) == (v_cand, v_prod, 1)
    with pytest.raises(PromotionError, match="no promotion"):
        rollback(prod, places, "bob", "nothing left")
    log = PromotionLog(places.log)
    assert [r["action"] for r in log.records()] == ["promote", "rollback"]
    assert log.verify() == []


def test_refusals_and_tampering(files) -> None:
    prod, cand, places = files
    bad = cand.with_name("bad.yaml")
    bad.write_text("version: 1\nrules: [{name: x, when: {min_score: 7}}]\n")
    with pytest.raises(PolicyError):
        promote(bad, prod, places, "alice", "typo")
    with pytest.raises(PromotionError, match="reason"):
        promote(cand, prod, places, "alice", " ")
    assert prod.read_text() == PROD
    promote(cand, prod, places, "alice", "try it")
    prod.write_text(PROD.replace("0.8", "0.9"))  # edited by hand after the promotion
    with pytest.raises(PromotionError, match="changed since"):
        rollback(prod, places, "bob", "undo")
    assert rollback(prod, places, "bob", "undo anyway", force=True)["to_version"] == \
        Policy.from_text(PROD).version
    text = places.log.read_text().replace("try it", "try it!")
    places.log.write_text(text)
    assert any("modified" in p for p in PromotionLog(places.log).verify())
    with pytest.raises(PromotionError, match="verification"):
        promote(cand, prod, places, "alice", "again")


def test_promotion_log_hashes_the_exact_line_bytes(files) -> None:
    prod, cand, places = files
    promote(cand, prod, places, "alice", "first")
    rollback(prod, places, "bob", "second")
    lines = places.log.read_bytes().splitlines(keepends=True)
    # The same JSON value written differently (keys reordered) is a modification.
    first = json.loads(lines[0])
    places.log.write_bytes(json.dumps(dict(reversed(first.items())), ensure_ascii=False,
                                      separators=(",", ":")).encode() + b"\n" + lines[1])
    assert any("modified" in p for p in PromotionLog(places.log).verify())
    places.log.write_bytes(lines[1])
    assert any("removed or inserted" in p for p in PromotionLog(places.log).verify())


# --------------------------------------------------------------------------- live


def normal(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [100 + rng.gauss(0, 2) for _ in range(n)]


def cli(env: dict[str, str], *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ia.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, check=check, timeout=120)


def topic_exists(bootstrap: str, topic: str) -> bool:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "unused"})
    try:
        meta = c.list_topics(topic, timeout=5).topics.get(topic)
        return meta is not None and meta.error is None and bool(meta.partitions)
    finally:
        c.close()


def count(bootstrap: str, topic: str) -> int:
    return sum(len(r) for r in read_slice(bootstrap, SliceSpec(topic)).values())


@pytest.mark.integration
@pytest.mark.slow
def test_shadow_runs_beside_production_and_never_acts(infra, redis_client, topic_prefix,
                                                      tmp_path: Path) -> None:
    prefix, topics = topic_prefix, Topics(topic_prefix)
    ensure_topics(infra.kafka, topics.all(), 4)
    with WebhookSink() as sink:
        prod, cand = tmp_path / "prod.yaml", tmp_path / "cand.yaml"
        prod.write_text(PROD)
        cand.write_text(CANDIDATE.format(url=sink.url))
        env = ia_env(infra, prefix, prod, IA_AUDIT_DIR=str(tmp_path / "audit"))
        procs = [IaProcess(["worker"], env, tmp_path / "worker.log"),
                 IaProcess(["actuate"], env, tmp_path / "actuator.log"),
                 IaProcess(["worker", "--shadow", "--policy", str(cand)], env,
                           tmp_path / "shadow.log")]
        for p in procs:
            p.start()
        try:
            values = [*normal(60, seed=1), 400.0]
            produce(infra.kafka, topics.telemetry, series("sh-web-1", "latency_ms", values),
                    key=lambda r: r["entity"])
            produce(infra.kafka, topics.telemetry, [b"{not json"])
            # The shadow worker creates its topics (no actuator ever subscribes to them).
            wait_until(lambda: topic_exists(infra.kafka, topics.decisions_shadow), 60,
                       f"the shadow topic\n{procs[2].tail()}")
            # Each worker has its own dead letter of the bad record: none is a twin.
            wait_until(lambda: topic_exists(infra.kafka, topics.dlq_shadow)
                       and count(infra.kafka, topics.dlq_shadow) == 1, 60,
                       f"the shadow's dead letter\n{procs[2].tail()}")
            wait_until(lambda: count(infra.kafka, topics.dlq) == 1, 60,
                       f"production's dead letter\n{procs[0].tail()}")
            shadow = read_topic(infra.kafka, topics.decisions_shadow, timeout_s=120,
                                until=lambda rs: len(rs) >= len(values))
            production = read_topic(infra.kafka, topics.decisions, timeout_s=60,
                                    until=lambda rs: len(rs) >= len(values))
            assert len(shadow) >= len(values), procs[2].tail()
            acted = [d for d in shadow if d["action"]]
            assert len(acted) == 1 and acted[0]["value"] == 400.0
            assert acted[0]["mode"] == "shadow" and acted[0]["action"]["type"] == "webhook"
            assert acted[0]["rule_trace"][-1]["reason"].startswith("candidate mode: auto")
            assert not [d for d in production if d["action"]]
            assert {d["event_id"] for d in shadow} == {d["event_id"] for d in production}
            assert not {d["decision_id"] for d in shadow} & {d["decision_id"]
                                                            for d in production}
            time.sleep(3.0)  # time for an actuator to act, were it fed
            assert sum(sink.calls.values()) == 0
            assert count(infra.kafka, topics.dlq) == 1
            assert count(infra.kafka, topics.outcomes) == 0
            # The candidate's state and guard claims live in its own namespace.
            assert list(redis_client.scan_iter(match=f"{prefix}.shadow:claim:*"))
            assert not list(redis_client.scan_iter(match=f"{prefix}:claim:*"))
            assert redis_client.exists(f"{prefix}:f:v1:sh-web-1")
            assert redis_client.exists(f"{prefix}.shadow:f:v1:sh-web-1")

            report = json.loads(cli(env, "shadow", "report", "--json").stdout)
            assert report["events_compared"] == len(values)
            assert (report["diff"]["added"], report["diff"]["removed"]) == (1, 0)
            assert report["shadow"]["volume"]["by_mode"] == {"auto": 1}
            (tmp_path / "report.json").write_text(json.dumps(report))

            # Promotion is explicit and logged; production then acts as the candidate did.
            promoted = json.loads(cli(env, "shadow", "promote", "--candidate", str(cand),
                                      "--reason", "shadow added one true page",
                                      "--evidence", str(tmp_path / "report.json")).stdout)
            assert promoted["to_version"] == Policy.from_file(cand).version
            assert prod.read_text() == cand.read_text()
            time.sleep(2.5)  # hot reload: checked every second
            values2 = [*normal(60, seed=2), 420.0]
            produce(infra.kafka, topics.telemetry, series("sh-web-2", "latency_ms", values2),
                    key=lambda r: r["entity"])
            wait_until(lambda: sum(sink.calls.values()) == 1, 90,
                       f"production acting after promotion\n{procs[0].tail()}")

            rolled = json.loads(cli(env, "shadow", "rollback", "--reason", "test over").stdout)
            assert rolled["to_version"] == Policy.from_text(PROD).version
            assert prod.read_text() == PROD
            history = cli(env, "shadow", "history")
            assert history.stdout.count("\n") == 2 and "promote" in history.stdout
        finally:
            for p in procs:
                p.stop()
