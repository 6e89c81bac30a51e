"""What a guard is, and the one loop that runs a list of them.

A guard looks at one action decision (:class:`GuardCall`) and says
:class:`Pass`, :class:`Downgrade` or :class:`Block`.  It looks only at the
decision modes in its ``modes``, so which modes each guard considers is data
(and the README's guard table is checked against it).  A guard that reserves
something (a claim, a window entry, a slot, a probe) passes with
``reserved=True`` and gives it back in :meth:`Guard.release` when a later
guard blocks the decision, so a refused action uses no budget.

:func:`admit` is that loop.  Decision time (:func:`~ia.decisions.guards.decision.apply_guards`)
and execution time (:class:`~ia.decisions.guards.execution.ExecutionGuard`)
both run it, over their own list of guards.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

from ia.decisions.guards.kill_switch import KillSwitchState
from ia.decisions.guards.stores import (
    BreakerStore,
    ClaimStore,
    FleetStore,
    FreezeStore,
    GuardStore,
    HealthStore,
    ResultStore,
    SlotStore,
    WindowStore,
)
from ia.decisions.policy import RuleGuards
from ia.schemas.models import Action, Mode


@dataclass(frozen=True)
class GuardCall:
    """One action decision in front of the guards.

    ``ts`` is the event time (its age, and through :attr:`window_ts` the
    cooldown, rate limit and cost cap), ``now`` the clock of whoever asks
    (kill switch, breaker, error budget, blast radius): wall time live, event
    time offline.
    ``labels`` are the triggering event's labels at decision time; at
    execution time they are ``None`` and the blast-radius group is the one
    noted when the decision was made (the freeze windows and the capacity
    floor read the labels noted then).  ``entity`` is the entity the event was
    about.  ``lease_ms`` overrides blast-radius leases (the policy tester
    models how long actions take with it).
    """

    decision_id: str
    action: Action
    rule: str | None
    mode: Mode
    settings: RuleGuards
    ts: int
    now: int
    store: GuardStore
    kill_switch: KillSwitchState | None = None
    labels: Mapping[str, str] | None = None
    lease_ms: int | None = None
    entity: str = ""

    @property
    def window_ts(self) -> int:
        """When the event-time guards place this decision: its event time, but never
        ahead of the clock.

        Validation accepts samples stamped up to 5 minutes ahead, and the stamp is
        the producer's; an event dated ahead of the clock would otherwise be
        measured as already past a cooldown or a window that is still running.
        Events behind the clock keep their own time (a lagging worker decides
        as it would have on time), and offline, where the clock is event time,
        this is the event time.
        """
        return min(self.ts, self.now)

    # Each guard reaches the store through the one mechanism it uses.
    @property
    def claims(self) -> ClaimStore:
        return self.store

    @property
    def windows(self) -> WindowStore:
        return self.store

    @property
    def slots(self) -> SlotStore:
        return self.store

    @property
    def fleet(self) -> FleetStore:
        return self.store

    @property
    def breakers(self) -> BreakerStore:
        return self.store

    @property
    def results(self) -> ResultStore:
        return self.store

    @property
    def freeze(self) -> FreezeStore:
        return self.store

    @property
    def health(self) -> HealthStore:
        return self.store


@dataclass(frozen=True)
class Pass:
    """The decision may go on.  ``reason`` (if any) is noted in the rule trace
    without intervening; ``reserved`` says :meth:`Guard.release` has something
    to give back."""

    reserved: bool = False
    reason: str = ""


@dataclass(frozen=True)
class Downgrade:
    """The decision goes on in a lower ``mode`` (later guards see that mode)."""

    mode: Mode
    reason: str


@dataclass(frozen=True)
class Block:
    """The decision may not act.  ``reason`` goes into the rule trace; ``refusal``
    is the ``blocked`` outcome's detail when the actuator asks at execution time."""

    reason: str
    refusal: str = ""


PASS = Pass()
Verdict = Pass | Downgrade | Block


class Guard(Protocol):
    name: str
    modes: frozenset[Mode]

    async def check(self, call: GuardCall) -> Verdict:
        """Whether ``call``'s action may go on; may reserve something for it."""
        ...

    async def release(self, call: GuardCall) -> None:
        """Give back what :meth:`check` reserved for ``call`` (no-op if nothing)."""
        ...


@dataclass
class Admission:
    """What a list of guards said about one decision."""

    mode: Mode
    said: list[tuple[str, Verdict]] = field(default_factory=list)  # (guard, verdict), in order
    blocked: Block | None = None


async def admit(guards: Sequence[Guard], call: GuardCall) -> Admission:
    """Run ``guards`` in order over ``call``; the first block stops them and gives
    back what the earlier ones reserved (latest first)."""
    admission = Admission(call.mode)
    reserved: list[tuple[Guard, GuardCall]] = []
    for guard in guards:
        if call.mode not in guard.modes:
            continue
        verdict = await guard.check(call)
        if verdict.reason:
            admission.said.append((guard.name, verdict))
        if isinstance(verdict, Block):
            for holder, held in reversed(reserved):
                await holder.release(held)
            admission.mode, admission.blocked = Mode.blocked, verdict
            return admission
        if isinstance(verdict, Downgrade):
            call = replace(call, mode=verdict.mode)
            admission.mode = verdict.mode
        elif verdict.reserved:
            reserved.append((guard, call))
    return admission
