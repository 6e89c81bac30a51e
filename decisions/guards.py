"""Guards: everything that stands between a policy decision and an actuator.

The policy says *what* to do and how autonomously (:mod:`ia.decisions.policy`);
the guards say whether it may happen *now*.  All of them run in one place,
:func:`apply_guards`, called by the decision engine for every decision that
carries an action, in this order:

=================  ==========================================  ====================  =======
guard              what it does                                clock                 effect
=================  ==========================================  ====================  =======
kill_switch        ``ia pause`` stops all automation            live (cached 200 ms)  blocked
circuit_breaker    per action type + target: K failures in a   live                  blocked
                   window open it; after ``open_s`` one
                   half-open probe may run; its outcome closes
                   (success) or re-opens (failure) it
error_budget       automation's own failure rate burns the     live                  auto ->
                   budget (1 - slo) faster than max_burn_rate                        needs_approval
blast_radius       in-flight actions per service group: an     live                  blocked
                   absolute cap and/or a share of the fleet
cooldown           per rule (or target) and target              event time            blocked
rate_limit         max N per window (``once_within`` = max 1)  event time            blocked
cost_cap           sum of rule ``cost`` within a window        event time            blocked
=================  ==========================================  ====================  =======

Every guard that intervenes appends a ``guard:<name>`` entry (``matched=True``)
to the decision's rule trace.  ``shadow`` decisions pass untouched (they never
act, so they consume nothing).  Guards that reserve something (a cooldown
claim, a rate-limit slot, cost, a blast-radius slot, a half-open probe) hand
it back when a later guard blocks the decision, so a refused action uses no
budget.

*Event-time* guards are keyed by the owning decision id, so reprocessing a
batch after a crash finds its own reservations and makes the same call.
*Live* guards depend on what actuators are doing; the worker evaluates them
with its clock (wall time live; event time in replay, where the memory store
sees no outcomes and so makes deterministic calls).  Because decision-time
state can be stale by the time an action runs, the actuator checks the live
guards again with :class:`ExecutionGuard` and feeds outcomes back through it.

State lives behind one protocol, :class:`GuardStore`, with a Redis
implementation for workers and actuators (atomic Lua scripts, shared by all
processes) and a memory implementation for replay and the policy tester.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from ia.core.clock import now_ms
from ia.schemas.models import Action, Decision, Mode, RuleTrace, TelemetryEvent

if TYPE_CHECKING:
    from ia.decisions.policy import BlastRadius, CircuitBreaker, Policy, PolicyResult

log = logging.getLogger("ia.guards")

# Claims are garbage-collected by Redis a while after they stop mattering;
# the event-time check, not the TTL, decides whether a claim blocks.
CLAIM_GC_MS = 24 * 3600 * 1000
# Window entries this much older than the window are dropped (slack for
# out-of-order events); keys expire this long after their last write.
WINDOW_SLACK_MS = 3600 * 1000
RESULT_RETENTION_MS = 7 * 24 * 3600 * 1000
FLEET_TTL_S = 7 * 24 * 3600
GROUP_TTL_S = 7 * 24 * 3600
KILL_SWITCH_REFRESH_S = 0.2

FAILED_STATUSES = frozenset({"failed", "timeout", "verification_failed", "rolled_back"})
OK_STATUSES = frozenset({"succeeded", "verified"})



# --- the state protocol ---------------------------------------------------------------------


@dataclass(frozen=True)
class BreakerVerdict:
    state: str            # closed | open | half_open
    allowed: bool
    detail: str = ""      # open: when it opened; half_open: the probe's decision id


class ClaimStore(Protocol):
    async def claim(self, key: str, owner: str, ts: int, until_ts: int) -> str:
        """Claim ``key`` for ``owner`` from ``ts`` until ``until_ts``; return the holder."""
        ...


class GuardStore(ClaimStore, Protocol):
    """Shared guard state.  Times are milliseconds; ``member`` is a decision id."""

    async def release_claim(self, key: str, owner: str) -> None:
        """Drop ``key``'s claim if ``owner`` holds it."""
        ...

    async def window_admit(self, key: str, member: str, ts: int, window_ms: int, limit: float,
                           weight: float = 1.0) -> tuple[bool, float]:
        """Admit ``member`` (weight ``weight``) if the window's total stays within ``limit``.

        The window is every entry newer than ``ts - window_ms``.  A member
        already admitted is admitted again (idempotent).  Returns (admitted,
        total including the member if admitted).
        """
        ...

    async def window_release(self, key: str, member: str, weight: float = 1.0) -> None: ...

    async def slot_acquire(self, group: str, member: str, now: int, limit: int,
                           lease_ms: int) -> tuple[bool, int]:
        """Hold one of ``limit`` in-flight slots of ``group`` until ``now + lease_ms``.

        Idempotent per member (a holder renews its lease).  Returns (held,
        slots in use).
        """
        ...

    async def slot_release(self, member: str) -> None:
        """Free whatever slot ``member`` holds (no-op if none)."""
        ...

    async def note_group(self, member: str, group: str) -> None:
        """Remember the blast-radius group of ``member`` (for the execution-time check)."""
        ...

    async def group_of(self, member: str) -> str | None: ...

    async def fleet_add(self, group: str, entities: Iterable[str]) -> None: ...

    async def fleet_size(self, group: str) -> int: ...

    async def breaker_check(self, key: str, owner: str, now: int, failures: int,
                            window_ms: int, open_ms: int, probe_timeout_ms: int
                            ) -> BreakerVerdict: ...

    async def breaker_release_probe(self, key: str, owner: str) -> None: ...

    async def record_result(self, breaker_key: str, budget_scopes: Sequence[str], member: str,
                            ok: bool, at: int) -> None:
        """Record one finished action: breaker failures/probe result and budget counts."""
        ...

    async def results(self, scope: str, now: int, window_ms: int) -> tuple[int, int]:
        """(succeeded, failed) actions of ``scope`` finished after ``now - window_ms``."""
        ...


