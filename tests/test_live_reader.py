"""Two producers, one live reader: every record seen exactly once, on the embedded broker.

tansu 0.6 reserves a produce request's offsets before it stores the batch, so with two
producers on one partition a live fetch can return a later batch before an earlier one
is stored and move past it (see :mod:`ia.core.gaps`). The bench's live readers guard
against that; these tests pin it, prove the re-fetch on a real broker with a gap made on
purpose, and check the figures a drain timeout reports.
"""

from __future__ import annotations

import base64
import json
import random
import threading
import time
from collections import Counter

from confluent_kafka import Consumer, TopicPartition

from ia.bench.e2e import drain_verdict
from ia.bench.load import (
    Tap,
    TopicCounter,
    admitted,
    consume_ready,
    event_id_of,
    group_progress,
    producer,
    recount,
)
from ia.core.gaps import GapGuard, seeker
from ia.core.kafka import ensure_topics

PER_PRODUCER = 6_000
ROUNDS = 3


def _json(rec: dict) -> bytes:
    return json.dumps(rec, separators=(",", ":")).encode()  # as the pipeline writes JSON


def _produce(bootstrap: str, topic: str, tag: str, n: int) -> None:
    # linger 0: many small produce requests, so the two producers' batches interleave
    # in every partition (the case in which the broker can serve them out of order).
    p = producer(bootstrap, linger_ms=0)
    rng = random.Random(tag)
    for i in range(n):
        p.produce(topic, key=f"k{rng.randrange(500)}".encode(),
                  value=_json({"event_id": f"{tag}-{i}"}))
        if i % 200 == 0:
            p.poll(0)
    assert p.flush(60) == 0


def _two_producers(bootstrap: str, topic: str) -> set[str]:
    threads = [threading.Thread(target=_produce, args=(bootstrap, topic, f"p{k}", PER_PRODUCER))
               for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    return {f"p{k}-{i}" for k in range(2) for i in range(PER_PRODUCER)}


def _wait(pred, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred() and time.monotonic() < deadline:
        time.sleep(0.05)


def _round(bootstrap: str, topic: str) -> tuple[set[str], Counter, TopicCounter, Tap]:
    """Two producers append to ``topic`` while a TopicCounter and a Tap read it live."""
    ensure_topics(bootstrap, [topic], 4)
    counter = TopicCounter(bootstrap, [topic])
    tap = Tap(bootstrap, {topic: None})
    try:
        sent = _two_producers(bootstrap, topic)
        _wait(lambda: counter.count() >= len(sent) and len(tap.received) >= len(sent), 30)
        time.sleep(0.3)  # a duplicate would arrive now
        return sent, Counter(event_id_of(v) for _, v, _ in tap.received), counter, tap
    finally:
        counter.close()
        tap.close()


def test_two_producers_one_live_reader_every_record_seen_exactly_once(infra, topic_prefix):
    for r in range(ROUNDS):
        sent, seen, counter, tap = _round(infra.kafka, f"{topic_prefix}.r{r}")
        print(f"round {r}: counter gaps {counter.gaps.stats}, tap gaps {tap.gaps.stats}")
        assert set(seen) == sent, f"round {r}: {len(sent - set(seen))} records never seen live"
        assert max(seen.values()) == 1, f"round {r}: a record was seen twice"
        assert counter.count() == len(sent)
        assert counter.gaps.stats.accepted == 0 and tap.gaps.stats.accepted == 0
        assert counter.errors == [] and tap.errors == []


def test_a_live_reader_fetches_a_skipped_range_again(infra, topic_prefix):
    """A reader that the broker moved past offsets 0..11 seeks back and reads them once."""
    topic = f"{topic_prefix}.skip"
    ensure_topics(infra.kafka, [topic], 1)
    p = producer(infra.kafka, linger_ms=50)
    for batch in range(3):
        for i in range(10):
            p.produce(topic, value=f"{batch}-{i}".encode(), partition=0)
        p.flush(10)
    c = Consumer({"bootstrap.servers": infra.kafka, "group.id": "ia-test-skip",
                  "enable.auto.commit": False})
    c.assign([TopicPartition(topic, 0, 12)])  # as if the fetch had returned 12.. first
    guard = GapGuard(seeker(c))
    guard.expect(topic, 0, 0)
    got: list[int] = []
    errors: list[str] = []
    try:
        deadline = time.monotonic() + 20
        while len(got) < 30 and time.monotonic() < deadline:
            got += [m.offset() for m in admitted(consume_ready(c, 0.1), guard, errors)]
        time.sleep(0.2)
        got += [m.offset() for m in admitted(consume_ready(c, 0.1), guard, errors)]
    finally:
        c.close()
    assert got == list(range(30))
    assert guard.stats.gaps == 1 and guard.stats.refetched == 1 and guard.stats.seeks >= 1


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
    c = Consumer({"bootstrap.servers": infra.kafka, "group.id": group,
                  "enable.auto.commit": False})
    try:
        c.commit(offsets=[TopicPartition(topic, 0, 3)], asynchronous=False)
    finally:
        c.close()
    assert group_progress(infra.kafka, group, topic) == {0: (3, 4), 1: (-1, 4)}


def test_a_drain_timeout_tells_a_slow_pipeline_from_a_short_count():
    assert drain_verdict(120, 0).startswith("slow pipeline: 120 telemetry records")
    assert drain_verdict(0, 7).startswith("lost:") and "7 backlog events" in drain_verdict(0, 7)
    assert drain_verdict(0, 0).startswith("short count:")
