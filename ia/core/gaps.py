"""Offset-gap detection for live consumers: every offset of a partition is delivered once.

Why this exists: the embedded broker (tansu 0.6, memory storage) reserves a produce
request's offsets before it stores the batch. With two producers appending to the same
partition, a batch with higher offsets can be stored first; a consumer that fetches in
that window receives it and moves past the lower batch, which it never fetches again
(a fresh read from the beginning does have it). A live consumer therefore has to notice
that an offset was skipped and fetch from it again.

:class:`GapGuard` keeps, per partition, the next offset it expects. A record at that
offset is delivered; one below it is a duplicate and dropped; one above it opens a gap:
the record is held back and the consumer is told to seek to the expected offset, again
every ``retry_s`` (call :meth:`GapGuard.tick` from the poll loop: a partition may
have nothing more to deliver), until the missing record arrives (a *refetched* gap) or ``grace_s``
has passed. A gap that outlives the grace is *accepted* (offsets that hold no record,
e.g. transaction markers or compaction) and reading goes on from the first record after
it. Both outcomes are logged, counted in :class:`GapStats` and in the
``ia_offset_gaps_total`` metric (outcomes ``opened``, ``refetched``, ``accepted``).

The guard does not read from Kafka itself: ``seek`` is a callable, so it serves any
client (:func:`seeker` binds it to a confluent-kafka consumer; the Faust apps' consumer
thread, :mod:`ia.streams.consumer`, to its aiokafka consumer).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from confluent_kafka import Consumer, KafkaException, TopicPartition

from ia.core.metrics import OFFSET_GAPS

log = logging.getLogger("ia.gaps")

Seek = Callable[[str, int, int], None]  # (topic, partition, offset)

DEFAULT_RETRY_S = 0.1
# The window between tansu reserving offsets and storing the batch is milliseconds
# even under load; a gap still open after this long holds no record.
DEFAULT_GRACE_S = 5.0


@dataclass
class GapStats:
    """What the guard saw: gaps opened, how each ended, duplicates dropped, seeks issued."""

    gaps: int = 0
    refetched: int = 0
    accepted: int = 0
    skipped_offsets: int = 0  # offsets given up on in accepted gaps
    duplicates: int = 0
    seeks: int = 0


@dataclass
class _Gap:
    expected: int
    opened: float
    lowest: int  # lowest offset seen beyond ``expected`` since the gap opened
    last_seek: float = field(default=float("-inf"))


class GapGuard:
    """Per-partition contiguity check of the records a live consumer receives.

    Parameters
    ----------
    seek
        Called as ``seek(topic, partition, offset)`` to fetch a partition again from
        ``offset``; it must make the consumer deliver from there (drop what it has
        buffered beyond).
    retry_s
        Minimum time between two seeks for the same gap (records beyond the gap that
        arrive meanwhile are dropped: they come again after the seek).
    grace_s
        How long a gap may stay open before it is accepted as holding no record.
    clock
        Monotonic seconds (a parameter so tests can drive time).
    """

    def __init__(self, seek: Seek, *, retry_s: float = DEFAULT_RETRY_S,
                 grace_s: float = DEFAULT_GRACE_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._seek = seek
        self.retry_s = retry_s
        self.grace_s = grace_s
        self._clock = clock
        self._next: dict[tuple[str, int], int] = {}
        self._open: dict[tuple[str, int], _Gap] = {}
        self.stats = GapStats()

    def expect(self, topic: str, partition: int, offset: int) -> None:
        """Set the next offset of a partition (where reading starts: its log start for a
        read from the beginning, the committed offset for a group member)."""
        self._next[(topic, partition)] = offset
        self._open.pop((topic, partition), None)

    def track(self, topic: str, partition: int, offset: int) -> None:
        """:meth:`expect` ``offset`` unless the partition is tracked already: a consumer's
        position is where a partition's reading starts only before the guard has seen it."""
        if (topic, partition) not in self._next:
            self.expect(topic, partition, offset)

    def forget(self, topic: str, partition: int) -> None:
        """Stop tracking a partition (revoked): its next owner has its own guard."""
        self._next.pop((topic, partition), None)
        self._open.pop((topic, partition), None)

    def open_gaps(self) -> dict[tuple[str, int], int]:
        """The partitions waiting for a missing record, and the offset each waits for."""
        return {tp: g.expected for tp, g in self._open.items()}

    def admit(self, topic: str, partition: int, offset: int) -> bool:
        """Whether to deliver the record at ``offset``; may seek the partition back.

        A partition that was never given an :meth:`expect` starts at its first record.
        """
        tp = (topic, partition)
        expected = self._next.get(tp)
        if expected is None or offset == expected:
            self._next[tp] = offset + 1
            if tp in self._open:
                self._close_refetched(tp)
            return True
        if offset < expected:
            self.stats.duplicates += 1
            return False
        return self._beyond(tp, expected, offset)

    def admit_run(self, topic: str, partition: int, first: int, count: int) -> bool:
        """Deliver at once the records at offsets ``first .. first + count - 1`` (each of
        them: a fetched batch without holes) if they start at the next expected offset and
        no gap is open; otherwise deliver nothing and let :meth:`admit` judge each one.

        The common case of a live read in one comparison instead of one call per record.
        """
        tp = (topic, partition)
        if self._next.get(tp) != first or tp in self._open:
            return False
        self._next[tp] = first + count
        return True

    def _beyond(self, tp: tuple[str, int], expected: int, offset: int) -> bool:
        now = self._clock()
        gap = self._open.get(tp)
        if gap is None:
            gap = self._open[tp] = _Gap(expected=expected, opened=now, lowest=offset)
            self.stats.gaps += 1
            OFFSET_GAPS.labels(tp[0], "opened").inc()
            log.warning("offset gap in %s[%d]: expected %d, got %d; fetching again",
                        tp[0], tp[1], expected, offset)
        gap.lowest = min(gap.lowest, offset)
        if now - gap.opened >= self.grace_s and offset == gap.lowest:
            self._accept(tp, gap, offset)
            return True
        self._seek_if_due(tp, gap, now)
        return False

    def tick(self) -> None:
        """Seek again every open gap whose retry is due; call it on every poll."""
        now = self._clock()
        for tp, gap in list(self._open.items()):
            self._seek_if_due(tp, gap, now)

    def _seek_if_due(self, tp: tuple[str, int], gap: _Gap, now: float) -> None:
        if now - gap.last_seek >= self.retry_s:
            gap.last_seek = now
            self.stats.seeks += 1
            self._seek(tp[0], tp[1], gap.expected)

    def _close_refetched(self, tp: tuple[str, int]) -> None:
        gap = self._open.pop(tp)
        self.stats.refetched += 1
        OFFSET_GAPS.labels(tp[0], "refetched").inc()
        log.warning("offset gap in %s[%d] at %d refetched after %.3fs", tp[0], tp[1],
                    gap.expected, self._clock() - gap.opened)

    def _accept(self, tp: tuple[str, int], gap: _Gap, offset: int) -> None:
        del self._open[tp]
        self._next[tp] = offset + 1
        self.stats.accepted += 1
        OFFSET_GAPS.labels(tp[0], "accepted").inc()
        self.stats.skipped_offsets += offset - gap.expected
        log.error("offset gap in %s[%d]: offsets %d..%d hold no record after %.1fs; "
                  "going on from %d", tp[0], tp[1], gap.expected, offset - 1, self.grace_s,
                  offset)


def seeker(consumer: Consumer) -> Seek:
    """A :data:`Seek` for a confluent-kafka consumer (librdkafka drops what it had
    buffered for the partition, so delivery restarts at the offset)."""

    def seek(topic: str, partition: int, offset: int) -> None:
        try:
            consumer.seek(TopicPartition(topic, partition, offset))
        except KafkaException as exc:
            # The guard seeks again on its next retry; the gap stays open meanwhile.
            log.warning("seek %s[%d] to %d failed: %s", topic, partition, offset, exc)

    return seek


def guard_assigned(consumer: Consumer, **options: float) -> GapGuard:
    """A guard for a consumer assigned from the beginning (:func:`ia.core.kafka.from_beginning`):
    each partition is expected to start at its log start offset, so a skipped first batch
    is a gap too (``options``: ``retry_s``, ``grace_s``)."""
    guard = GapGuard(seeker(consumer), **options)
    for tp in consumer.assignment():
        low, _ = consumer.get_watermark_offsets(TopicPartition(tp.topic, tp.partition),
                                                timeout=10)
        guard.expect(tp.topic, tp.partition, max(low, 0))
    return guard