def _weighted(member: str, weight: float) -> str:
    return f"{weight!r}|{member}"


# --- memory ---------------------------------------------------------------------------------


class MemoryGuardStore:
    """Guard state in process memory: replay, the policy tester, unit tests."""

    def __init__(self) -> None:
        self._claims: dict[str, tuple[str, int]] = {}
        self._windows: dict[str, dict[str, int]] = {}
        self._slots: dict[str, dict[str, int]] = {}
        self._slot_of: dict[str, str] = {}
        self._group_of: dict[str, str] = {}
        self._fleets: dict[str, set[str]] = {}
        self._breakers: dict[str, dict[str, object]] = {}
        self._failures: dict[str, dict[str, int]] = {}
        self._results: dict[str, dict[str, tuple[int, bool]]] = {}

    async def claim(self, key: str, owner: str, ts: int, until_ts: int) -> str:
        held = self._claims.get(key)
        if held and (held[0] == owner or held[1] > ts):
            return held[0]
        self._claims[key] = (owner, until_ts)
        return owner

    async def release_claim(self, key: str, owner: str) -> None:
        if self._claims.get(key, ("",))[0] == owner:
            del self._claims[key]

    async def window_admit(self, key: str, member: str, ts: int, window_ms: int, limit: float,
                           weight: float = 1.0) -> tuple[bool, float]:
        w = self._windows.setdefault(key, {})
        for m in [m for m, s in w.items() if s < ts - window_ms - WINDOW_SLACK_MS]:
            del w[m]
        used = sum(float(m.split("|", 1)[0]) for m, s in w.items() if s > ts - window_ms)
        me = _weighted(member, weight)
        if me in w:
            return True, used
        if used + weight > limit + 1e-9:
            return False, used
        w[me] = ts
        return True, used + weight

    async def window_release(self, key: str, member: str, weight: float = 1.0) -> None:
        self._windows.get(key, {}).pop(_weighted(member, weight), None)

    async def slot_acquire(self, group: str, member: str, now: int, limit: int,
                           lease_ms: int) -> tuple[bool, int]:
        slots = self._slots.setdefault(group, {})
        for m in [m for m, until in slots.items() if until <= now]:
            del slots[m]
        if member not in slots and len(slots) >= limit:
            return False, len(slots)
        slots[member] = now + lease_ms
        self._slot_of[member] = group
        return True, len(slots)

    async def slot_release(self, member: str) -> None:
        group = self._slot_of.pop(member, None)
        if group is not None:
            self._slots.get(group, {}).pop(member, None)

    async def note_group(self, member: str, group: str) -> None:
        self._group_of[member] = group

    async def group_of(self, member: str) -> str | None:
        return self._group_of.get(member)

    async def fleet_add(self, group: str, entities: Iterable[str]) -> None:
        self._fleets.setdefault(group, set()).update(entities)

    async def fleet_size(self, group: str) -> int:
        return len(self._fleets.get(group, ()))

    async def breaker_check(self, key: str, owner: str, now: int, failures: int,
                            window_ms: int, open_ms: int, probe_timeout_ms: int
                            ) -> BreakerVerdict:
        b = self._breakers.setdefault(key, {"state": "closed"})
        state = b["state"]
        if state == "closed":
            since = max(now - window_ms, int(b.get("closed_at", 0)))  # type: ignore[arg-type]
            n = sum(1 for at in self._failures.get(key, {}).values() if at > since)
            if n < failures:
                return BreakerVerdict("closed", True)
            b.update(state="open", opened_at=now)
            state = "open"
        if state == "open":
            opened = int(b["opened_at"])  # type: ignore[arg-type]
            if now - opened < open_ms:
                return BreakerVerdict("open", False, str(opened))
            b.update(state="half_open", probe=owner, probe_at=now)
            return BreakerVerdict("half_open", True, owner)
        if b.get("probe") == owner:
            return BreakerVerdict("half_open", True, owner)
        if now - int(b.get("probe_at", 0)) >= probe_timeout_ms:  # type: ignore[arg-type]
            b.update(probe=owner, probe_at=now)
            return BreakerVerdict("half_open", True, owner)
        return BreakerVerdict("half_open", False, str(b.get("probe", "")))

    async def breaker_release_probe(self, key: str, owner: str) -> None:
        b = self._breakers.get(key)
        if b and b.get("probe") == owner:
            b.update(probe="", probe_at=0)

    async def record_result(self, breaker_key: str, budget_scopes: Sequence[str], member: str,
                            ok: bool, at: int) -> None:
        # A later result of the same decision (a failed verification after a
        # success) replaces the earlier one.
        if ok:
            self._failures.get(breaker_key, {}).pop(member, None)
        else:
            self._failures.setdefault(breaker_key, {})[member] = at
        b = self._breakers.get(breaker_key)
        if b and b.get("state") == "half_open" and b.get("probe") == member:
            if ok:
                self._breakers[breaker_key] = {"state": "closed", "closed_at": at}
            else:
                self._breakers[breaker_key] = {"state": "open", "opened_at": at}
        for scope in budget_scopes:
            self._results.setdefault(scope, {})[member] = (at, ok)

    async def results(self, scope: str, now: int, window_ms: int) -> tuple[int, int]:
        recent = [ok for at, ok in self._results.get(scope, {}).values() if at > now - window_ms]
        return sum(recent), len(recent) - sum(recent)


