"""The worker's retry plumbing: a dependency that is away is waited for, a record the
decision code cannot handle is given up on after a bounded number of attempts and
isolated, so one poison event cannot stall its partition."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest
import redis.exceptions
from aiokafka.errors import KafkaConnectionError

from ia.core.clock import now_ms
from ia.streams.app import GaveUp, with_retry
from ia.streams.worker import decide_batch
from tests.test_worker_service import POISON, Worker, normal


class App:
    """What :func:`with_retry` reads of a Faust app."""

    should_stop = False


@pytest.fixture(autouse=True)
def no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    sleep = asyncio.sleep
    monkeypatch.setattr(asyncio, "sleep", lambda _delay: sleep(0))


def failing(errors: list[Exception]) -> tuple[Callable[[], Awaitable[str]], list[int]]:
    """A step that raises ``errors`` one per call, then succeeds; and its call count."""
    calls = [0]

    async def step() -> str:
        calls[0] += 1
        if errors:
            raise errors.pop(0)
        return "done"

    return step, calls


async def test_a_processing_error_is_given_up_after_the_attempts() -> None:
    step, calls = failing([ValueError("bad input")] * 10)
    with pytest.raises(GaveUp) as info:
        await with_retry("decide", step, App(), attempts=3)
    assert calls == [3] and isinstance(info.value.__cause__, ValueError)


async def test_dependency_errors_are_retried_however_many_attempts_they_take() -> None:
    errors: list[Exception] = [redis.exceptions.ConnectionError("refused"),
                               redis.exceptions.TimeoutError("Timeout reading from socket"),
                               redis.exceptions.BusyLoadingError("loading"),
                               KafkaConnectionError("broker away"), ConnectionResetError()]
    step, calls = failing(errors * 2)
    assert await with_retry("decide", step, App(), attempts=2) == "done"
    assert calls == [11]


async def test_without_attempts_every_error_is_retried() -> None:
    step, calls = failing([ValueError("flaky")] * 4)
    assert await with_retry("feedback", step, App()) == "done"
    assert calls == [5]


async def test_a_poison_batch_is_decided_around_its_poison_record() -> None:
    worker = Worker()
    good = normal("svc-a", 4, now_ms() - 10 * 10_000)
    poison = good[1].model_copy(update={"value": POISON, "event_id": "poison"})
    decided = await decide_batch(worker.service, worker.records([good[0], poison, *good[1:]]),
                                 App(), attempts=2)
    assert [d.event_id for d in decided.decisions] == [ev.event_id for ev in good]
    assert [(dl.reason, dl.source_offset) for _, dl in decided.dead_letters] == \
        [("processing_error", 1)]
