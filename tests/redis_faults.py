"""A Redis client that fails once, at a chosen call: a Redis blip, on demand.

Wraps a real client: every attribute is the real one, except that the
``nth`` call of ``method`` raises :class:`redis.exceptions.ConnectionError`
instead of reaching Redis (once; later calls go through)::

    flaky = FailOnce(aredis, "set", nth=2)   # the second SET fails

and a client whose chosen command is lost on the wire, before Redis or after it
ran (its reply lost): :class:`Loss`, :func:`lossy_client`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.connection import Connection
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

__all__ = ["FailOnce", "Loss", "RedisConnectionError", "RedisTimeoutError", "lossy_client"]


class FailOnce:
    def __init__(self, client: Any, method: str, nth: int = 1) -> None:
        self._client = client
        self._method = method
        self._nth = nth
        self.calls = 0
        self.fired = False

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._client, name)
        if name != self._method:
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == self._nth:
                self.fired = True
                raise RedisConnectionError(f"injected: {name} call {self.calls} failed")
            return attr(*args, **kwargs)

        return call


class Loss:
    """The first command sent whose packed bytes ``match`` is lost on the way.

    ``ran=True``: it reaches Redis and runs, and its reply is lost (what a paused
    Redis does with a command the client gave up on: it runs it once it resumes);
    the client sees :class:`redis.exceptions.TimeoutError`.  ``ran=False``: it never
    reaches Redis; the client sees :class:`redis.exceptions.ConnectionError`.
    Either way the connection is dropped, as redis-py drops it.
    """

    def __init__(self, match: Callable[[bytes], bool], *, ran: bool) -> None:
        self.match, self.ran = match, ran
        self.fired = False

    def due(self, packed: bytes) -> bool:
        if self.fired or not self.match(packed):
            return False
        self.fired = True
        return True


class _LossyConnection(Connection):
    def __init__(self, *args: Any, loss: Loss, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._loss = loss

    async def send_packed_command(self, command: Any, check_health: bool = True) -> None:
        parts = [command.encode() if isinstance(command, str) else command] \
            if isinstance(command, str | bytes) else list(command)
        if not self._loss.due(b"".join(parts)):
            await super().send_packed_command(parts, check_health)
            return
        if self._loss.ran:
            await super().send_packed_command(parts, check_health)
            # The reply comes only once every command of the packet has run (Redis runs
            # a whole query buffer before it writes back): it ran, and nobody hears of it.
            await super().read_response()
        await self.disconnect(nowait=True)
        if self._loss.ran:
            raise RedisTimeoutError("injected: the command ran, its reply was lost")
        raise RedisConnectionError("injected: the command never reached Redis")


def lossy_client(url: str, loss: Loss, *, retries: int,
                 password_file: str | None = None) -> aioredis.Redis:
    """An asyncio client of ``url`` that loses one command as ``loss`` says, and
    retries a failed command ``retries`` times at once (``ia``'s clients retry once:
    :mod:`ia.core.redis`), so a lost reply can make the command run twice."""
    password = Path(password_file).read_text().strip() if password_file else None
    return aioredis.Redis.from_url(
        url, password=password, connection_class=_LossyConnection, loss=loss,
        socket_timeout=5,
        retry=AsyncRetry(NoBackoff(), retries),
        retry_on_error=[RedisTimeoutError, RedisConnectionError])