# --- Redis ----------------------------------------------------------------------------------

_CLAIM_LUA = """
local v = redis.call('GET', KEYS[1])
if v then
  local sep = string.find(v, '|', 1, true)
  local owner = string.sub(v, 1, sep - 1)
  local until_ts = tonumber(string.sub(v, sep + 1))
  if owner == ARGV[1] then return owner end
  if until_ts > tonumber(ARGV[2]) then return owner end
end
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. ARGV[3], 'PX', ARGV[4])
return ARGV[1]
"""

_RELEASE_CLAIM_LUA = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, string.len(ARGV[1]) + 1) == ARGV[1] .. '|' then
  redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] zset member "weight|decision" -> ts.  ARGV: member, ts, window, limit, weight, slack, ttl
_WINDOW_LUA = """
local ts = tonumber(ARGV[2])
local lo = ts - tonumber(ARGV[3])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', '(' .. (lo - tonumber(ARGV[6])))
local used = 0
for _, m in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '(' .. lo, '+inf')) do
  used = used + tonumber(string.sub(m, 1, string.find(m, '|', 1, true) - 1))
end
if redis.call('ZSCORE', KEYS[1], ARGV[1]) then return {1, tostring(used)} end
local w = tonumber(ARGV[5])
if used + w > tonumber(ARGV[4]) + 1e-9 then return {0, tostring(used)} end
redis.call('ZADD', KEYS[1], ts, ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[7])
return {1, tostring(used + w)}
"""

# KEYS[1] zset member -> lease end; KEYS[2] member's slot pointer.
# ARGV: member, now, limit, lease_ms, group
_SLOT_LUA = """
local now = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZSCORE', KEYS[1], ARGV[1])
local n = redis.call('ZCARD', KEYS[1])
if (not held) and n >= tonumber(ARGV[3]) then return {0, n} end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[4]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], 2 * tonumber(ARGV[4]) + 60000)
redis.call('SET', KEYS[2], ARGV[5], 'PX', 2 * tonumber(ARGV[4]) + 60000)
if held then return {1, n} end
return {1, n + 1}
"""

_SLOT_RELEASE_LUA = """
local group = redis.call('GET', KEYS[1])
if group then
  redis.call('ZREM', ARGV[1] .. group, ARGV[2])
  redis.call('DEL', KEYS[1])
end
return 0
"""

