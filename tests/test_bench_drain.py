"""The figures ``ia bench`` reports when a drain wait times out: a fresh recount
(distinct ids, dead letters by their original), the group's committed offsets against
the partitions' real ends, and the verdict that tells a slow pipeline from a short count."""

from __future__ import annotations

import base64
import json

from confluent_kafka import Consumer, TopicPartition

from ia.bench.e2e import Bench, BenchOptions, Infra, Run, drain_verdict
from ia.bench.load import TopicCounter, group_progress, producer, recount, telemetry
from ia.core.kafka import ensure_topics


def _json(rec: dict) -> bytes:
    return json.dumps(rec, separators=(",", ":")).encode()  # as the pipeline writes JSON


def _commit(bootstrap: str, group: str, offsets: list[TopicPartition]) -> None:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False})
    try:
        c.commit(offsets=offsets, asynchronous=False)
    finally:
        c.close()


def test_recount_counts_distinct_ids_of_decisions_and_dead_letters(infra, topic_prefix):
    decisions, dlq = f"{topic_prefix}.decisions", f"{topic_prefix}.dlq"
    ensure_topics(infra.kafka, [decisions, dlq], 2)
    p = producer(infra.kafka, linger_ms=5)
    for i in range(10):
        p.produce(decisions, value=_json({"event_id": f"e{i}"}))
    p.produce(decisions, value=_json({"event_id": "e3"}))  # a duplicate
    original = _json({"entity": "x", "event_id": "e10"})
    p.produce(dlq, value=_json({"reason": "bad", "source_topic": "tel",
                                     "source_partition": 0, "source_offset": 7,
                                     "original_b64": base64.b64encode(original).decode()}))
    assert p.flush(10) == 0
    fresh = recount(infra.kafka, [decisions, dlq], {f"e{i}" for i in range(12)})
    assert (fresh.records, fresh.distinct_ids, fresh.found, fresh.wanted) == (12, 11, 11, 12)
    assert sum(fresh.ends[decisions].values()) == 11 and sum(fresh.ends[dlq].values()) == 1


def test_group_progress_reports_committed_offsets_against_the_end(infra, topic_prefix):
    topic, group = f"{topic_prefix}.telemetry", f"{topic_prefix}-pipeline"
    ensure_topics(infra.kafka, [topic], 2)
    p = producer(infra.kafka, linger_ms=5)
    for i in range(8):
        p.produce(topic, value=b"x", partition=i % 2)
    assert p.flush(10) == 0
    _commit(infra.kafka, group, [TopicPartition(topic, 0, 3)])
    assert group_progress(infra.kafka, group, topic) == {0: (3, 4), 1: (-1, 4)}


def test_a_drain_timeout_tells_a_slow_pipeline_from_a_short_count():
    assert drain_verdict(120, 0).startswith("slow pipeline: 120 telemetry records")
    assert drain_verdict(0, 7).startswith("lost:") and "7 backlog events" in drain_verdict(0, 7)
    assert drain_verdict(0, 0).startswith("short count:")


def test_diagnose_says_short_count_when_the_pipeline_is_done(infra, tmp_path):
    bench = Bench(BenchOptions(partitions=2), Infra(infra.kafka, infra.redis_url,
                                   redis_password_file=infra.redis_password_file),
                  tmp_path, log=lambda _m: None)
    run = Run(bench, "diag")
    backlog = list(telemetry(40, 10, run="bench"))
    p = producer(infra.kafka, linger_ms=5)
    for key, value in backlog:
        p.produce(run.topics.telemetry, key=key, value=value)
        p.produce(run.topics.decisions, key=key, value=value)  # carries the event_id
    assert p.flush(10) == 0
    counter = TopicCounter(infra.kafka, [run.topics.decisions, run.topics.dlq])
    try:
        slow = bench.diagnose(run, counter, backlog)
        progress = group_progress(infra.kafka, run.app_id, run.topics.telemetry)
        _commit(infra.kafka, run.app_id, [TopicPartition(run.topics.telemetry, part, end)
                                          for part, (_, end) in progress.items()])
        done = bench.diagnose(run, counter, backlog)
    finally:
        counter.close()
        with bench.sink:  # its server socket is bound at construction
            pass
    assert slow.startswith("slow pipeline: 40 telemetry records not committed yet")
    assert done.startswith("short count: the pipeline is done")
    assert "40 distinct ids, 40 of the 40 backlog events" in done
