"""Execution time: the live guards again right before an action runs, and its outcome.

Decision-time state can be stale by the time an action runs (a queue of
decisions made before the breaker opened, a kill switch thrown since), so the
actuator runs :data:`~ia.decisions.guards.builtin.EXECUTION_GUARDS` through
the same loop as the worker, and feeds every outcome back to the breakers and
the error budgets.
"""

from __future__ import annotations

from collections.abc import Callable

from ia.core.clock import now_ms
from ia.decisions.guards.base import GuardCall, admit
from ia.decisions.guards.builtin import EXECUTION_GUARDS, breaker_key, budget_scopes
from ia.decisions.guards.kill_switch import KillSwitch, KillSwitchState
from ia.decisions.guards.redis_store import RedisGuardStore
from ia.decisions.guards.stores import ResultStore
from ia.decisions.policy import CircuitBreaker, Policy, RuleGuards
from ia.schemas.models import Decision, Mode

# An interrupted action may or may not have run: for the breaker it counts as a failure
# (stopping automation on a target whose actuator keeps dying is the safe side).
FAILED_STATUSES = frozenset({"failed", "timeout", "interrupted", "verification_failed",
                             "rolled_back"})
OK_STATUSES = frozenset({"succeeded", "verified"})


class ExecutionGuard:
    """Execution-time guards and outcome accounting, for whatever executes actions::

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
    outcome to the breaker and the error budgets; :meth:`release` gives back
    what the guards hold for a decision that will never run.  Approved
    ``needs_approval`` decisions go through the same calls when they are
    executed.
    """

    def __init__(self, client, prefix: str = "ia",
                 policy: Callable[[], Policy] | None = None,
                 kill_switch: KillSwitchState | None = None,
                 clock: Callable[[], int] = now_ms) -> None:
        self.store = RedisGuardStore(client, prefix)
        self.kill_switch = kill_switch or KillSwitch(client, prefix)
        self.policy = policy
        self.clock = clock

    def _settings(self, decision: Decision) -> RuleGuards:
        if self.policy is None:
            return RuleGuards(circuit_breaker=CircuitBreaker())
        return self.policy().guards_for(decision.chosen_rule)

    def _call(self, decision: Decision) -> GuardCall:
        assert decision.action is not None
        # Whatever its decision mode, an action about to run runs automatically now.
        return GuardCall(decision_id=decision.decision_id, action=decision.action,
                         rule=decision.chosen_rule, mode=Mode.auto,
                         settings=self._settings(decision), ts=decision.ts, now=self.clock(),
                         store=self.store, kill_switch=self.kill_switch,
                         entity=decision.entity)

    async def admit(self, decision: Decision) -> str | None:
        """``None`` if ``decision``'s action may run now, else why not (outcome ``blocked``)."""
        if decision.action is None:
            return None
        admission = await admit(EXECUTION_GUARDS, self._call(decision))
        return admission.blocked.refusal if admission.blocked else None

    async def release(self, decision: Decision) -> None:
        """Give back what the guards hold for ``decision``, which will not run.

        The worker may have made it the breaker's half-open probe: a probe that
        never runs must not hold the breaker until it times out.
        """
        if decision.action is None:
            return
        call = self._call(decision)
        for guard in reversed(EXECUTION_GUARDS):
            await guard.release(call)

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


async def record_outcome(store: ResultStore, decision: Decision, status: str, at: int) -> None:
    """Feed one outcome of ``decision`` to its circuit breaker and the error budgets."""
    if decision.action is None or (status not in OK_STATUSES and status not in FAILED_STATUSES):
        return
    await store.record_result(breaker_key(decision.action),
                              budget_scopes(decision.action.type, decision.chosen_rule),
                              decision.decision_id, status in OK_STATUSES, at)
