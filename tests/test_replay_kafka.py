"""`ia replay --topic`: deterministic, ranged, and isolated from production.

Through the real embedded broker and Redis: history is read with a consumer that
joins no group and commits nothing; decisions are byte-identical across runs;
production Redis keys, consumer group offsets, decisions, outcomes and the
actuator's webhook are untouched, even with a policy that would act.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer, TopicPartition

from ia.core.kafka import ensure_topics
from ia.core.settings import Topics
from ia.offline.topic_slice import READER_GROUP, SliceSpec, read_slice
from tests.kafka_client import produce, read_topic
from tests.support import IaProcess, WebhookSink, ia_env, wait_until

pytestmark = pytest.mark.integration

T0 = 1_700_000_000_000
STEP = 10_000
N = 300
ENTITIES = ("rk-web-1", "rk-web-2", "rk-web-3")
POLICY = """
version: 1
defaults: {{max_event_age_s: false}}  # historical timestamps
rules:
  - name: page
    match: {{entity: "rk-*"}}
    when: {{min_score: 0.8, min_confidence: 0.5, direction: up}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    mode: auto
"""


def value(entity: str, i: int, rng: random.Random) -> float:
    return 100 + rng.gauss(0, 2) + (400 if (entity, i) == ("rk-web-2", 250) else 0)


def produce_history(bootstrap: str, topic: str) -> list[tuple[int, int, str, int]]:
    """Telemetry whose broker timestamps equal its event times, plus one bad record;
    returns (partition, offset, entity, ts) of every good record."""
    rng = random.Random(5)
    placed: list[tuple[int, int, str, int]] = []
    p = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})

    def delivered(err, msg) -> None:
        assert err is None, err
        if msg.value() != b"not json":
            ev = json.loads(msg.value())
            placed.append((msg.partition(), msg.offset(), ev["entity"], ev["ts"]))

    for i in range(N):
        for entity in ENTITIES:
            ev = {"entity": entity, "metric": "latency_ms", "value": value(entity, i, rng),
                  "ts": T0 + i * STEP}
            p.produce(topic, key=entity.encode(), value=json.dumps(ev).encode(),
                      timestamp=ev["ts"], on_delivery=delivered)
    p.produce(topic, key=b"rk-bad", value=b"not json", timestamp=T0 + 5 * STEP,
              on_delivery=delivered)
    assert p.flush(30) == 0
    return placed


@pytest.fixture(scope="module")
def history(infra, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("replay-kafka")
    prefix = "rk" + tmp.name[-6:].replace("_", "")
    topics = Topics(prefix)
    ensure_topics(infra.kafka, topics.all(), 4)
    placed = produce_history(infra.kafka, topics.telemetry)
    return {"prefix": prefix, "topics": topics, "placed": placed, "tmp": tmp}


def replay(infra, prefix: str, *args: str, redis_url: str = "redis://127.0.0.1:1/0",
           check: bool = True) -> subprocess.CompletedProcess:
    # By default Redis points at a closed port: replay must not need it at all.
    env = {"KAFKA_BOOTSTRAP_SERVERS": infra.kafka, "REDIS_URL": redis_url,
           "IA_TOPIC_PREFIX": prefix, "IA_REDIS_PREFIX": prefix, "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "ia.cli", "replay", *args], env=env,
                          capture_output=True, text=True, check=check, timeout=300)


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_replay_from_topic_is_byte_identical(infra, history, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(POLICY.format(url="http://127.0.0.1:9/never"))
    topic = history["topics"].telemetry
    outs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.jsonl"
        proc = replay(infra, history["prefix"], "--topic", topic, "--policy", str(policy),
                      "--output", str(out))
        assert "1 dead letters" in proc.stderr, proc.stderr
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    rows = lines(tmp_path / "a.jsonl")
    assert len(rows) == N * len(ENTITIES)
    acted = [r for r in rows if r["action"]]
    assert [(r["entity"], r["ts"], r["mode"]) for r in acted] == \
        [("rk-web-2", T0 + 250 * STEP, "auto")]
    # Whole decisions too, and the same decisions as the offline replay of the same order.
    full = [tmp_path / f"full-{n}.jsonl" for n in (1, 2)]
    for out in full:
        replay(infra, history["prefix"], "--topic", topic, "--policy", str(policy),
               "--output", str(out), "--full")
    assert full[0].read_bytes() == full[1].read_bytes()
    decided = lines(full[0])
    assert {d["decision_id"] for d in decided} >= {r["decision_id"] for r in rows}
    assert all("rule_trace" in d and "features" in d for d in decided)


def test_time_and_offset_ranges(infra, history, tmp_path: Path) -> None:
    topic, placed = history["topics"].telemetry, history["placed"]
    lo, hi = T0 + 100 * STEP, T0 + 199 * STEP
    out = tmp_path / "range.jsonl"
    replay(infra, history["prefix"], "--topic", topic, "--from", str(lo), "--to", str(hi),
           "--output", str(out))
    rows = lines(out)
    assert len(rows) == 100 * len(ENTITIES)
    assert {r["ts"] for r in rows} == {T0 + i * STEP for i in range(100, 200)}

    part = placed[0][0]
    offsets = sorted(o for p, o, _, _ in placed if p == part)
    start, end = offsets[10], offsets[40]
    out = tmp_path / "offsets.jsonl"
    replay(infra, history["prefix"], "--topic", topic, "--from-offsets", f"{part}:{start}",
           "--to-offsets", f"{part}:{end}", "--output", str(out))
    expected = sorted((ts, e) for p, o, e, ts in placed if p == part and start <= o < end)
    assert sorted((r["ts"], r["entity"]) for r in lines(out)) == expected
    # ISO 8601 times are UTC; a range after the history is simply empty.
    out = tmp_path / "empty.jsonl"
    replay(infra, history["prefix"], "--topic", topic, "--from", "2100-01-01T00:00:00",
           "--output", str(out))
    assert out.read_text() == ""


def record_count(bootstrap: str, topic: str) -> int:
    # Reads to the end: the embedded broker's watermark query undercounts batched topics.
    return sum(len(recs) for recs in read_slice(bootstrap, SliceSpec(topic)).values())


def redis_snapshot(client, prefix: str) -> dict[bytes, bytes]:
    return {k: client.dump(k) for k in sorted(client.scan_iter(match=f"{prefix}*"))}


def committed(bootstrap: str, group: str, topic: str) -> list[tuple[int, int]]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False})
    try:
        tps = c.committed([TopicPartition(topic, p) for p in range(4)], timeout=10)
        return [(tp.partition, tp.offset) for tp in tps]
    finally:
        c.close()


def test_replay_never_touches_production_state_or_an_actuator(
        infra, history, redis_client, tmp_path: Path) -> None:
    prefix, topics = history["prefix"], history["topics"]
    with WebhookSink() as sink:
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(url=sink.url))
        env = ia_env(infra, prefix, policy)
        worker = IaProcess(["worker"], env, tmp_path / "worker.log").start()
        actuator = IaProcess(["actuate"], env, tmp_path / "actuator.log").start()
        try:
            # Production decides the same history and acts once (the spike).
            wait_until(lambda: sum(sink.calls.values()) == 1, 120,
                       f"production's action\n{worker.tail()}\n{actuator.tail()}")
            wait_until(lambda: record_count(infra.kafka, topics.decisions) >= N * 3, 60,
                       "production decisions")
            worker.stop()
            time.sleep(1.0)
            groups = {g: committed(infra.kafka, g, t) for g, t in
                      ((env["IA_APP_ID"], topics.telemetry),
                       (env["IA_ACTUATOR_APP_ID"], topics.decisions))}
            counts = {t: record_count(infra.kafka, t) for t in
                      (topics.decisions, topics.outcomes, topics.approvals)}
            keys = redis_snapshot(redis_client, prefix)
            assert any(b":f:" in k for k in keys), "production feature state expected"

            # The replay acts on the same spike (policy with the live webhook), with
            # production's Redis and prefix configured, to a replay topic.
            replay_topic = f"{prefix}.decisions.replay"
            replay(infra, prefix, "--topic", topics.telemetry, "--policy", str(policy),
                   "--output-topic", replay_topic, redis_url=infra.redis_url)
            refused = replay(infra, prefix, "--topic", topics.telemetry, "--policy",
                             str(policy), "--output-topic", topics.decisions,
                             redis_url=infra.redis_url, check=False)
            assert refused.returncode != 0 and "refusing" in refused.stderr
            time.sleep(3.0)  # an actuator fed by mistake would have called the sink by now

            replayed = read_topic(infra.kafka, replay_topic, until=lambda rs: len(rs) >= N * 3)
            assert len(replayed) == N * 3
            assert [d["mode"] for d in replayed if d["action"]] == ["auto"]
            assert sum(sink.calls.values()) == 1, "replay must never reach an actuator"
            assert {t: record_count(infra.kafka, t) for t in counts} == counts
            assert redis_snapshot(redis_client, prefix) == keys
            assert {g: committed(infra.kafka, g, t) for g, t in
                    ((env["IA_APP_ID"], topics.telemetry),
                     (env["IA_ACTUATOR_APP_ID"], topics.decisions))} == groups
            assert all(o < 0 for _, o in committed(infra.kafka, READER_GROUP,
                                                   topics.telemetry))
        finally:
            worker.stop()
            actuator.stop()


def test_backtest_from_topic_with_labels_from_the_feedback_topic(infra, history,
                                                                 tmp_path: Path) -> None:
    """Feedback on production decisions labels the backtest: a true positive marks a
    window around its decision, a false positive marks the entity as judged."""
    prefix, topics = history["prefix"], history["topics"]
    acting, quiet = tmp_path / "acting.yaml", tmp_path / "quiet.yaml"
    acting.write_text(POLICY.format(url="http://127.0.0.1:9/never"))
    quiet.write_text("version: 1\nrules: []\n")
    out = tmp_path / "decisions.jsonl"
    replay(infra, prefix, "--topic", topics.telemetry, "--output", str(out))
    rows = lines(out)
    spike = next(r for r in rows if r["entity"] == "rk-web-2" and r["ts"] == T0 + 250 * STEP)
    calm = next(r for r in rows if r["entity"] == "rk-web-1" and r["ts"] == T0 + 250 * STEP)
    feedback = [{"decision_id": spike["decision_id"], "label": "true_positive", "by": "sre",
                 "at": 1}, {"decision_id": calm["decision_id"], "label": "false_positive",
                            "by": "sre", "at": 1}]
    produce(infra.kafka, topics.feedback, feedback)
    env = {"KAFKA_BOOTSTRAP_SERVERS": infra.kafka, "REDIS_URL": "redis://127.0.0.1:1/0",
           "IA_TOPIC_PREFIX": prefix, "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "ia.cli", "backtest", "--baseline", str(acting),
                    "--candidate", str(quiet), "--topic", topics.telemetry,
                    "--labels-from-feedback", "--label-tolerance", "60", "--no-html",
                    "--out", str(tmp_path / "bt")], env=env, check=True, capture_output=True,
                   timeout=300)
    summary = json.loads((tmp_path / "bt" / "summary.json").read_text())
    assert summary["labels"]["windows"] == 1 and summary["labels"]["entities"] == 2
    base, cand = summary["baseline"]["quality"], summary["candidate"]["quality"]
    assert (base["recall"], base["precision"], base["time_to_detect_s"]["median"]) == \
        (1.0, 1.0, 60.0)
    assert (cand["recall"], cand["precision"]) == (0.0, None)
    assert (summary["diff"]["removed"], summary["diff"]["added"]) == (1, 0)
