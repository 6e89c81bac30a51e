"""Guard state in Redis, shared by every worker and actuator of one prefix.

Every read-modify-write is one atomic Lua script (package data,
``lua/*.lua``, one script per file), so two processes never both take the
last slot or both become the half-open probe.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Iterable, Mapping, Sequence
from importlib import resources
from typing import Any

from pydantic import ValidationError

from ia.core.keys import Keys
from ia.decisions.guards.stores import (
    CLAIM_GC_MS,
    FLEET_TTL_S,
    FREEZE_REFRESH_S,
    GROUP_TTL_S,
    RESULT_RETENTION_MS,
    WINDOW_SLACK_MS,
    BreakerVerdict,
    FloorVerdict,
    HealthSpan,
    weighted,
)
from ia.decisions.windows import FreezeWindow

log = logging.getLogger("ia.guards")


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
        self._health = client.register_script(lua("health"))
        self._known_fleet: set[tuple[str, str]] = set()
        self._known_since = time.monotonic()
        self._freeze: list[FreezeWindow] = []
        self._freeze_read = -float("inf")
        self._seen_written: dict[tuple[str, str], int] = {}

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

    async def freeze_windows(self) -> list[FreezeWindow]:
        # Read at most every FREEZE_REFRESH_S: the guard asks for every action decision.
        if time.monotonic() - self._freeze_read < FREEZE_REFRESH_S:
            return self._freeze
        raw = await self.client.hgetall(self.keys.freeze_windows)
        windows = []
        for name, value in sorted((text_of(k), v) for k, v in raw.items()):
            try:
                windows.append(FreezeWindow.model_validate_json(value))
            except ValidationError as exc:
                # A hand-edited entry must not stop decisions; it holds nothing.
                log.error("freeze window %r in Redis is unreadable, ignored: %s", name, exc)
        self._freeze, self._freeze_read = windows, time.monotonic()
        return windows

    async def add_freeze_window(self, window: FreezeWindow) -> bool:
        key = self.keys.freeze_windows
        added = bool(await self.client.hsetnx(key, window.name, window.model_dump_json()))
        self._freeze_read = -float("inf")
        return added

    async def remove_freeze_window(self, name: str) -> FreezeWindow | None:
        key = self.keys.freeze_windows
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hget(key, name)
            pipe.hdel(key, name)
            raw, _ = await pipe.execute()
        self._freeze_read = -float("inf")
        if raw is None:
            return None
        try:
            return FreezeWindow.model_validate_json(raw)
        except ValidationError:
            return FreezeWindow.model_construct(name=name)

    async def note_scope(self, member: str, scope: Mapping[str, Any]) -> None:
        await self.client.set(self.keys.scope_of(member), json.dumps(scope, sort_keys=True),
                              ex=GROUP_TTL_S)

    async def scope_of(self, member: str) -> dict[str, Any] | None:
        raw = await self.client.get(self.keys.scope_of(member))
        return None if raw is None else json.loads(raw)

    async def health_seen(self, group: str, last_seen: Mapping[str, int],
                          resolution_ms: int) -> None:
        # Each entity's time is written when it has moved on by resolution_ms: one
        # ZADD per group and batch at most, and usually none.
        if len(self._seen_written) > 100_000:
            self._seen_written.clear()
        fresh = {e: ts for e, ts in last_seen.items()
                 if ts - self._seen_written.get((group, e), -2**62) >= resolution_ms}
        if not fresh:
            return
        key = self.keys.health_seen(group)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zadd(key, fresh, gt=True)
            pipe.expire(key, FLEET_TTL_S)
            await pipe.execute()
        self._seen_written.update(((group, e), ts) for e, ts in fresh.items())

    async def health_anomaly(self, group: str, entity: str, ts: int) -> None:
        key = self.keys.health_anomalies(group)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zadd(key, {entity: ts}, gt=True)
            pipe.expire(key, FLEET_TTL_S)
            await pipe.execute()

    async def health_admit(self, group: str, target: str, member: str, now: int,
                           span: HealthSpan, min_pct: float, lease_ms: int,
                           reserve: bool) -> FloorVerdict:
        ok, healthy, members = await self._health(
            keys=[self.keys.health_seen(group), self.keys.health_anomalies(group),
                  self.keys.health_out(group)],
            args=[target, member, now, span.fresh_ms, span.anomaly_ms, span.member_ms,
                  repr(float(min_pct)), lease_ms, "1" if reserve else "0"])
        return FloorVerdict(bool(int(ok)), int(healthy), int(members))

    async def health_release(self, group: str, target: str, member: str) -> None:
        await self.client.zrem(self.keys.health_out(group), f"{target}|{member}")
