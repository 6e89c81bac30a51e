"""Versioned, atomic checkpoints of shared model state in Redis (or memory).

One Redis hash per model, ``{prefix}:model:{name}``, with fields ``version``
(monotonic), ``blob`` and ``saved_at``.  Every write replaces all fields in
one ``MULTI`` under ``WATCH``, so a reader sees either the old or the new
version, never a mix, and two writers cannot lose each other's update (the
loser re-reads and re-applies).  Per-series detector state does not live
here: it is saved with each entity's features (see ``ia.features.store``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from redis.exceptions import WatchError

from ia.core.clock import now_ms
from ia.core.keys import Keys


class ModelStore(Protocol):
    async def load(self, name: str) -> tuple[int, bytes | None]: ...

    async def version(self, name: str) -> int: ...

    async def update(self, name: str, apply: Callable[[bytes | None], tuple[int, bytes]]) -> int:
        ...


class MemoryModelStore:
    def __init__(self) -> None:
        self._models: dict[str, tuple[int, bytes]] = {}

    async def load(self, name: str) -> tuple[int, bytes | None]:
        return self._models.get(name, (0, None))

    async def version(self, name: str) -> int:
        return self._models.get(name, (0, b""))[0]

    async def update(self, name: str, apply: Callable[[bytes | None], tuple[int, bytes]]) -> int:
        version, blob = apply(self._models.get(name, (0, None))[1])
        self._models[name] = (version, blob)
        return version


class RedisModelStore:
    """``redis.asyncio`` client with ``decode_responses=False``."""

    def __init__(self, client, prefix: str = "ia") -> None:
        self.client = client
        self.keys = Keys(prefix)

    async def load(self, name: str) -> tuple[int, bytes | None]:
        raw = await self.client.hmget(self.keys.model(name), "version", "blob")
        return _version(raw[0]), raw[1]

    async def version(self, name: str) -> int:
        return _version(await self.client.hget(self.keys.model(name), "version"))

    async def update(self, name: str, apply: Callable[[bytes | None], tuple[int, bytes]]) -> int:
        """Read, ``apply`` (old blob -> new version and blob), write atomically; retried
        from the read if another writer got in between."""
        key = self.keys.model(name)
        async with self.client.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    old = await pipe.hget(key, "blob")
                    version, blob = apply(old)
                    pipe.multi()
                    pipe.hset(key, mapping={"version": version, "blob": blob,
                                            "saved_at": now_ms()})
                    await pipe.execute()
                    return version
                except WatchError:
                    continue


def _version(raw: bytes | None) -> int:
    """The stored version; a missing or non-numeric one (not written by ``update``) is 0,
    so the blob is still read and validated rather than the worker failing on it."""
    return int(raw) if raw and raw.isdigit() else 0
