"""Plain confluent-kafka helpers, as an external producer or consumer would write them.

Deliberately independent of the project's code: tests that use these prove
that a client knowing only the documented JSON contract can talk to ``ia``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable

from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition


def produce(
    bootstrap: str,
    topic: str,
    records: Iterable[dict | bytes],
    key: Callable[[dict], str] | None = None,
    partition: int | None = None,
) -> int:
    """Produce ``records``; ``partition`` places them all in one partition, whatever
    their keys."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all"})
    n = 0
    where = {} if partition is None else {"partition": partition}
    for r in records:
        value = r if isinstance(r, bytes) else json.dumps(r).encode()
        k = key(r).encode() if key and isinstance(r, dict) else None
        p.produce(topic, value=value, key=k, **where)
        n += 1
        if n % 1000 == 0:
            p.poll(0)
    assert p.flush(30) == 0, "not every record was delivered"
    return n


def read_topic(
    bootstrap: str,
    topic: str,
    *,
    until: Callable[[list[dict]], bool],
    timeout_s: float = 60.0,
    raw: bool = False,
) -> list:
    """Read ``topic`` from the beginning until ``until(records)`` holds or time runs out.

    Assigns all partitions directly (no consumer group), so reading starts at
    once and commits nothing.
    """
    c = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": "unused-reader",
            "enable.auto.commit": False,
            "auto.offset.reset": "earliest",
        }
    )
    meta = c.list_topics(topic, timeout=10).topics[topic]
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
    out: list = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for m in c.consume(500, timeout=0.2):
                if m.error():
                    continue
                out.append(m.value() if raw else json.loads(m.value()))
            if until(out):
                break
    finally:
        c.close()
    return out
