"""Guard state, one small protocol per mechanism.

Each guard depends only on the mechanism it uses: the cooldown on
:class:`ClaimStore`, the rate limit and the cost cap on :class:`WindowStore`,
the blast radius on :class:`SlotStore` and :class:`FleetStore`, the circuit
breaker on :class:`BreakerStore`, the error budget (and outcome accounting)
on :class:`ResultStore`, the freeze windows on :class:`FreezeStore`, the
capacity floor on :class:`HealthStore`.  :class:`GuardStore` is all of them, what one
backend offers: :class:`~ia.decisions.guards.memory.MemoryGuardStore` for
replay and the policy tester, :class:`~ia.decisions.guards.redis_store.RedisGuardStore`
for workers and actuators.  ``tests/test_guard_stores.py`` holds both to the
same conformance suite.

Times are milliseconds; ``member`` and ``owner`` are decision ids.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from ia.decisions.windows import FreezeWindow

# Claims are garbage-collected by Redis a while after they stop mattering;
# the event-time check, not the TTL, decides whether a claim blocks.
CLAIM_GC_MS = 24 * 3600 * 1000
# Window entries this much older than the window are dropped (slack for
# out-of-order events); keys expire this long after their last write.
WINDOW_SLACK_MS = 3600 * 1000
RESULT_RETENTION_MS = 7 * 24 * 3600 * 1000
FLEET_TTL_S = 7 * 24 * 3600
GROUP_TTL_S = 7 * 24 * 3600
# Runtime windows are re-read at most this often by a worker or actuator.
FREEZE_REFRESH_S = 0.5
# Runtime windows are forgotten this long after they expire.
FREEZE_RETENTION_MS = 7 * 24 * 3600 * 1000


@dataclass(frozen=True)
class HealthSpan:
    """What makes an entity healthy (ia.decisions.policy.Health, in ms)."""

    fresh_ms: int
    anomaly_ms: int
    member_ms: int


@dataclass(frozen=True)
class FloorVerdict:
    admitted: bool
    healthy: int   # healthy members left if the action goes ahead
    members: int


@dataclass(frozen=True)
class BreakerVerdict:
    state: str            # closed | open | half_open
    allowed: bool
    detail: str = ""      # open: when it opened; half_open: the probe's decision id


class ClaimStore(Protocol):
    """Exclusive claims that lapse at an event time (cooldowns)."""

    async def claim(self, key: str, owner: str, ts: int, until_ts: int) -> str:
        """Claim ``key`` for ``owner`` from ``ts`` until ``until_ts``; return the holder.

        ``owner`` keeps a claim it holds (a redelivered decision finds its
        own claim); another owner's claim blocks until its ``until_ts``.
        """
        ...

    async def release_claim(self, key: str, owner: str) -> None:
        """Drop ``key``'s claim if ``owner`` holds it."""
        ...


class WindowStore(Protocol):
    """Weighted sliding windows in event time (rate limits, cost caps)."""

    async def window_admit(self, key: str, member: str, ts: int, window_ms: int, limit: float,
                           weight: float = 1.0) -> tuple[bool, float]:
        """Admit ``member`` (weight ``weight``) if the window's total stays within ``limit``.

        The window is every entry newer than ``ts - window_ms``.  A member
        already admitted is admitted again (idempotent).  Returns (admitted,
        total including the member if admitted).
        """
        ...

    async def window_release(self, key: str, member: str, weight: float = 1.0) -> None:
        """Take ``member`` (admitted with ``weight``) out of the window again."""
        ...


class SlotStore(Protocol):
    """Leased in-flight slots per group, and which group a decision counts against."""

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
        """Remember the group of ``member``, for the execution-time check."""
        ...

    async def group_of(self, member: str) -> str | None:
        """The group noted for ``member``, if any."""
        ...


