"""Guard state in Redis, shared by every worker and actuator of one prefix.

Every read-modify-write is one atomic Lua script (package data,
``lua/*.lua``, one script per file), so two processes never both take the
last slot or both become the half-open probe.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from importlib import resources

from ia.core.keys import Keys
from ia.decisions.guards.stores import (
    CLAIM_GC_MS,
    FLEET_TTL_S,
    GROUP_TTL_S,
    RESULT_RETENTION_MS,
    WINDOW_SLACK_MS,
    BreakerVerdict,
    weighted,
)


@functools.cache
def lua(name: str) -> str:
    """The text of the script ``lua/{name}.lua``."""
    return resources.files("ia.decisions.guards").joinpath("lua", f"{name}.lua").read_text()


def text_of(v: object) -> str:
    """A Redis reply as text (clients may or may not decode responses)."""
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisGuardStore:
    """Guard state in Redis, shared by every worker and actuator of one ``prefix``.

    Each operation is one atomic Lua script, so concurrent workers and
    actuators never both take the last slot.  Keys: ``{prefix}:claim:*``
    (cooldowns), ``{prefix}:g:*`` (everything else); see :mod:`ia.core.keys`.
    """

    def __init__(self, client, prefix: str = "ia") -> None:
        self.client = client
        self.keys = Keys(prefix)
        self._claim = client.register_script(lua("claim"))
        self._release_claim = client.register_script(lua("release_claim"))
        self._window = client.register_script(lua("window"))
        self._slot = client.register_script(lua("slot"))
        self._slot_release = client.register_script(lua("slot_release"))
        self._breaker = client.register_script(lua("breaker"))
        self._release_probe = client.register_script(lua("release_probe"))
        self._result = client.register_script(lua("result"))
        self._known_fleet: set[tuple[str, str]] = set()
        self._known_since = time.monotonic()

    async def claim(self, key: str, owner: str, ts: int, until_ts: int) -> str:
        holder = await self._claim(keys=[self.keys.claim(key)],
                                   args=[owner, ts, until_ts, CLAIM_GC_MS])
        return text_of(holder)

    async def release_claim(self, key: str, owner: str) -> None:
        await self._release_claim(keys=[self.keys.claim(key)], args=[owner])

    async def window_admit(self, key: str, member: str, ts: int, window_ms: int, limit: float,
                           weight: float = 1.0) -> tuple[bool, float]:
        ok, used = await self._window(
            keys=[self.keys.window(key)],
            args=[weighted(member, weight), ts, window_ms, repr(float(limit)),
                  repr(float(weight)), WINDOW_SLACK_MS, window_ms + CLAIM_GC_MS])
        return bool(int(ok)), float(text_of(used))

    async def window_release(self, key: str, member: str, weight: float = 1.0) -> None:
        await self.client.zrem(self.keys.window(key), weighted(member, weight))

    async def slot_acquire(self, group: str, member: str, now: int, limit: int,
                           lease_ms: int) -> tuple[bool, int]:
        ok, n = await self._slot(keys=[self.keys.slots(group), self.keys.slot_of(member)],
                                 args=[member, now, limit, lease_ms, group])
        return bool(int(ok)), int(n)

    async def slot_release(self, member: str) -> None:
        # The script reads the member's group, then appends it to the slots key's stem.
        await self._slot_release(keys=[self.keys.slot_of(member)],
                                 args=[self.keys.slots(""), member])

    async def note_group(self, member: str, group: str) -> None:
        await self.client.set(self.keys.group_of(member), group, ex=GROUP_TTL_S)

    async def group_of(self, member: str) -> str | None:
        raw = await self.client.get(self.keys.group_of(member))
        return None if raw is None else text_of(raw)

    async def fleet_add(self, group: str, entities: Iterable[str]) -> None:
        # Members already added recently are skipped (one round trip saved per
        # event); the cache is forgotten hourly so the key's TTL is refreshed.
        if time.monotonic() - self._known_since > 3600 or len(self._known_fleet) > 100_000:
            self._known_fleet.clear()
            self._known_since = time.monotonic()
        new = [e for e in set(entities) if (group, e) not in self._known_fleet]
        if not new:
            return
        key = self.keys.fleet(group)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.sadd(key, *new)
            pipe.expire(key, FLEET_TTL_S)
            await pipe.execute()
        self._known_fleet.update((group, e) for e in new)

    async def fleet_size(self, group: str) -> int:
        return int(await self.client.scard(self.keys.fleet(group)))

    async def breaker_check(self, key: str, owner: str, now: int, failures: int,
                            window_ms: int, open_ms: int, probe_timeout_ms: int
                            ) -> BreakerVerdict:
        state, allowed, detail = await self._breaker(
            keys=[self.keys.breaker(key), self.keys.breaker_failures(key)],
            args=[owner, now, failures, window_ms, open_ms, probe_timeout_ms])
        return BreakerVerdict(text_of(state), bool(int(allowed)), text_of(detail))

    async def breaker_release_probe(self, key: str, owner: str) -> None:
        await self._release_probe(keys=[self.keys.breaker(key)], args=[owner])

    async def record_result(self, breaker_key: str, budget_scopes: Sequence[str], member: str,
                            ok: bool, at: int) -> None:
        here, other = ("ok", "fail") if ok else ("fail", "ok")
        budget = [k for scope in budget_scopes
                  for k in (self.keys.budget(scope, here), self.keys.budget(scope, other))]
        await self._result(keys=[self.keys.breaker(breaker_key),
                                 self.keys.breaker_failures(breaker_key), *budget],
                           args=[member, "1" if ok else "0", at, RESULT_RETENTION_MS])

    async def results(self, scope: str, now: int, window_ms: int) -> tuple[int, int]:
        lo = f"({now - window_ms}"
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zcount(self.keys.budget(scope, "ok"), lo, "+inf")
            pipe.zcount(self.keys.budget(scope, "fail"), lo, "+inf")
            ok, failed = await pipe.execute()
        return int(ok), int(failed)