# KEYS[1] breaker hash, KEYS[2] failures zset.
# ARGV: owner, now, failures, window_ms, open_ms, probe_timeout_ms
_BREAKER_LUA = """
local now = tonumber(ARGV[2])
local st = redis.call('HMGET', KEYS[1], 'state', 'opened_at', 'probe', 'probe_at', 'closed_at')
local state = st[1] or 'closed'
local opened = tonumber(st[2] or '0')
if state == 'closed' then
  local since = math.max(now - tonumber(ARGV[4]), tonumber(st[5] or '0'))
  local n = redis.call('ZCOUNT', KEYS[2], '(' .. since, '+inf')
  if n < tonumber(ARGV[3]) then return {'closed', 1, ''} end
  redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', now)
  state = 'open'
  opened = now
end
redis.call('PEXPIRE', KEYS[1], 604800000)
if state == 'open' then
  if now - opened < tonumber(ARGV[5]) then return {'open', 0, tostring(opened)} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'probe', ARGV[1], 'probe_at', now)
  return {'half_open', 1, ARGV[1]}
end
if st[3] == ARGV[1] then return {'half_open', 1, ARGV[1]} end
if now - tonumber(st[4] or '0') >= tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'probe', ARGV[1], 'probe_at', now)
  return {'half_open', 1, ARGV[1]}
end
return {'half_open', 0, st[3] or ''}
"""

_RELEASE_PROBE_LUA = """
if redis.call('HGET', KEYS[1], 'probe') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'probe', '', 'probe_at', 0)
end
return 0
"""

# KEYS[1] breaker hash, KEYS[2] failures zset, then pairs of budget zsets: (record in,
# remove from) -- a later result of the same decision replaces the earlier one.
# ARGV: member, ok (1/0), at, retention_ms
_RESULT_LUA = """
local at = tonumber(ARGV[3])
local keep = tonumber(ARGV[4])
if ARGV[2] == '0' then
  redis.call('ZADD', KEYS[2], at, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', at - keep)
  redis.call('PEXPIRE', KEYS[2], keep)
else
  redis.call('ZREM', KEYS[2], ARGV[1])
end
local st = redis.call('HMGET', KEYS[1], 'state', 'probe')
if st[1] == 'half_open' and st[2] == ARGV[1] then
  redis.call('DEL', KEYS[1])
  if ARGV[2] == '1' then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'closed_at', at)
  else
    redis.call('HSET', KEYS[1], 'state', 'open', 'opened_at', at)
  end
  redis.call('PEXPIRE', KEYS[1], keep)
end
for i = 3, #KEYS, 2 do
  redis.call('ZADD', KEYS[i], at, ARGV[1])
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', at - keep)
  redis.call('PEXPIRE', KEYS[i], keep)
  redis.call('ZREM', KEYS[i + 1], ARGV[1])
end
return 0
"""


def _s(v: object) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


