"""Reading whole topics with a plain consumer (no group, no commits)."""

from __future__ import annotations

import json
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition


def _consumer(bootstrap: str) -> Consumer:
    return Consumer({"bootstrap.servers": bootstrap, "group.id": "ia-reader",
                     "enable.auto.commit": False, "auto.offset.reset": "earliest"})


def record_count(bootstrap: str, topic: str) -> int:
    """Records currently in ``topic`` (sum of high minus low watermarks)."""
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
        ends = {p: c.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                for p in meta.partitions}
        pending = {p for p, hi in ends.items() if hi > 0}
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions])
        out: list[dict] = []
        deadline = time.monotonic() + timeout_s
        while pending and time.monotonic() < deadline:
            for m in c.consume(1000, timeout=0.2):
                if m.error():
                    continue
                if m.offset() < ends[m.partition()]:
                    out.append(json.loads(m.value()))
                if m.offset() >= ends[m.partition()] - 1:
                    pending.discard(m.partition())
        return out
    finally:
        c.close()
