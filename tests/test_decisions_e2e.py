"""Issue 4 acceptance through the real broker and Redis: learning from feedback
labels on ``<prefix>.feedback``, and model state that survives a worker's SIGTERM,
its ``kill -9`` and the move of its partitions to another worker."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import re
import uuid
from collections import defaultdict

import httpx
import pytest

from ia.core.kafka import ensure_topics
from ia.core.keys import Keys
from ia.core.settings import Topics
from ia.decisions.detector import DetectorState
from ia.decisions.feedback import FeedbackClassifier, inputs_of
from ia.decisions.learning import MODEL_NAME
from ia.decisions.policy import Policy
from ia.features.store import EntityRecord
from ia.offline.run import Runner, Variant
from ia.runtime.embedded import free_port
from ia.schemas.models import Decision, TelemetryEvent
from tests.kafka_client import produce, read_topic
from tests.support import IaProcess, WebhookSink, ia_env, signed_label, wait_until

T0 = 1_700_000_000_000
STEP_MS = 10_000
SPIKE = 400.0

# --- learning from feedback ----------------------------------------------------------------

# The autonomy ladder makes the loss of trust visible step by step: auto, then
# needs_approval, then notify, then no action at all.
FEEDBACK_POLICY = """
version: 1
defaults: {{cooldown_s: 0, max_event_age_s: false}}  # historical timestamps
rules:
  - name: page-on-latency
    match: {{entity: "fb-*", metric: latency_ms}}
    when: {{min_score: 0.8, direction: up}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    mode: auto
    autonomy: {{auto_above: 0.5, approval_above: 0.2, notify_above: 0.08}}
"""


class Feed:
    """Telemetry for a few entities, each a continuing series with a spike at the end
    of every segment (at least 55 samples apart: the detector's alert suppression
    caps scores for 50 samples after an alert)."""

    def __init__(self, kafka: str, prefix: str) -> None:
        self.kafka, self.prefix = kafka, prefix
        self.next: dict[str, int] = defaultdict(int)
        self.rng = random.Random(7)

    def segment(self, entities: list[str], normal: int) -> dict[str, int]:
        records, spikes = [], {}
        for e in entities:
            for _ in range(normal):
                records.append(self._event(e, 100.0 + self.rng.gauss(0, 2)))
            spikes[e] = records[-1]["ts"] + STEP_MS
            records.append(self._event(e, SPIKE))
        produce(self.kafka, f"{self.prefix}.telemetry", records, key=lambda r: r["entity"])
        return spikes

    def _event(self, entity: str, value: float) -> dict:
        i = self.next[entity]
        self.next[entity] += 1
        return {"entity": entity, "metric": "latency_ms", "value": value,
                "ts": T0 + i * STEP_MS}


@pytest.fixture(scope="module")
def fb_loop(infra, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fbloop")
    prefix = f"fb{uuid.uuid4().hex[:8]}"  # Redis and topics may outlive one session
    with WebhookSink() as sink:
        policy = tmp / "policy.yaml"
        policy.write_text(FEEDBACK_POLICY.format(url=sink.url))
        env = ia_env(infra, prefix, policy)
        ensure_topics(infra.kafka, Topics(prefix).all(), 4)
        worker = IaProcess(["worker"], env, tmp / "worker.log").start()
        actuator = IaProcess(["actuate"], env, tmp / "actuator.log").start()
        try:
            yield {"prefix": prefix, "sink": sink, "infra": infra, "worker": worker,
                   "actuator": actuator}
        finally:
            worker.kill9()  # nothing is left to finish: no need to wait for a clean stop
            actuator.kill9()


def _spike_decisions(loop, spikes: dict[str, int]) -> dict[str, dict]:
    want = {(e, ts) for e, ts in spikes.items()}
    recs = read_topic(loop["infra"].kafka, f"{loop['prefix']}.decisions", timeout_s=60,
                      until=lambda rs: want <= {(r["entity"], r["ts"]) for r in rs})
    found = {r["entity"]: r for r in recs if (r["entity"], r["ts"]) in want}
    assert set(found) == set(spikes), f"missing spike decisions\n{loop['worker'].tail()}"
    return found


def _model(redis_client, prefix: str) -> tuple[int, bytes | None]:
    raw = redis_client.hmget(Keys(prefix).model(MODEL_NAME), "version", "blob")
    return (int(raw[0]) if raw[0] else 0), raw[1]


def _label(loop, redis_client, decision: dict, label: str, *, with_entity: bool,
           version: int) -> None:
    """Produce one label as a human or tool would, and wait until it is learnt."""
    fb = {"decision_id": decision["decision_id"], "label": label, "by": "oncall@example.com",
          "at": 1}
    if with_entity:
        fb["entity"] = decision["entity"]
    # One key: labels are applied in the order they were given.
    produce(loop["infra"].kafka, f"{loop['prefix']}.feedback", [signed_label(fb)],
            key=lambda _r: "labels")
    wait_until(lambda: _model(redis_client, loop["prefix"])[0] == version, 30,
               f"feedback model version {version}\n{loop['worker'].tail()}")


def _feedback_version(d: dict) -> str:
    (info,) = [m for m in d["explanation"]["models"] if m["id"] == "feedback-logreg"]
    return info["version"]


def _p_on(blob: bytes | None, decision: dict) -> float:
    """The checkpointed classifier's P(useful) for a published decision's inputs."""
    x = inputs_of(Decision.model_validate(decision))
    assert x is not None
    return FeedbackClassifier.loads(blob).predict(x).p_useful


def _counters(redis_client, prefix: str, entity: str) -> dict[str, str]:
    raw = redis_client.hgetall(Keys(prefix).entity(entity))
    return EntityRecord.from_hash(raw).context


@pytest.mark.integration
@pytest.mark.slow
def test_feedback_labels_through_the_topics_lower_then_restore_trust(fb_loop, redis_client):
    """Spike -> auto action -> outcome; false_positive labels on the feedback topic
    make the shared classifier (a new Redis checkpoint per label) and the entity's
    own record withhold trust until the rule no longer acts; a true_positive label
    gives some back."""
    loop, prefix = fb_loop, fb_loop["prefix"]
    feed = Feed(loop["infra"].kafka, prefix)
    assert _model(redis_client, prefix)[0] == 0

    # 1. Both entities: a spike, full confidence, an automatic action that succeeds.
    first = _spike_decisions(loop, feed.segment(["fb-1", "fb-2"], 60))
    for d in first.values():
        assert d["anomaly_score"] >= 0.95, d
        assert d["action"]["type"] == "webhook" and d["mode"] == "auto", d["rule_trace"]
        assert d["explanation"]["p_useful"] == 0.5  # nothing learnt yet
        assert d["confidence"] == d["anomaly_score"]
        assert _feedback_version(d) == "1.0"
    ids = {d["decision_id"] for d in first.values()}
    outcomes = read_topic(loop["infra"].kafka, f"{prefix}.outcomes", timeout_s=60,
                          until=lambda rs: ids <= {o["decision_id"] for o in rs})
    assert {o["decision_id"]: o["status"] for o in outcomes
            if o["decision_id"] in ids} == dict.fromkeys(ids, "succeeded"), \
        loop["actuator"].tail()
    assert all(loop["sink"].calls[i] == 1 for i in ids)

    # Labelled false positives, the first by decision id alone; each label is one
    # new version of the shared model.
    d1, e1 = first["fb-1"], first["fb-2"]
    _label(loop, redis_client, d1, "false_positive", with_entity=False, version=1)
    _, blob1 = _model(redis_client, prefix)
    assert _p_on(blob1, d1) < 0.5
    _label(loop, redis_client, e1, "false_positive", with_entity=True, version=2)
    assert _counters(redis_client, prefix, "fb-1")["fp:webhook"] == "1"

    # 2. The next comparable spike: same score, less trust: approval needed.
    second = _spike_decisions(loop, feed.segment(["fb-1", "fb-2"], 55))
    d2, e2 = second["fb-1"], second["fb-2"]
    for before, after in ((d1, d2), (e1, e2)):
        assert after["anomaly_score"] >= before["anomaly_score"] - 1e-6
        assert after["explanation"]["p_useful"] < before["explanation"]["p_useful"]
        assert after["confidence"] < before["confidence"] / 2
        assert after["mode"] == "needs_approval" and after["action"]["type"] == "webhook"
        assert _feedback_version(after) == "1.2"  # the worker decided with the new model

    # A pending approval request labelled a false positive by decision id alone.
    _label(loop, redis_client, d2, "false_positive", with_entity=False, version=3)

    # 3. fb-1 again: lower still; only a notification.
    d3 = _spike_decisions(loop, feed.segment(["fb-1"], 55))["fb-1"]
    assert d3["explanation"]["p_useful"] < d2["explanation"]["p_useful"]
    assert d3["confidence"] < d2["confidence"]
    assert d3["mode"] == "notify" and d3["action"] is not None
    _label(loop, redis_client, d3, "false_positive", with_entity=True, version=4)

    # 4. After three false positives the rule no longer fires, and says why.
    d4 = _spike_decisions(loop, feed.segment(["fb-1"], 55))["fb-1"]
    assert d4["anomaly_score"] >= 0.95
    assert d4["action"] is None and d4["mode"] == "none"
    reason = d4["rule_trace"][-1]["reason"]
    assert d4["rule_trace"][-1]["rule"] == "page-on-latency"
    assert "confidence" in reason and "below the autonomy ladder" in reason, reason
    assert d4["explanation"]["p_useful"] < d3["explanation"]["p_useful"]
    assert _counters(redis_client, prefix, "fb-1")["fp:webhook"] == "3"

    # 5. true_positive on fb-2's pending request: the classifier moves towards
    # "useful" for that decision, and fb-2's next spike gets more confidence
    # (its record is 1 right, 1 wrong instead of 0 right, 1 wrong).
    _, blob4 = _model(redis_client, prefix)
    _label(loop, redis_client, e2, "true_positive", with_entity=True, version=5)
    _, blob5 = _model(redis_client, prefix)
    assert _p_on(blob5, e2) > _p_on(blob4, e2)
    e3 = _spike_decisions(loop, feed.segment(["fb-2"], 55))["fb-2"]
    assert e3["anomaly_score"] >= e2["anomaly_score"] - 1e-6
    assert e3["confidence"] > e2["confidence"] * 1.3
    assert e3["action"] is not None and e3["mode"] == "needs_approval"
    assert _feedback_version(e3) == "1.5"

    # A label counts once, however often it is delivered.
    produce(loop["infra"].kafka, f"{prefix}.feedback",
            [signed_label({"decision_id": d3["decision_id"], "label": "false_positive",
                           "by": "x", "at": 2, "entity": "fb-1"})], key=lambda _r: "labels")
    _label(loop, redis_client, e3, "true_positive", with_entity=True, version=6)
    assert _counters(redis_client, prefix, "fb-2")["tp:webhook"] == "2"
    assert _counters(redis_client, prefix, "fb-1")["fp:webhook"] == "3"


# --- persistence: restart, kill -9, partition reassignment ---------------------------------

OBSERVE_ONLY = "version: 1\nrules: []\n"
# One entity per partition of a 4-partition topic (the producer's partitioner
# hashes the key); the test checks that both workers really got some of them.
ENTITIES = ["ps-0", "ps-1", "ps-4", "ps-5"]
# Phase boundaries (samples per entity): more than the detector's 300 learning
# samples before the first hand-over, so the likelihood layer's state matters.
PHASES = (0, 320, 380, 440)


def persistence_events(lo: int, hi: int) -> list[dict]:
    out = []
    for i in range(lo, hi):
        for k, e in enumerate(ENTITIES):
            rng = random.Random(f"{e}:{i}")
            v = 50.0 + 10 * k + rng.gauss(0, 1.0 + k % 3)
            if i == 330 + 3 * k:  # spikes after the first hand-over
                v += 40.0
            if i >= 400 and k % 2:  # a level shift after the second one
                v += 15.0
            out.append({"entity": e, "metric": "load", "value": v, "ts": T0 + i * STEP_MS})
    return out


def offline(events: list[dict], batch: int = 500) -> dict[str, dict]:
    """The same engine without Kafka or Redis, event time as its clock."""

    async def run() -> list[Decision]:
        runner = Runner(Variant("observe-only", "<test>", Policy.from_text(OBSERVE_ONLY)))
        out: list[Decision] = []
        for i in range(0, len(events), batch):
            batch_events = [TelemetryEvent.model_validate(e) for e in events[i:i + batch]]
            out.extend(await runner.decide(batch_events))
        return out

    return {d.decision_id: _comparable(json.loads(d.model_dump_json()))
            for d in asyncio.run(run())}


def _comparable(d: dict) -> dict:
    return {k: v for k, v in d.items() if k != "decided_at"}


def _first_decisions(kafka: str, topic: str, n: int) -> dict[str, dict]:
    """The first published decision of each event (a redelivered batch may add later ones)."""
    recs = read_topic(kafka, topic, timeout_s=60,
                      until=lambda rs: len({r["decision_id"] for r in rs}) >= n)
    first: dict[str, dict] = {}
    for r in recs:
        first.setdefault(r["decision_id"], _comparable(r))
    assert len(first) >= n, f"{len(first)} of {n} decisions"
    return first


def _assigned(worker: IaProcess, topic: str) -> set[int]:
    """Telemetry partitions of the worker's latest assignment, from its log."""
    text = worker.log.read_text(errors="replace")
    at = text.rfind("Setting newly assigned partitions")
    if at < 0:
        return set()
    block = text[at:text.find("for group", at)]
    m = re.search(r"\|\s*" + re.escape(topic) + r"\s*\|\s*\{([\d, -]*)\}", block)
    out: set[int] = set()
    for part in (m.group(1).split(",") if m else []):  # faust writes {0, 2} or {0-3}
        lo, _, hi = part.strip().partition("-")
        if lo:
            out.update(range(int(lo), int(hi or lo) + 1))
    return out


def _events_in(port: int, topic: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    m = re.search(r'ia_events_in_total\{topic="' + re.escape(topic) + r'"\} (\S+)', text)
    return float(m.group(1)) if m else 0.0


def _detector_n(redis_client, prefix: str, entity: str) -> int:
    raw = redis_client.hgetall(Keys(prefix).entity(entity))
    return DetectorState.unpack(EntityRecord.from_hash(raw).detectors.get("load", b"")).n


@pytest.mark.integration
@pytest.mark.slow
def test_state_survives_sigterm_reassignment_and_kill9(infra, tmp_path, topic_prefix,
                                                      redis_client):
    """Two workers share the series; one is stopped (SIGTERM) and the other takes its
    partitions over; that one is killed (-9) and a new one starts alone. Every
    decision equals an offline replay of the whole sequence: no state was lost,
    reset or learnt twice."""
    topics = Topics(topic_prefix)
    ensure_topics(infra.kafka, topics.all(), 4)
    policy = tmp_path / "policy.yaml"
    policy.write_text(OBSERVE_ONLY)
    ports = [free_port(), free_port(), free_port()]

    def worker(i: int) -> IaProcess:
        # Short sessions: the group notices a departed or dead member sooner.
        env = ia_env(infra, topic_prefix, policy, IA_LOG_LEVEL="info",
                     IA_METRICS_PORT=str(ports[i]), IA_SESSION_TIMEOUT_S="3",
                     IA_HEARTBEAT_INTERVAL_S="0.5")
        return IaProcess(["worker"], env, tmp_path / f"worker{i}.log").start()

    phase = [persistence_events(lo, hi) for lo, hi in itertools.pairwise(PHASES)]
    a, b = worker(0), worker(1)
    c = None
    try:
        # What the workers should decide, computed while they join their group.
        expected = offline([e for p in phase for e in p])
        fresh = [offline(p) for p in phase[1:]]
        wait_until(lambda: _assigned(a, topics.telemetry) and _assigned(b, topics.telemetry)
                   and _assigned(a, topics.telemetry) | _assigned(b, topics.telemetry)
                   == {0, 1, 2, 3}, 60, f"both workers in the group\n{a.tail()}\n{b.tail()}")

        # Phase 1: a and b each own half of the entities.
        produce(infra.kafka, topics.telemetry, phase[0], key=lambda r: r["entity"])
        done = len(phase[0])
        _first_decisions(infra.kafka, topics.decisions, done)
        assert _events_in(ports[0], topics.telemetry) > 0
        assert _events_in(ports[1], topics.telemetry) > 0
        assert all(_detector_n(redis_client, topic_prefix, e) == PHASES[1] for e in ENTITIES)

        # Phase 2: a stops (SIGTERM); b continues a's entities from their saved state.
        a.stop()
        wait_until(lambda: _assigned(b, topics.telemetry) == {0, 1, 2, 3}, 60,
                   f"b takes over every partition\n{b.tail()}")
        before = _events_in(ports[1], topics.telemetry)
        produce(infra.kafka, topics.telemetry, phase[1], key=lambda r: r["entity"])
        done += len(phase[1])
        _first_decisions(infra.kafka, topics.decisions, done)
        assert _events_in(ports[1], topics.telemetry) - before >= len(phase[1])

        # Phase 3: b is killed (-9); c starts alone and continues every entity.
        b.kill9()
        c = worker(2)
        produce(infra.kafka, topics.telemetry, phase[2], key=lambda r: r["entity"])
        done += len(phase[2])
        live = _first_decisions(infra.kafka, topics.decisions, done)
        # The restored state is the whole history, each sample learnt once.
        assert all(_detector_n(redis_client, topic_prefix, e) == PHASES[-1]
                   for e in ENTITIES)
    finally:
        a.stop()
        for w in (b, c):
            if w:
                w.kill9()  # graceful shutdown is a's part; these need not wait

    assert set(live) == set(expected)
    wrong = [k for k in expected if live[k] != expected[k]]
    if wrong:
        k = wrong[0]
        diff = {f: (live[k].get(f), expected[k].get(f)) for f in expected[k]
                if live[k].get(f) != expected[k].get(f)}
        pytest.fail(f"{len(wrong)} of {len(expected)} decisions differ from the offline "
                    f"replay; first {live[k]['entity']}@{live[k]['ts']}: {diff}")

    # And state mattered: starting afresh at a hand-over would have decided otherwise.
    for lo, alone in zip(PHASES[1:], fresh, strict=False):
        assert any(alone[k]["anomaly_score"] != expected[k]["anomaly_score"] for k in alone)
        firsts = [expected[k] for k in alone if expected[k]["ts"] == T0 + lo * STEP_MS]
        assert firsts and all(d["features"]["n"] >= lo for d in firsts)  # no warm-up again
    # The series were not trivial: spikes and a level shift came after hand-overs.
    assert min(d["anomaly_score"] for d in expected.values()
               if d["ts"] == T0 + (330 + 3 * ENTITIES.index(d["entity"])) * STEP_MS) >= 0.5
    assert any(d["explanation"]["drift_event"] for d in expected.values())


def test_decisions_do_not_depend_on_batch_boundaries():
    """The worker's batches are whatever the consumer fetched; replay's are fixed.
    Both must decide alike -- including after a drift re-baselines a series."""
    events = persistence_events(0, PHASES[-1])
    by_500 = offline(events)
    by_37 = offline(events, batch=37)
    assert any(d["explanation"]["drift_event"] for d in by_500.values())
    assert by_37 == by_500
