"""A Redis client that fails once, at a chosen call: a Redis blip, on demand.

Wraps a real client: every attribute is the real one, except that the
``nth`` call of ``method`` raises :class:`redis.exceptions.ConnectionError`
instead of reaching Redis (once; later calls go through)::

    flaky = FailOnce(aredis, "set", nth=2)   # the second SET fails
"""

from __future__ import annotations

from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError

__all__ = ["FailOnce", "RedisConnectionError"]


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
