"""Feature state across worker processes: crash and restart, partitions moving.

Real `ia worker` processes on the embedded broker and Redis.  However records
are split into batches, redelivered after a kill -9 or moved to another
worker, the feature state in Redis must end up byte for byte what a replay of
the same events through the memory store gives (telemetry is keyed by entity,
so each entity's records keep their order on one partition).
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from pathlib import Path

import httpx
import pytest

from ia.bench.features import enrich_batch
from ia.core.kafka import ensure_topics
from ia.core.redis import sync_client
from ia.core.settings import Topics
from ia.features.store import MemoryFeatureStore, RedisFeatureStore
from ia.runtime.embedded import free_port
from ia.schemas.models import TelemetryEvent
from tests.kafka_client import produce, read_topic
from tests.support import IaProcess, ia_env, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.slow]

OBSERVE_ONLY = "version: 1\nrules: []\n"
ENTITIES = 12
T0 = 1_732_492_800_000


def workload(seed: int, per_series: int = 120) -> list[dict]:
    """requests/errors per entity every 10 s, arriving up to a minute out of order, a
    few later than the allowed lateness, and deploys; entities interleaved at random,
    each entity's records in its arrival order."""
    rng = random.Random(seed)
    queues = []
    for e in range(ENTITIES):
        entity, rows = f"fw-{seed}-{e:02d}", []
        for i in range(per_series):
            ts = T0 + i * 10_000 + rng.randint(0, 999)
            rows.append((ts + rng.randint(0, 60_000), {
                "entity": entity, "metric": "requests", "ts": ts,
                "value": 1000.0 + rng.gauss(0, 20)}))
            rows.append((ts + rng.randint(0, 60_000), {
                "entity": entity, "metric": "errors", "ts": ts + 1,
                "value": float(rng.randint(0, 8))}))
            if i % 40 == 20:
                rows.append((ts, {"entity": entity, "metric": "deploy", "ts": ts,
                                  "value": 1.0, "kind": "event"}))
            if i % 50 == 49:  # far too late: counted and dropped
                rows.append((ts + 400_000, {"entity": entity, "metric": "requests",
                                            "ts": ts - 300_000, "value": 5000.0}))
        queues.append([r for _, r in sorted(rows, key=lambda x: x[0])])
    out = []
    while any(queues):
        out.append(rng.choice([q for q in queues if q]).pop(0))
    return out


async def replay(records: list[dict]) -> MemoryFeatureStore:
    store = MemoryFeatureStore()
    events = [TelemetryEvent.model_validate(r) for r in records]
    for i in range(0, len(events), 100):
        await enrich_batch(events[i:i + 100], store)
    return store


def feature_fields(raw: dict[bytes, bytes]) -> dict[bytes, bytes]:
    """What the feature store owns in an entity's hash (not detector or decision state,
    nor the Kafka position, which replay does not have)."""
    return {k: v for k, v in raw.items() if k.startswith((b"s1:", b"c:event:"))}


def assert_state_equals_replay(infra, prefix: str, records: list[dict]) -> None:
    expected = asyncio.run(replay(records))
    r = sync_client(infra.redis)
    store = RedisFeatureStore(None, prefix)
    try:
        for entity in sorted({rec["entity"] for rec in records}):
            online = feature_fields(r.hgetall(store.keys.entity(entity)))
            assert online, f"nothing stored for {entity}"
            assert online == feature_fields(expected.raw(entity)), entity
    finally:
        r.close()


def decided_all(infra, topic: str, records: list[dict], timeout_s: float = 240) -> None:
    want = {(r["entity"], r["metric"], r["ts"]) for r in records}
    got = read_topic(infra.kafka, topic, timeout_s=timeout_s,
                     until=lambda rs: {(d["entity"], d["metric"], d["ts"]) for d in rs} >= want)
    missing = want - {(d["entity"], d["metric"], d["ts"]) for d in got}
    assert not missing, f"{len(missing)} records without a decision"


def feed(bootstrap: str, topic: str, records: list[dict], pause_s: float = 0.05) -> None:
    for i in range(0, len(records), 100):
        produce(bootstrap, topic, records[i:i + 100], key=lambda r: r["entity"])
        time.sleep(pause_s)


def metrics_up(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def scrape(port: int, prefix: str) -> float:
    """Sum of the samples of a Prometheus metric (0 if the worker is not up)."""
    try:
        text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    except httpx.HTTPError:
        return 0.0
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith(prefix))


def events_in(port: int) -> float:
    return scrape(port, "ia_events_in_total{")


def redelivered(port: int) -> float:
    return scrape(port, 'ia_feature_late_events_total{outcome="redelivered"}')


def start_worker(env: dict, log: Path, port: int) -> IaProcess:
    return IaProcess(["worker"], {**env, "IA_METRICS_PORT": str(port)}, log).start()


@pytest.fixture
def setup(infra, tmp_path, topic_prefix):
    topics = Topics(topic_prefix)
    ensure_topics(infra.kafka, topics.all(), 4)
    policy = tmp_path / "policy.yaml"
    policy.write_text(OBSERVE_ONLY)
    env = ia_env(infra, topic_prefix, policy, IA_BATCH_SIZE="40")
    return topics, env


def test_worker_killed_mid_stream_and_restarted_keeps_feature_state(infra, tmp_path,
                                                                    topic_prefix, setup):
    topics, env = setup
    records = workload(seed=1)
    port = free_port()
    # No offset commit before the kill, so its records are certainly redelivered.
    worker = start_worker({**env, "IA_COMMIT_INTERVAL_S": "600", "IA_COMMIT_EVERY": "100000"},
                          tmp_path / "worker.log", port)
    try:
        feeder = threading.Thread(target=feed, args=(infra.kafka, topics.telemetry, records))
        feeder.start()
        wait_until(lambda: events_in(port) >= len(records) // 3, 180, "a third processed")
        worker.kill9()  # mid-stream: its last batches are delivered again
        worker = start_worker(env, tmp_path / "worker.log", port)
        feeder.join()
        decided_all(infra, topics.decisions, records)
        # records since the last commit came again, and were not folded twice
        assert redelivered(port) > 0
    finally:
        worker.stop()
    assert_state_equals_replay(infra, topic_prefix, records)


def test_partitions_moving_to_another_worker_keep_features_correct(infra, tmp_path,
                                                                   topic_prefix, setup):
    topics, env = setup
    records = workload(seed=2)
    ports = free_port(), free_port()
    a = start_worker(env, tmp_path / "a.log", ports[0])
    b = start_worker(env, tmp_path / "b.log", ports[1])
    try:
        wait_until(lambda: metrics_up(ports[0]) and metrics_up(ports[1]), 120, "workers up")
        feeder = threading.Thread(target=feed, args=(infra.kafka, topics.telemetry, records,
                                                     0.4))
        feeder.start()
        # both own partitions (one consumer group), then one dies mid-stream
        wait_until(lambda: events_in(ports[0]) > 0 and events_in(ports[1]) > 0, 180,
                   "both workers consuming")
        wait_until(lambda: events_in(ports[0]) + events_in(ports[1]) >= len(records) // 3, 180,
                   "a third processed")
        a.kill9()
        before = events_in(ports[1])
        feeder.join()
        decided_all(infra, topics.decisions, records)
        assert events_in(ports[1]) > before  # the survivor took over a's partitions
        # Whether any of a's records were still uncommitted at the kill depends on
        # timing (offsets commit every second), so redelivery is not asserted
        # here; the state comparison below fails if any record was folded twice.
    finally:
        a.stop()
        b.stop()
    assert_state_equals_replay(infra, topic_prefix, records)
