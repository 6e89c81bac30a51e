"""A worker told to stop with the broker gone stops at once, not after mode's 60 s.

With the broker away, aiokafka's ``Fetcher.close()`` re-raises the cancelled fetch's
``CancelledError`` out of ``consumer.stop()``; escaping ``on_thread_stop`` it skipped
mode's ``set_shutdown()``, and ``ia worker`` took 61 s to exit after SIGTERM (measured:
1.2 s with the fix). These drive the consumer thread's stop with such a consumer.
"""

from __future__ import annotations

import asyncio

import pytest
from faust.transport.drivers import aiokafka as driver

from ia.streams import consumer as module
from ia.streams.consumer import GapGuardedConsumerThread


class _Client:
    closed = False

    async def close(self) -> None:
        self.closed = True


class _Consumer:
    def __init__(self) -> None:
        self._client = _Client()


def _thread() -> GapGuardedConsumerThread:
    thread = GapGuardedConsumerThread.__new__(GapGuardedConsumerThread)
    thread._consumer = _Consumer()  # type: ignore[assignment]
    return thread


def test_a_cancelled_fetch_does_not_escape_the_stop(monkeypatch: pytest.MonkeyPatch) -> None:
    async def stop_with_broker_gone(self) -> None:  # what aiokafka does then
        raise asyncio.CancelledError

    monkeypatch.setattr(driver.AIOKafkaConsumerThread, "on_thread_stop", stop_with_broker_gone)
    thread = _thread()
    asyncio.run(thread.on_thread_stop())  # returns: mode's set_shutdown() runs next
    assert thread._consumer._client.closed


def test_a_stop_that_never_ends_is_given_up(monkeypatch: pytest.MonkeyPatch) -> None:
    async def forever(self) -> None:
        await asyncio.Event().wait()

    monkeypatch.setattr(driver.AIOKafkaConsumerThread, "on_thread_stop", forever)
    monkeypatch.setattr(module, "STOP_TIMEOUT_S", 0.01)
    thread = _thread()
    asyncio.run(thread.on_thread_stop())
    assert thread._consumer._client.closed


def test_a_clean_stop_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    async def clean(self) -> None:
        return None

    monkeypatch.setattr(driver.AIOKafkaConsumerThread, "on_thread_stop", clean)
    thread = _thread()
    asyncio.run(thread.on_thread_stop())
    assert not thread._consumer._client.closed  # aiokafka closed it itself