class RedisGuardStore:
    """Guard state in Redis, shared by every worker and actuator of one ``prefix``.

    Each operation is one atomic Lua script, so concurrent workers and
    actuators never both take the last slot.  Keys: ``{prefix}:claim:*``
    (cooldowns), ``{prefix}:g:*`` (everything else).
    """

    def __init__(self, client, prefix: str = "ia") -> None:
        self.client = client
        self.prefix = prefix
        self._claim = client.register_script(_CLAIM_LUA)
        self._release_claim = client.register_script(_RELEASE_CLAIM_LUA)
        self._window = client.register_script(_WINDOW_LUA)
        self._slot = client.register_script(_SLOT_LUA)
        self._slot_release = client.register_script(_SLOT_RELEASE_LUA)
        self._breaker = client.register_script(_BREAKER_LUA)
        self._release_probe = client.register_script(_RELEASE_PROBE_LUA)
        self._result = client.register_script(_RESULT_LUA)
        self._known_fleet: set[tuple[str, str]] = set()
        self._known_since = time.monotonic()

    def _k(self, *parts: str) -> str:
        return ":".join((self.prefix, "g", *parts))

    async def claim(self, key: str, owner: str, ts: int, until_ts: int) -> str:
        holder = await self._claim(keys=[f"{self.prefix}:claim:{key}"],
                                   args=[owner, ts, until_ts, CLAIM_GC_MS])
        return _s(holder)

    async def release_claim(self, key: str, owner: str) -> None:
        await self._release_claim(keys=[f"{self.prefix}:claim:{key}"], args=[owner])

    async def window_admit(self, key: str, member: str, ts: int, window_ms: int, limit: float,
                           weight: float = 1.0) -> tuple[bool, float]:
        ok, used = await self._window(
            keys=[self._k("win", key)],
            args=[_weighted(member, weight), ts, window_ms, repr(float(limit)),
                  repr(float(weight)), WINDOW_SLACK_MS, window_ms + CLAIM_GC_MS])
        return bool(int(ok)), float(_s(used))

    async def window_release(self, key: str, member: str, weight: float = 1.0) -> None:
        await self.client.zrem(self._k("win", key), _weighted(member, weight))

    async def slot_acquire(self, group: str, member: str, now: int, limit: int,
                           lease_ms: int) -> tuple[bool, int]:
        ok, n = await self._slot(keys=[self._k("slots", group), self._k("slot-of", member)],
                                 args=[member, now, limit, lease_ms, group])
        return bool(int(ok)), int(n)

    async def slot_release(self, member: str) -> None:
        await self._slot_release(keys=[self._k("slot-of", member)],
                                 args=[self._k("slots", ""), member])

    async def note_group(self, member: str, group: str) -> None:
        await self.client.set(self._k("group-of", member), group, ex=GROUP_TTL_S)

    async def group_of(self, member: str) -> str | None:
        raw = await self.client.get(self._k("group-of", member))
        return None if raw is None else _s(raw)

    async def fleet_add(self, group: str, entities: Iterable[str]) -> None:
        # Members already added recently are skipped (one round trip saved per
        # event); the cache is forgotten hourly so the key's TTL is refreshed.
        if time.monotonic() - self._known_since > 3600 or len(self._known_fleet) > 100_000:
            self._known_fleet.clear()
            self._known_since = time.monotonic()
        new = [e for e in set(entities) if (group, e) not in self._known_fleet]
        if not new:
            return
        key = self._k("fleet", group)
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.sadd(key, *new)
            pipe.expire(key, FLEET_TTL_S)
            await pipe.execute()
        self._known_fleet.update((group, e) for e in new)

    async def fleet_size(self, group: str) -> int:
        return int(await self.client.scard(self._k("fleet", group)))

    async def breaker_check(self, key: str, owner: str, now: int, failures: int,
                            window_ms: int, open_ms: int, probe_timeout_ms: int
                            ) -> BreakerVerdict:
        state, allowed, detail = await self._breaker(
            keys=[self._k("cb", key), self._k("cb-fail", key)],
            args=[owner, now, failures, window_ms, open_ms, probe_timeout_ms])
        return BreakerVerdict(_s(state), bool(int(allowed)), _s(detail))

    async def breaker_release_probe(self, key: str, owner: str) -> None:
        await self._release_probe(keys=[self._k("cb", key)], args=[owner])

    async def record_result(self, breaker_key: str, budget_scopes: Sequence[str], member: str,
                            ok: bool, at: int) -> None:
        here, other = ("ok", "fail") if ok else ("fail", "ok")
        budget = [k for scope in budget_scopes
                  for k in (self._k("eb", scope, here), self._k("eb", scope, other))]
        await self._result(keys=[self._k("cb", breaker_key), self._k("cb-fail", breaker_key),
                                 *budget],
                           args=[member, "1" if ok else "0", at, RESULT_RETENTION_MS])

    async def results(self, scope: str, now: int, window_ms: int) -> tuple[int, int]:
        lo = f"({now - window_ms}"
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.zcount(self._k("eb", scope, "ok"), lo, "+inf")
            pipe.zcount(self._k("eb", scope, "fail"), lo, "+inf")
            ok, failed = await pipe.execute()
        return int(ok), int(failed)


# The cooldown-only names of the first version; the stores now hold every guard.
MemoryClaimStore = MemoryGuardStore
RedisClaimStore = RedisGuardStore


# --- the kill switch ------------------------------------------------------------------------


def kill_switch_key(prefix: str) -> str:
    return f"{prefix}:paused"


class KillSwitch:
    """The global kill switch: ``ia pause`` sets ``{prefix}:paused``, ``ia resume`` clears it.

    :meth:`paused` is what hot paths call: it reads Redis at most every
    ``refresh_s`` (200 ms) and otherwise answers from its cache, so a pause is
    honoured within ``refresh_s`` plus the time one batch takes.  Workers
    turn every action decision into ``blocked`` (trace ``guard:kill_switch``);
    actuators refuse to execute (outcome ``blocked``).
    """

    def __init__(self, client, prefix: str = "ia", refresh_s: float = KILL_SWITCH_REFRESH_S
                 ) -> None:
        self.client = client
        self.key = kill_switch_key(prefix)
        self.refresh_s = refresh_s
        self._checked = -math.inf
        self._info: dict | None = None

    async def paused(self) -> bool:
        return (await self.info()) is not None

    async def info(self) -> dict | None:
        """Who paused, when and why (cached), or ``None`` when automation runs."""
        now = time.monotonic()
        if now - self._checked >= self.refresh_s:
            raw = await self.client.get(self.key)
            self._info = _pause_info(raw)
            self._checked = now
        return self._info

    async def pause(self, by: str = "", reason: str = "") -> dict:
        info = {"at": now_ms(), "by": by[:256], "reason": reason[:1024]}
        await self.client.set(self.key, json.dumps(info))
        self._checked = -math.inf
        return info

    async def resume(self) -> bool:
        self._checked = -math.inf
        return bool(await self.client.delete(self.key))