class FleetStore(Protocol):
    """The entities seen per group (the fleet a ``max_fleet_pct`` is a share of)."""

    async def fleet_add(self, group: str, entities: Iterable[str]) -> None: ...

    async def fleet_size(self, group: str) -> int: ...


class BreakerStore(Protocol):
    """Circuit breakers per action type and target."""

    async def breaker_check(self, key: str, owner: str, now: int, failures: int,
                            window_ms: int, open_ms: int, probe_timeout_ms: int
                            ) -> BreakerVerdict:
        """May ``owner`` act now?  ``failures`` within ``window_ms`` open the breaker;
        after ``open_ms`` one probe (``owner``) is let through, replaced if it
        has not reported within ``probe_timeout_ms``."""
        ...

    async def breaker_release_probe(self, key: str, owner: str) -> None:
        """Give back the half-open probe if ``owner`` holds it."""
        ...


class ResultStore(Protocol):
    """Finished actions: what breakers and error budgets learn from."""

    async def record_result(self, breaker_key: str, budget_scopes: Sequence[str], member: str,
                            ok: bool, at: int) -> None:
        """Record one finished action: breaker failures/probe result and budget counts.

        A later result of the same ``member`` replaces its earlier one.
        """
        ...

    async def results(self, scope: str, now: int, window_ms: int) -> tuple[int, int]:
        """(succeeded, failed) actions of ``scope`` finished after ``now - window_ms``."""
        ...


class FreezeStore(Protocol):
    """Windows added at run time (``ia windows``), and what execution needs of a decision."""

    async def freeze_windows(self) -> list[FreezeWindow]:
        """The windows added at run time, by name (may lag an add by :data:`FREEZE_REFRESH_S`)."""
        ...

    async def add_freeze_window(self, window: FreezeWindow) -> bool:
        """Add ``window``; False if one of that name exists (nothing changes)."""
        ...

    async def remove_freeze_window(self, name: str) -> FreezeWindow | None:
        """Remove the window called ``name``; the removed window, or None."""
        ...

    async def note_scope(self, member: str, scope: Mapping[str, Any]) -> None:
        """Remember a decision's labels and the windows that held it, for execution."""
        ...

    async def scope_of(self, member: str) -> dict[str, Any] | None:
        """What :meth:`note_scope` remembered of ``member``."""
        ...


class HealthStore(Protocol):
    """Members of capacity-floor groups and their health, from telemetry."""

    async def health_seen(self, group: str, last_seen: Mapping[str, int],
                          resolution_ms: int) -> None:
        """Entities of ``group`` sent samples at these times (a later time wins;
        a store may skip a write less than ``resolution_ms`` newer than the last)."""
        ...

    async def health_anomaly(self, group: str, entity: str, ts: int) -> None:
        """An anomalous sample of ``entity`` at ``ts``."""
        ...

    async def health_admit(self, group: str, target: str, member: str, now: int,
                           span: HealthSpan, min_pct: float, lease_ms: int,
                           reserve: bool) -> FloorVerdict:
        """Would ``group`` keep ``min_pct`` healthy with ``target`` out of service?

        Healthy: a member (seen within ``member_ms``) seen within ``fresh_ms``,
        without an anomaly within ``anomaly_ms``, and not the target of an
        admitted action whose lease runs.  ``target`` counts as out.  If
        admitted and ``reserve``, ``member`` holds ``target`` out until ``now +
        lease_ms`` (idempotent per member).  No members: not admitted.
        """
        ...

    async def health_release(self, group: str, target: str, member: str) -> None:
        """Give back ``member``'s hold on ``target``."""
        ...


class GuardStore(ClaimStore, WindowStore, SlotStore, FleetStore, BreakerStore, ResultStore,
                 FreezeStore, HealthStore, Protocol):
    """Every guard mechanism: what one backend implements."""


def weighted(member: str, weight: float) -> str:
    """A window entry: the weight travels with the member so the total is one scan."""
    return f"{weight!r}|{member}"
