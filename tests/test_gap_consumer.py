"""The consumer thread under every Faust app admits fetched records through its GapGuard and
follows Faust's own seeks (no broker: a scripted aiokafka consumer stands in)."""

from __future__ import annotations

import asyncio
import contextlib
from types import SimpleNamespace

import pytest
from faust.types import TP

from ia.core.settings import Settings
from ia.streams.app import make_app
from ia.streams.consumer import GapGuardedConsumerThread

ENV = {"KAFKA_BOOTSTRAP_SERVERS": "k:9092", "REDIS_URL": "redis://r:6379/0"}
P0, P1 = TP("t", 0), TP("t", 1)


class _State:
    def __init__(self, position: int | None) -> None:
        self.position = position

    @property
    def has_valid_position(self) -> bool:
        return self.position is not None


class ScriptedConsumer:
    """What the thread touches of an aiokafka consumer: the assignment and its positions,
    a fetcher handing out scripted fetch results (offsets per partition), seeks."""

    def __init__(self, positions: dict[TP, int | None]) -> None:
        self.states = {tp: _State(p) for tp, p in positions.items()}
        self.results: list[dict[TP, list[int]]] = []
        self.asked: list[set[TP]] = []
        self.seeks: list[tuple[int, int]] = []
        self.committed: dict[TP, int | None] = {}
        self._closed = False
        self._fetcher = self._subscriptions = self
        self._subscription = SimpleNamespace(subscription=SimpleNamespace(assignment=self))

    def state_value(self, tp: TP) -> _State | None:
        return self.states.get(tp)

    def assignment(self) -> set[TP]:
        return set(self.states)

    @contextlib.contextmanager
    def fetch_context(self):  # type: ignore[no-untyped-def]
        yield

    async def fetched_records(self, partitions, timeout=0, max_records=None):  # type: ignore[no-untyped-def]
        self.asked.append(set(partitions))
        out = {}
        for tp, offsets in (self.results.pop(0) if self.results else {}).items():
            out[tp] = [SimpleNamespace(offset=o) for o in offsets]
            self.states[tp].position = offsets[-1] + 1
        return out

    def seek(self, tp, offset: int) -> None:  # type: ignore[no-untyped-def]
        self.seeks.append((tp.partition, offset))
        self.states[TP(tp.topic, tp.partition)].position = offset

    async def position(self, tp: TP) -> int | None:
        return self.states[tp].position

    async def seek_to_committed(self) -> dict[TP, int | None]:
        for tp, offset in self.committed.items():
            if offset:
                self.states[tp].position = offset
        return dict(self.committed)


def _thread(positions: dict[TP, int | None]) -> tuple[GapGuardedConsumerThread, ScriptedConsumer]:
    thread = make_app(Settings(_env=ENV), "ia-test").consumer._thread
    assert isinstance(thread, GapGuardedConsumerThread)
    consumer = ScriptedConsumer(positions)
    thread._consumer = consumer  # type: ignore[assignment]
    return thread, consumer


async def _fetch(thread: GapGuardedConsumerThread, consumer: ScriptedConsumer,
                 results: dict[TP, list[int]]) -> dict[int, list[int]]:
    consumer.results.append(results)
    records = await thread._fetch_records(consumer, set(consumer.states), timeout=0.01)  # type: ignore[arg-type]
    return {tp.partition: [r.offset for r in batch] for tp, batch in records.items()}


async def test_records_beyond_a_gap_are_held_back_and_the_partition_fetched_again():
    thread, consumer = _thread({P0: 0})
    assert await _fetch(thread, consumer, {P0: [0, 1, 2]}) == {0: [0, 1, 2]}
    assert await _fetch(thread, consumer, {P0: [5, 6, 7]}) == {}, "Faust never sees 5..7"
    assert consumer.seeks == [(0, 3)]
    assert await _fetch(thread, consumer, {P0: [3, 4, 5, 6, 7]}) == {0: [3, 4, 5, 6, 7]}
    assert thread.gaps.stats.refetched == 1


async def test_a_partition_is_fetched_once_its_position_is_known_and_read_from_there():
    thread, consumer = _thread({P0: 0, P1: None})  # P1: its offset still being looked up
    await _fetch(thread, consumer, {})
    assert consumer.asked == [{P0}]
    consumer.states[P1].position = 3
    assert await _fetch(thread, consumer, {P1: [5, 6]}) == {}, "its first batch was skipped"
    assert consumer.seeks == [(1, 3)]


async def test_faust_seeking_back_to_the_committed_offset_is_read_again_not_dropped():
    thread, consumer = _thread({P0: 0})
    assert await _fetch(thread, consumer, {P0: list(range(10))}) == {0: list(range(10))}
    consumer.committed = {P0: 4}
    assert await thread._seek_to_committed() == {P0: 4}
    assert await _fetch(thread, consumer, {P0: list(range(4, 10))}) == {0: list(range(4, 10))}
    assert thread.gaps.stats.duplicates == 0


async def test_faust_seek_wait_moves_the_guard_with_the_consumer():
    thread, consumer = _thread({P0: 0})
    await _fetch(thread, consumer, {P0: [0, 1, 2]})
    await thread._seek_wait(consumer, {P0: 1})  # type: ignore[arg-type]
    assert await _fetch(thread, consumer, {P0: [1, 2, 3]}) == {0: [1, 2, 3]}


async def test_a_seek_from_fausts_loop_moves_the_guard_on_the_consumers_loop():
    thread, consumer = _thread({P0: 0})
    thread.thread_loop.close()
    thread.thread_loop = asyncio.get_running_loop()  # the consumer thread's loop, here
    await _fetch(thread, consumer, {P0: [0, 1, 2]})
    thread.seek(P0, 1)
    await asyncio.sleep(0)
    assert consumer.seeks == [(0, 1)]
    assert await _fetch(thread, consumer, {P0: [1, 2, 3]}) == {0: [1, 2, 3]}


async def test_a_revoked_partition_is_forgotten_and_read_afresh_when_assigned_again(
        monkeypatch: pytest.MonkeyPatch):
    thread, consumer = _thread({P0: 0})

    async def revoked_in_faust(loop, revoked) -> None:  # type: ignore[no-untyped-def]
        pass

    monkeypatch.setattr(thread.consumer, "threadsafe_partitions_revoked", revoked_in_faust)
    await _fetch(thread, consumer, {P0: [2, 3]})
    assert thread.gaps.open_gaps() == {P0: 0}
    await thread.on_partitions_revoked({P0})
    assert thread.gaps.open_gaps() == {}
    consumer.states[P0].position = 20  # assigned again, the next owner committed 20
    assert await _fetch(thread, consumer, {P0: [20, 21]}) == {0: [20, 21]}


async def test_the_consumer_waits_at_most_the_configured_fetch_wait():
    settings = Settings(_env={**ENV, "IA_FETCH_MAX_WAIT_S": "0.02"})
    app = make_app(settings, "ia-test")
    consumer = app.consumer._thread._create_worker_consumer(app.transport)
    assert consumer._fetch_max_wait_ms == 20