def _pause_info(raw: bytes | str | None) -> dict | None:
    if raw is None:
        return None
    try:
        info = json.loads(raw)
        return info if isinstance(info, dict) else {"reason": str(info)}
    except ValueError:
        return {"reason": _s(raw)}


class MemoryKillSwitch:
    """A kill switch in memory (replay, the policy tester): off unless told."""

    def __init__(self, paused: bool = False) -> None:
        self._info = {"at": 0, "by": "test", "reason": "paused"} if paused else None

    async def paused(self) -> bool:
        return self._info is not None

    async def info(self) -> dict | None:
        return self._info


def _pause_reason(info: dict) -> str:
    by = f" by {info['by']}" if info.get("by") else ""
    why = f": {info['reason']}" if info.get("reason") else ""
    return f"automation paused{by}{why} (ia resume to continue)"


# --- evaluating the guards for a decision -----------------------------------------------------


@dataclass
class GuardVerdict:
    mode: Mode
    interventions: list[str] = field(default_factory=list)


def _trace(result: PolicyResult, guard: str, reason: str, matched: bool = True) -> None:
    result.trace.append(RuleTrace(rule=f"guard:{guard}", matched=matched, reason=reason))


def breaker_key(action: Action) -> str:
    return f"{action.type}:{action.target}"


def blast_group(br: BlastRadius, labels: dict[str, str]) -> str:
    """The service group an action counts against: ``label=value``, or ``all``."""
    if br.group_label is None:
        return "all"
    return f"{br.group_label}={labels.get(br.group_label, '')}"


async def blast_limit(store: GuardStore, br: BlastRadius, group: str) -> tuple[int, str]:
    """In-flight actions allowed in ``group`` now, and how that was worked out."""
    limits: list[tuple[int, str]] = []
    if br.max_concurrent is not None:
        limits.append((br.max_concurrent, f"max_concurrent {br.max_concurrent}"))
    if br.max_fleet_pct is not None:
        size = br.fleet_size or await store.fleet_size(group)
        # At least one, or a small fleet could never be automated at all.
        n = max(1, math.floor(size * br.max_fleet_pct / 100 + 1e-9))
        limits.append((n, f"{br.max_fleet_pct:g}% of a fleet of {size}"))
    return min(limits)


def budget_scopes(action_type: str, rule: str | None) -> list[str]:
    """Error-budget counters one outcome feeds (every scope a policy may ask for)."""
    scopes = ["global", f"type:{action_type}"]
    if rule:
        scopes.append(f"rule:{rule}")
    return scopes


def _budget_scope(scope: str, action: Action, rule: str | None) -> str:
    return {"global": "global", "action_type": f"type:{action.type}"}.get(scope, f"rule:{rule}")


async def observe_fleet(store: GuardStore, policy: Policy,
                        events: Sequence[TelemetryEvent]) -> None:
    """Count the entities of each service group, for ``max_fleet_pct`` (worker, per batch)."""
    if not policy.fleet_labels:
        return
    groups: dict[str, set[str]] = {}
    for ev in events:
        for label in policy.fleet_labels:
            group = "all" if label is None else f"{label}={ev.labels.get(label, '')}"
            groups.setdefault(group, set()).add(ev.entity)
    for group, entities in groups.items():
        await store.fleet_add(group, entities)


