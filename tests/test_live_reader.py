"""Two producers, one live reader: every record seen exactly once, on the embedded broker.

tansu 0.6 reserves a produce request's offsets before it stores the batch, so with two
producers on one partition a live fetch can return a later batch before an earlier one
is stored and move past it (see :mod:`ia.core.gaps`). The bench's live readers guard
against that; these tests pin it, prove the re-fetch on a real broker with a gap made on
purpose.
"""

from __future__ import annotations

import json
import random
import threading
import time
from collections import Counter

from confluent_kafka import Consumer, TopicPartition

from ia.bench.load import (
    Tap,
    TopicCounter,
    admitted,
    consume_ready,
    event_id_of,
    producer,
)
from ia.core.gaps import GapGuard, seeker
from ia.core.kafka import ensure_topics

PER_PRODUCER = 6_000
ROUNDS = 3


def _json(rec: dict) -> bytes:
    return json.dumps(rec, separators=(",", ":")).encode()


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
