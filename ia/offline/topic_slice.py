"""Read a slice of a topic's history with a consumer of our own.

Used by ``ia replay --topic``, ``ia backtest --topic``, ``ia record`` and
``ia shadow report``.  The consumer assigns partitions directly: it never
joins a consumer group and never commits, so production groups (the worker's,
the actuator's) are untouched and any number of replays can run at once.

A slice is, per partition, the offsets ``[start, end)``:

* ``start``: the first offset whose broker timestamp is at or after ``--from``
  (what Kafka's ``offsets_for_times`` answers), or a ``--from-offsets`` offset,
  or the beginning;
* ``end``: the first offset whose timestamp is after ``--to``, or a
  ``--to-offsets`` offset, or the end of the partition when the reader gets
  there.

``offsets_for_times`` is only used as a starting point and the timestamps are
checked while reading, because some Kafka-compatible brokers (the embedded
tansu among them) answer it with the log start.  For the same reason the end
of a partition is taken from the consumer's end-of-partition event, not from
a watermark query.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, TopicPartition

from ia.core.errors import ConfigError, IaError, UsageError
from ia.core.kafka import Brokers, consumer
from ia.core.settings import KafkaSettings, Settings
from ia.core.times import TimeFormatError, parse_time
from ia.offline.recording import Partitions, RawRecord

# A group id librdkafka needs for its configuration; with assign() and no
# commits it is never joined, so it cannot disturb any real group.
READER_GROUP = "ia-history-reader-no-commit"
IDLE_LIMIT_S = 30.0


class SliceError(IaError):
    """The slice cannot be read (unknown topic, broker gone)."""


def require_kafka(settings: Settings) -> KafkaSettings:
    """The Kafka settings, with a broker; unlike the worker, reading history needs (and
    opens) no Redis."""
    if not settings.kafka.bootstrap_servers:
        raise ConfigError('KAFKA_BOOTSTRAP_SERVERS must be set (eval "$(ia up)" '
                          "starts an embedded broker)")
    return settings.kafka


def parse_offsets(text: str) -> dict[int, int]:
    """``"0:120,1:98"`` -> ``{0: 120, 1: 98}`` (partition: offset)."""
    out: dict[int, int] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        p, sep, o = part.partition(":")
        if not sep or not p.strip().isdigit() or not o.strip().isdigit():
            raise UsageError(f"bad offsets {text!r}: expected PARTITION:OFFSET[,...]")
        out[int(p)] = int(o)
    if not out:
        raise UsageError("no offsets given")
    return out


@dataclass(frozen=True)
class SliceSpec:
    topic: str
    start_ms: int | None = None
    end_ms: int | None = None
    # Partition -> first offset; partitions not listed are not read.
    from_offsets: dict[int, int] | None = None
    # Partition -> end offset (exclusive); partitions not listed are read to their end.
    to_offsets: dict[int, int] | None = None

    @classmethod
    def from_options(cls, topic: str, from_time: str | None = None,
                     to_time: str | None = None, from_offsets: str | None = None,
                     to_offsets: str | None = None) -> SliceSpec:
        """The slice that ``--from/--to/--from-offsets/--to-offsets`` name."""
        try:
            return cls(topic=topic,
                       start_ms=parse_time(from_time) if from_time else None,
                       end_ms=parse_time(to_time) if to_time else None,
                       from_offsets=parse_offsets(from_offsets) if from_offsets else None,
                       to_offsets=parse_offsets(to_offsets) if to_offsets else None)
        except TimeFormatError as exc:
            raise UsageError(str(exc)) from None

    def describe(self) -> dict[str, Any]:
        """The range as given, for headers and reports."""
        out: dict[str, Any] = {}
        if self.start_ms is not None:
            out["from_ms"] = self.start_ms
        if self.end_ms is not None:
            out["to_ms"] = self.end_ms
        if self.from_offsets:
            out["from_offsets"] = {str(p): o for p, o in sorted(self.from_offsets.items())}
        if self.to_offsets:
            out["to_offsets"] = {str(p): o for p, o in sorted(self.to_offsets.items())}
        return out


@dataclass
class _Progress:
    """Per partition: whether its start was reached and whether it is finished."""

    started: set[int] = field(default_factory=set)
    done: set[int] = field(default_factory=set)


def _consumer(kafka: Brokers) -> Consumer:
    return consumer(kafka, READER_GROUP, {
        "enable.auto.commit": False,
        "enable.auto.offset.store": False,
        "enable.partition.eof": True,
        # An offset outside the log is an error, never a silent jump to the start.
        "auto.offset.reset": "error",
        "isolation.level": "read_committed",
    })


def _partitions(c: Consumer, topic: str) -> list[int]:
    meta = c.list_topics(topic, timeout=10).topics.get(topic)
    if meta is None or meta.error is not None or not meta.partitions:
        raise SliceError(f"topic {topic!r} does not exist")
    return sorted(meta.partitions)


def _start_offsets(c: Consumer, spec: SliceSpec, partitions: list[int]) -> dict[int, int]:
    """Where to start reading each partition; a partition missing from the result
    has nothing in the slice."""
    if spec.from_offsets is not None:
        unknown = set(spec.from_offsets) - set(partitions)
        if unknown:
            raise SliceError(f"{spec.topic} has no partition {sorted(unknown)}")
        return dict(spec.from_offsets)
    if spec.start_ms is None:
        return {p: OFFSET_BEGINNING for p in partitions}
    found = c.offsets_for_times([TopicPartition(spec.topic, p, spec.start_ms)
                                 for p in partitions], timeout=10)
    # -1: no record at or after start_ms in that partition.
    return {tp.partition: tp.offset for tp in found if tp.offset >= 0}


def _keep(m: Any, spec: SliceSpec, progress: _Progress) -> bool:
    """Whether message ``m`` is in the slice; marks its partition done past the end."""
    p, offset = m.partition(), m.offset()
    _, ts = m.timestamp()
    if spec.to_offsets and p in spec.to_offsets and offset >= spec.to_offsets[p]:
        progress.done.add(p)
        return False
    if p not in progress.started:
        if spec.start_ms is not None and ts < spec.start_ms:
            return False
        progress.started.add(p)
    if spec.end_ms is not None and ts > spec.end_ms:
        progress.done.add(p)
        return False
    return True


def read_slice(kafka: Brokers, spec: SliceSpec, timeout_s: float = 600.0) -> Partitions:
    """Every record of the slice, per partition in offset order."""
    c = _consumer(kafka)
    try:
        starts = _start_offsets(c, spec, _partitions(c, spec.topic))
        return _consume(c, spec, starts, timeout_s)
    finally:
        c.close()


def _consume(c: Consumer, spec: SliceSpec, starts: dict[int, int],
             timeout_s: float) -> Partitions:
    out: Partitions = {p: [] for p in starts}
    progress = _Progress()
    for p, start in starts.items():
        end = (spec.to_offsets or {}).get(p)
        if end is not None and start >= 0 and start >= end:
            progress.done.add(p)
    todo = [TopicPartition(spec.topic, p, o) for p, o in sorted(starts.items())
            if p not in progress.done]
    if not todo:
        return out
    c.assign(todo)
    deadline, last_seen = time.monotonic() + timeout_s, time.monotonic()
    while len(progress.done) < len(starts):
        now = time.monotonic()
        if now > deadline or now - last_seen > IDLE_LIMIT_S:
            missing = sorted(set(starts) - progress.done)
            raise SliceError(f"{spec.topic}: partitions {missing} not read to the end of the "
                             f"slice (broker unreachable or too slow)")
        for m in c.consume(1000, timeout=0.5):
            last_seen = time.monotonic()
            _take(c, m, spec, progress, out)
    return out


def _take(c: Consumer, m: Any, spec: SliceSpec, progress: _Progress, out: Partitions) -> None:
    p = m.partition()
    if p in progress.done:
        return
    err = m.error()
    if err is not None:
        if err.code() == KafkaError._PARTITION_EOF:
            progress.done.add(p)
            c.pause([TopicPartition(spec.topic, p)])
            return
        raise SliceError(f"{spec.topic}[{p}]: {err}")
    if _keep(m, spec, progress):
        _, ts = m.timestamp()
        out[p].append(RawRecord(p, m.offset(), ts, m.key(), m.value()))
    elif p in progress.done:
        c.pause([TopicPartition(spec.topic, p)])