async def apply_guards(result: PolicyResult, *, decision_id: str, ts: int, now: int,
                       labels: dict[str, str], store: GuardStore,
                       kill_switch: KillSwitch | MemoryKillSwitch | None = None,
                       lease_ms: int | None = None) -> GuardVerdict:
    """Run every guard over one policy result; append interventions to ``result.trace``.

    ``ts`` is the event time (cooldown, rate limit, cost cap), ``now`` the
    engine's clock (kill switch, breaker, error budget, blast radius).
    ``lease_ms`` overrides blast-radius leases (the policy tester uses it to
    model how long actions take).  Returns the final mode and the names of
    the guards that intervened.
    """
    verdict = GuardVerdict(result.mode)
    action = result.action
    if action is None or result.mode in (Mode.shadow, Mode.none, Mode.blocked):
        return verdict
    g = result.guards
    undo: list[Callable[[], Awaitable[None]]] = []

    async def block(guard: str, reason: str) -> GuardVerdict:
        _trace(result, guard, reason)
        verdict.interventions.append(guard)
        for step in reversed(undo):
            await step()
        verdict.mode = Mode.blocked
        return verdict

    if kill_switch is not None and (info := await kill_switch.info()) is not None:
        return await block("kill_switch", _pause_reason(info))

    cb = g.circuit_breaker
    if cb is not None and verdict.mode in (Mode.auto, Mode.needs_approval):
        key = breaker_key(action)
        b = await store.breaker_check(key, decision_id, now, cb.failures,
                                      int(cb.window_s * 1000), int(cb.open_s * 1000),
                                      int(cb.probe_timeout_s * 1000))
        if not b.allowed:
            if b.state == "open":
                return await block("circuit_breaker", (
                    f"open for {action.type} on {action.target}: >= {cb.failures} failures "
                    f"within {cb.window_s:g}s; half-open probe after {cb.open_s:g}s"))
            return await block("circuit_breaker", (
                f"half-open for {action.type} on {action.target}: probe {b.detail} in flight"))
        if b.state == "half_open":
            _trace(result, "circuit_breaker", (
                f"half-open for {action.type} on {action.target}: this decision is the probe"),
                matched=False)
            undo.append(lambda k=key: store.breaker_release_probe(k, decision_id))

    eb = g.error_budget
    if eb is not None and verdict.mode is Mode.auto:
        scope = _budget_scope(eb.scope, action, result.rule)
        ok, failed = await store.results(scope, now, int(eb.window_s * 1000))
        total = ok + failed
        burn = (failed / total) / (1 - eb.slo) if total else 0.0
        if total >= eb.min_actions and burn > eb.max_burn_rate:
            _trace(result, "error_budget", (
                f"{failed} of {total} automated actions ({eb.scope}) failed within "
                f"{eb.window_s:g}s: burn rate {burn:.1f}x > {eb.max_burn_rate:g}x of a "
                f"{1 - eb.slo:.1%} budget; downgraded to needs_approval"))
            verdict.interventions.append("error_budget")
            verdict.mode = Mode.needs_approval

    br = g.blast_radius
    if br is not None and verdict.mode in (Mode.auto, Mode.needs_approval):
        # The executor checks again when the action runs, for the same group.
        await store.note_group(decision_id, blast_group(br, labels))
    if br is not None and verdict.mode is Mode.auto:
        group = blast_group(br, labels)
        limit, why = await blast_limit(store, br, group)
        held, in_use = await store.slot_acquire(group, decision_id, now, limit,
                                                lease_ms or int(br.lease_s * 1000))
        if not held:
            return await block("blast_radius", (
                f"{in_use} actions already in flight in group {group} (limit {limit}: {why})"))
        undo.append(lambda: store.slot_release(decision_id))

    if g.cooldown_s > 0:
        scope = "target" if g.cooldown_per == "target" else f"{result.rule}:{action.type}"
        key = f"cooldown:{scope}:{action.target}"
        holder = await store.claim(key, decision_id, ts, ts + int(g.cooldown_s * 1000))
        if holder != decision_id:
            return await block("cooldown", (
                f"{action.target} in cooldown ({g.cooldown_s:g}s) after decision {holder}"))
        undo.append(lambda k=key: store.release_claim(k, decision_id))

    rl = g.rate_limit
    if rl is not None:
        rkey = f"rate:{result.rule}" + (f":{action.target}" if rl.per == "target" else "")
        admitted, used = await store.window_admit(rkey, decision_id, ts, rl.window_ms, rl.max)
        if not admitted:
            per = f" on {action.target}" if rl.per == "target" else ""
            return await block("rate_limit", (
                f"rule {result.rule} already acted {used:g} times{per} within "
                f"{rl.window_ms / 1000:g}s (max {rl.max})"))
        undo.append(lambda k=rkey: store.window_release(k, decision_id))

    cap = g.cost_cap
    if cap is not None and g.cost > 0 and verdict.mode in (Mode.auto, Mode.needs_approval):
        admitted, used = await store.window_admit("cost", decision_id, ts,
                                                  int(cap.window_s * 1000), cap.max, g.cost)
        if not admitted:
            return await block("cost_cap", (
                f"cost {g.cost:g} would exceed the cap: {used:g} of {cap.max:g} spent "
                f"within {cap.window_s:g}s"))
    return verdict


# --- the actuator's side --------------------------------------------------------------------


def rule_of(decision: Decision) -> str | None:
    """The policy rule that chose ``decision``'s action (from its rule trace)."""
    for t in reversed(decision.rule_trace):
        if t.matched and not t.rule.startswith("guard:"):
            return t.rule
    return None


