"""The Kafka consumer under every Faust app of ours: a short fetch wait, and no skipped record.

faust-streaming reads through one aiokafka consumer per app, driven by a consumer thread
(:class:`faust.transport.drivers.aiokafka.AIOKafkaConsumerThread`).  Its subclass here
changes two things and nothing else:

* **fetch wait**: Faust hard-codes a 1.5 s fetch wait, and a broker that answers a fetch
  only when that wait expires (tansu does) then holds every record that arrives meanwhile
  for up to 1.5 s.  A short wait costs a few idle fetches and bounds latency.
* **offset gaps**: the embedded broker can serve a later batch of a partition before an
  earlier one is stored, and the consumer then moves past the earlier one for good (see
  :mod:`ia.core.gaps`).  Every fetched record passes a :class:`~ia.core.gaps.GapGuard`
  before Faust sees it: records beyond a gap are held back and the partition is fetched
  again from the gap.  This has to happen below Faust: Faust treats offsets it never saw
  between two it did see as holding no record and commits past them, so a record held
  back any later would be committed without being processed.

The guard starts a partition at the consumer's position once that is known, moves with
every seek Faust itself makes (back to the committed offsets after a rebalance, ...), and
forgets a partition when it is revoked.  Its seeks and its bookkeeping all run on the
consumer thread's event loop, like the fetches they correct.

The subclass is installed per app (:func:`use_gap_guarded_consumer`), not by patching
Faust's classes.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable, Mapping, Set
from typing import Any

import faust
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import IllegalStateError
from faust.transport.drivers import aiokafka as driver
from faust.types import TP

from ia.core.gaps import GapGuard

log = logging.getLogger("ia.streams")

RecordMap = Mapping[TP, list[Any]]

# How long a fetch waits when no partition's position is known yet (just assigned, its
# offset being looked up): a broker round trip, and no busy loop meanwhile.
_POSITION_WAIT_S = 0.05
# How long stopping the consumer (its coordinator's last round trips: leave the group)
# may take. A reachable broker answers in milliseconds; an unreachable one would hold the
# stop until mode's 60 s shutdown timeout. Offsets are committed before this, by Faust.
STOP_TIMEOUT_S = 5.0


class GapGuardedConsumerThread(driver.AIOKafkaConsumerThread):
    """Faust's aiokafka consumer thread with a short fetch wait and a :class:`GapGuard`."""

    gaps: GapGuard

    def __post_init__(self) -> None:
        super().__post_init__()
        self.gaps = GapGuard(self._refetch)

    def _create_worker_consumer(self, transport: driver.Transport) -> AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_max_wait_ms = self.app.ia_fetch_max_wait_ms  # type: ignore[attr-defined]
        return consumer

    async def on_thread_stop(self) -> None:
        """Stop the consumer, and let the thread finish stopping whatever that raised.

        With the broker gone, aiokafka's ``stop()`` cancels the fetch in flight and
        re-raises that fetch's ``CancelledError`` from ``Fetcher.close()``; escaping from
        here it skips mode's ``set_shutdown()``, and the worker told to stop waited for
        mode's 60 s shutdown timeout. So the stop runs as its own task, bounded by
        :data:`STOP_TIMEOUT_S`; whatever it ends with is logged and the connections are
        closed. (Offsets were committed before this, by Faust's own ``on_stop``.)
        """
        stopping = asyncio.ensure_future(super().on_thread_stop())
        done, _ = await asyncio.wait({stopping}, timeout=STOP_TIMEOUT_S)
        if not done:
            stopping.cancel()
            log.warning("the broker did not answer within %gs while the consumer stopped; "
                        "stopping without leaving the group (its session timeout moves "
                        "the partitions)", STOP_TIMEOUT_S)
        elif stopping.cancelled():
            log.info("consumer stopped; a fetch in flight was cancelled (broker away?)")
        elif stopping.exception() is not None:
            exc = stopping.exception()
            log.warning("consumer stop failed: %s: %s", type(exc).__name__, exc)
        else:
            return
        await self._close_quietly()

    async def _close_quietly(self) -> None:
        """Close the connections an interrupted ``stop()`` left open, bounded."""
        client = getattr(self._consumer, "_client", None)
        if client is None:
            return
        try:
            await asyncio.wait_for(client.close(), 1.0)
        except (TimeoutError, asyncio.CancelledError, Exception) as exc:  # best effort on exit
            log.debug("closing the consumer's connections: %r", exc)

    def _refetch(self, topic: str, partition: int, offset: int) -> None:
        try:
            self._ensure_consumer().seek(TopicPartition(topic, partition), offset)
        except IllegalStateError as exc:
            # Revoked meanwhile: its next owner reads it from the committed offset.
            log.warning("seek %s[%d] to %d failed: %s", topic, partition, offset, exc)

    async def _fetch_records(self, consumer: AIOKafkaConsumer, active_partitions: Set[TP],
                             timeout: float | None = None,
                             max_records: int | None = None) -> RecordMap:
        self.gaps.tick()
        asked = set(active_partitions) if active_partitions else consumer.assignment()
        readable = self._positioned(consumer, asked)
        if asked and not readable:
            await asyncio.sleep(min(timeout or 0.0, _POSITION_WAIT_S))
            return {}
        records = await super()._fetch_records(consumer, readable, timeout=timeout,
                                               max_records=max_records)
        return self._admitted(records)

    def _positioned(self, consumer: AIOKafkaConsumer, partitions: Iterable[TP]) -> set[TP]:
        """The partitions whose fetch position is known, each tracked by the guard from
        its position on if it was not tracked yet; the others are not fetched now (the
        guard could not tell whether their first batch was skipped)."""
        subscription = consumer._subscription.subscription
        assignment = subscription.assignment if subscription is not None else None
        if assignment is None:
            return set()
        known: set[TP] = set()
        for tp in partitions:
            state = assignment.state_value(tp)
            if state is not None and state.has_valid_position:
                self.gaps.track(tp.topic, tp.partition, state.position)
                known.add(tp)
        return known

    def _admitted(self, records: RecordMap) -> RecordMap:
        guard = self.gaps
        out: dict[TP, list[Any]] = {}
        for tp, batch in records.items():
            first, n = batch[0].offset, len(batch)
            if batch[-1].offset - first == n - 1 and guard.admit_run(tp.topic, tp.partition,
                                                                     first, n):
                out[tp] = batch
                continue
            kept = [r for r in batch if guard.admit(tp.topic, tp.partition, r.offset)]
            if kept:
                out[tp] = kept
        return out

    # Faust's own repositioning: the guard reads on from where Faust wants to read.

    async def seek_to_committed(self) -> Mapping[TP, int]:
        return await self.call_thread(self._seek_to_committed)

    async def _seek_to_committed(self) -> Mapping[TP, int]:
        committed = await self._ensure_consumer().seek_to_committed()
        for tp, offset in committed.items():
            if offset and offset > 0:  # aiokafka seeks only these
                self.gaps.expect(tp.topic, tp.partition, offset)
        return committed

    async def _seek_wait(self, consumer: AIOKafkaConsumer,
                         partitions: Mapping[TP, int]) -> None:
        for tp, offset in partitions.items():
            self.gaps.expect(tp.topic, tp.partition, offset)
        await super()._seek_wait(consumer, partitions)

    def seek(self, partition: TP, offset: int) -> None:
        super().seek(partition, offset)
        # Faust calls this from its own loop: the guard changes on the consumer's.
        self.thread_loop.call_soon_threadsafe(self.gaps.expect, partition.topic,
                                              partition.partition, offset)

    async def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        await self.call_thread(self._seek_to_beginning, *partitions)

    async def _seek_to_beginning(self, *partitions: TopicPartition) -> None:
        consumer = self._ensure_consumer()
        for tp in partitions or consumer.assignment():
            self.gaps.forget(tp.topic, tp.partition)  # tracked again at its new position
        await consumer.seek_to_beginning(*partitions)

    async def on_partitions_revoked(self, revoked: Set[TP]) -> None:
        for tp in revoked:
            self.gaps.forget(tp.topic, tp.partition)
        await super().on_partitions_revoked(revoked)


class GapGuardedConsumer(driver.Consumer):
    """Faust's aiokafka consumer on a :class:`GapGuardedConsumerThread`."""

    def _new_consumer_thread(self) -> GapGuardedConsumerThread:
        return GapGuardedConsumerThread(self, loop=self.loop, beacon=self.beacon)


def use_gap_guarded_consumer(app: faust.App, fetch_max_wait_s: float) -> None:
    """Make ``app`` consume through a :class:`GapGuardedConsumer` that waits at most
    ``fetch_max_wait_s`` per fetch (call before the app starts)."""
    app.ia_fetch_max_wait_ms = max(1, round(fetch_max_wait_s * 1000))  # type: ignore[attr-defined]
    app.transport.Consumer = GapGuardedConsumer  # type: ignore[misc]
