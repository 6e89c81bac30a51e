"""Guard state in process memory: replay, the policy tester, unit tests.

The same semantics as :class:`~ia.decisions.guards.redis_store.RedisGuardStore`
(``tests/test_guard_stores.py`` runs one conformance suite against both), so a
replay makes the calls the worker made.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ia.decisions.guards.stores import (
    WINDOW_SLACK_MS,
    BreakerVerdict,
    FloorVerdict,
    HealthSpan,
    weighted,
)
from ia.decisions.windows import FreezeWindow


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
        self._freeze: dict[str, FreezeWindow] = {}
        self._scopes: dict[str, str] = {}
        self._seen: dict[str, dict[str, int]] = {}
        self._sick: dict[str, dict[str, int]] = {}
        self._out: dict[str, dict[tuple[str, str], int]] = {}

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
        me = weighted(member, weight)
        if me in w:
            return True, used
        if used + weight > limit + 1e-9:
            return False, used
        w[me] = ts
        return True, used + weight

    async def window_release(self, key: str, member: str, weight: float = 1.0) -> None:
        self._windows.get(key, {}).pop(weighted(member, weight), None)

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

    async def freeze_windows(self) -> list[FreezeWindow]:
        return [self._freeze[n] for n in sorted(self._freeze)]

    async def add_freeze_window(self, window: FreezeWindow) -> bool:
        if window.name in self._freeze:
            return False
        self._freeze[window.name] = window
        return True

    async def remove_freeze_window(self, name: str) -> FreezeWindow | None:
        return self._freeze.pop(name, None)

    async def note_scope(self, member: str, scope: Mapping[str, Any]) -> None:
        # Kept as JSON, as Redis keeps it: what execution reads is what was written.
        self._scopes[member] = json.dumps(scope, sort_keys=True)

    async def scope_of(self, member: str) -> dict[str, Any] | None:
        raw = self._scopes.get(member)
        return None if raw is None else json.loads(raw)

    async def health_seen(self, group: str, last_seen: Mapping[str, int],
                          resolution_ms: int) -> None:
        seen = self._seen.setdefault(group, {})
        for entity, ts in last_seen.items():
            seen[entity] = max(ts, seen.get(entity, ts))

    async def health_anomaly(self, group: str, entity: str, ts: int) -> None:
        sick = self._sick.setdefault(group, {})
        sick[entity] = max(ts, sick.get(entity, ts))

    async def health_admit(self, group: str, target: str, member: str, now: int,
                           span: HealthSpan, min_pct: float, lease_ms: int,
                           reserve: bool) -> FloorVerdict:
        seen = self._seen.setdefault(group, {})
        for e in [e for e, at in seen.items() if at < now - span.member_ms]:
            del seen[e]
        out = self._out.setdefault(group, {})
        for k in [k for k, until in out.items() if until <= now]:
            del out[k]
        away = {target} | {t for (t, m) in out if m != member}
        sick = self._sick.get(group, {})
        healthy = sum(1 for e, at in seen.items()
                      if at > now - span.fresh_ms and e not in away
                      and sick.get(e, -2**62) <= now - span.anomaly_ms)
        members = len(seen)
        admitted = members > 0 and healthy * 100 >= min_pct * members - 1e-9
        if admitted and reserve:
            out[(target, member)] = now + lease_ms
        return FloorVerdict(admitted, healthy, members)

    async def health_release(self, group: str, target: str, member: str) -> None:
        self._out.get(group, {}).pop((target, member), None)