class ExecutionGuard:
    """Execution-time guards and outcome accounting, for whatever executes actions.

    Decision-time state can be stale by the time an action runs (a queue of
    decisions made before the breaker opened, a kill switch thrown since), so
    the executor asks again right before running, and reports every outcome::

        guard = ExecutionGuard(redis, prefix, policy_source.current)
        refusal = await guard.admit(decision)     # after the idempotency claim
        if refusal:
            outcome = <status blocked, detail=refusal>
        else:
            outcome = <run the actuator>
        await guard.finished(decision, outcome)   # always, whatever the status

    :meth:`admit` checks the kill switch, the circuit breaker of the action
    type and target (taking the half-open probe if the breaker is due one)
    and the blast radius (holding an in-flight slot, renewing the one the
    worker reserved).  :meth:`finished` releases the slot and feeds the
    outcome to the breaker and the error budgets.  Approved ``needs_approval``
    decisions go through the same two calls when they are executed.
    """

    def __init__(self, client, prefix: str = "ia",
                 policy: Callable[[], Policy] | None = None,
                 kill_switch: KillSwitch | None = None,
                 clock: Callable[[], int] = now_ms) -> None:
        self.store = RedisGuardStore(client, prefix)
        self.kill_switch = kill_switch or KillSwitch(client, prefix)
        self.policy = policy
        self.clock = clock

    def _settings(self, decision: Decision):
        from ia.decisions.policy import CircuitBreaker, RuleGuards

        if self.policy is None:
            return RuleGuards(circuit_breaker=CircuitBreaker())
        return self.policy().guards_for(rule_of(decision))

    async def admit(self, decision: Decision, labels: dict[str, str] | None = None
                    ) -> str | None:
        """``None`` if ``decision``'s action may run now, else why not (outcome ``blocked``).

        ``labels`` are the triggering event's labels (blast-radius group); the
        executor normally has only the decision, whose group the worker
        already reserved, so it is looked up from that reservation.
        """
        action = decision.action
        if action is None:
            return None
        info = await self.kill_switch.info()
        if info is not None:
            return f"kill switch: {_pause_reason(info)}"
        g = self._settings(decision)
        now = self.clock()
        cb: CircuitBreaker | None = g.circuit_breaker
        probe_key = None
        if cb is not None:
            key = breaker_key(action)
            b = await self.store.breaker_check(
                key, decision.decision_id, now, cb.failures, int(cb.window_s * 1000),
                int(cb.open_s * 1000), int(cb.probe_timeout_s * 1000))
            if not b.allowed:
                what = "open" if b.state == "open" else f"half-open, probe {b.detail} in flight"
                return f"circuit breaker {what} for {action.type} on {action.target}"
            if b.state == "half_open":
                probe_key = key
        br = g.blast_radius
        if br is not None:
            group = await self._group_of(decision, br, labels)
            limit, why = await blast_limit(self.store, br, group)
            held, in_use = await self.store.slot_acquire(
                group, decision.decision_id, now, limit, int(br.lease_s * 1000))
            if not held:
                if probe_key:
                    await self.store.breaker_release_probe(probe_key, decision.decision_id)
                return (f"blast radius: {in_use} actions in flight in group {group} "
                        f"(limit {limit}: {why})")
        return None

    async def _group_of(self, decision: Decision, br: BlastRadius,
                        labels: dict[str, str] | None) -> str:
        if labels is not None:
            return blast_group(br, labels)
        return await self.store.group_of(decision.decision_id) or blast_group(br, {})

    async def finished(self, decision: Decision, status: str | object,
                       at: int | None = None) -> None:
        """Account for a finished (or refused) action: ``status`` is an outcome or its status.

        Releases the blast-radius slot; ``succeeded``/``verified`` and
        ``failed``/``timeout``/``verification_failed``/``rolled_back`` feed the
        circuit breaker and the error budgets; other statuses only release.
        """
        await self.store.slot_release(decision.decision_id)
        value = getattr(status, "status", status)
        value = getattr(value, "value", value)
        await record_outcome(self.store, decision, str(value), at or self.clock())


async def record_outcome(store: GuardStore, decision: Decision, status: str, at: int) -> None:
    """Feed one outcome of ``decision`` to its circuit breaker and the error budgets."""
    if decision.action is None or (status not in OK_STATUSES and status not in FAILED_STATUSES):
        return
    await store.record_result(breaker_key(decision.action),
                              budget_scopes(decision.action.type, rule_of(decision)),
                              decision.decision_id, status in OK_STATUSES, at)
