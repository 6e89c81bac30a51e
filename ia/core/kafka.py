"""Reading whole topics with a plain consumer (no group, no commits)."""

from __future__ import annotations

import json
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition


def _consumer(bootstrap: str) -> Consumer:
    # Partition EOF events mark the end of each partition as seen by the
    # fetches themselves: some brokers (tansu) answer watermark queries with a
    # high watermark that lags the records a fetch returns.
    return Consumer({"bootstrap.servers": bootstrap, "group.id": "ia-reader",
                     "enable.auto.commit": False, "auto.offset.reset": "earliest",
                     "enable.partition.eof": True})


def from_beginning(bootstrap: str, topics: list[str], group: str = "ia-reader",
                   **config: object) -> Consumer:
    """A consumer assigned to every partition of ``topics`` from the first record: it
    joins no group and commits nothing (``config``: further librdkafka settings)."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False, "log.connection.close": False, **config})
    c.assign([TopicPartition(t, p, OFFSET_BEGINNING)
              for t in topics for p in c.list_topics(t, timeout=10).topics[t].partitions])
    return c


def record_count(bootstrap: str, topic: str) -> int:
    """Approximate records in ``topic`` (sum of watermark ranges); cheap, may lag."""
    c = _consumer(bootstrap)
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        total = 0
        for p in meta.partitions:
            lo, hi = c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            total += hi - lo
        return total
    finally:
        c.close()


def read_all(bootstrap: str, topic: str, timeout_s: float = 60.0) -> list[dict]:
    """Every JSON record in ``topic`` up to its current end, in partition order."""
    c = _consumer(bootstrap)
    try:
        meta = c.list_topics(topic, timeout=10).topics[topic]
        pending = set(meta.partitions)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        out: list[dict] = []
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for m in c.consume(1000, timeout=0.2):
                err = m.error()
                if err is None:
                    out.append(json.loads(m.value()))
                elif err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(m.partition())
        return out
    finally:
        c.close()
