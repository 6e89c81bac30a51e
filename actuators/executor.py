"""Executes action decisions safely and reports an outcome for each.

Guarantees, all backed by Redis so they hold across actuator processes:

* **At most once per decision id.**  Before running, the executor claims
  ``{prefix}:act:{decision_id}`` with ``SET NX``.  A redelivered decision
  finds the claim and yields ``skipped_duplicate``.  If a process dies
  mid-action the claim stays ``running`` and the action is *not* retried:
  repeating a restart or rollback is worse than reporting it as unknown.
  Approved, rejected and expired approvals settle through the same claim,
  so a decision gets one action outcome whatever path it takes.
* **Execution-time guards** (:class:`ia.decisions.guards.ExecutionGuard`): right
  before running, the kill switch, the circuit breaker and the blast radius
  are checked again (decision-time state can be stale); every outcome is fed
  back to the breaker and the error budgets.
* **One action per target at a time**, through a Redis lock.
* **A timeout on every action.**

Only ``auto`` decisions run on delivery.  ``needs_approval`` decisions run
through :meth:`ActionExecutor.run` once approved; ``notify`` decisions send a
notification describing the action instead of running it; ``shadow`` and
``blocked`` decisions are only reported.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Mapping

from redis.exceptions import LockError

from ia.actuators.base import ActionFailed, Actuator
from ia.core.clock import now_ms
from ia.core.keys import Keys
from ia.schemas.models import (
    Action,
    ActionOutcome,
    ApprovalEvent,
    Decision,
    Mode,
    OutcomePhase,
    OutcomeStatus,
)

CLAIM_TTL_S = 7 * 24 * 3600
LOCK_POLL_S = 0.005



class ActionExecutor:
    def __init__(self, redis, actuators: Mapping[str, Actuator], prefix: str = "ia",
                 timeout_s: float = 10.0, guard=None, notifier: Actuator | None = None) -> None:
        """``guard`` is an :class:`~ia.decisions.guards.ExecutionGuard` (None: no
        execution-time guards); ``notifier`` tells humans about ``notify``
        decisions (None: they are only reported)."""
        self.redis = redis
        self.actuators = dict(actuators)
        self.keys = Keys(prefix)
        self.timeout_s = timeout_s
        self.guard = guard
        self.notifier = notifier

    def _outcome(self, d: Decision, status: OutcomeStatus, started: int, detail: str,
                 error: str | None = None, attempts: int = 0, *,
                 phase: OutcomePhase = OutcomePhase.action, action: Action | None = None,
                 approval: ApprovalEvent | None = None) -> ActionOutcome:
        action = action or d.action
        assert action is not None
        finished = now_ms()
        approved = approval is not None and status not in (OutcomeStatus.blocked,
                                                           OutcomeStatus.skipped_duplicate)
        return ActionOutcome(
            decision_id=d.decision_id, entity=d.entity, action_type=action.type,
            target=action.target, status=status, actuator=action.type,
            started_at=started, finished_at=finished,
            duration_ms=float(max(0, finished - started)), attempts=attempts, detail=detail,
            error=error, phase=phase,
            approval_id=approval.approval_id if approval else None,
            approved_by=approval.by if approved and approval else None)

    async def _claim(self, key: str, started: int) -> bool:
        return bool(await self.redis.set(key, f"running:{started}", nx=True, ex=CLAIM_TTL_S))

    async def handle(self, decision: Decision) -> ActionOutcome | None:
        """Execute ``decision``'s action if it may run; ``None`` if it has no action."""
        if decision.action is None:
            return None
        started = now_ms()
        if decision.mode is Mode.notify:
            return await self._notify(decision, started)
        if decision.mode is not Mode.auto:
            return self._outcome(decision, OutcomeStatus.blocked, started,
                                 f"mode {decision.mode.value}: not executed automatically")
        return await self.run(decision)

    async def run(self, decision: Decision, approval: ApprovalEvent | None = None
                  ) -> ActionOutcome:
        """Run the action once (whatever the mode: callers decide that it may run)."""
        assert decision.action is not None
        started = now_ms()
        claim_key = self.keys.action_claim(decision.decision_id)
        if not await self._claim(claim_key, started):
            previous = (await self.redis.get(claim_key) or b"").decode()
            return self._outcome(decision, OutcomeStatus.skipped_duplicate, started,
                                 f"already handled ({previous.split(':')[0] or 'unknown'})",
                                 approval=approval)
        refusal = await self.guard.admit(decision) if self.guard is not None else None
        if refusal is not None:
            outcome = self._outcome(decision, OutcomeStatus.blocked, started, refusal,
                                    approval=approval)
        else:
            outcome = await self._run_locked(decision, decision.action, started)
            if approval is not None:
                outcome = outcome.model_copy(update={
                    "approval_id": approval.approval_id, "approved_by": approval.by,
                    "detail": f"{outcome.detail} (approved by {approval.by} via "
                              f"{approval.via})"})
        if self.guard is not None:
            await self.guard.finished(decision, outcome)
        await self.redis.set(claim_key, f"done:{outcome.status.value}", ex=CLAIM_TTL_S)
        return outcome

    async def settle(self, decision: Decision, detail: str,
                     approval: ApprovalEvent | None = None) -> ActionOutcome | None:
        """Report ``decision``'s action as not run (``blocked``), once; None if already settled."""
        started = now_ms()
        claim_key = self.keys.action_claim(decision.decision_id)
        if not await self._claim(claim_key, started):
            return None
        outcome = self._outcome(decision, OutcomeStatus.blocked, started, detail,
                                approval=approval)
        if self.guard is not None and decision.action is not None:
            await self.guard.release(decision)
            await self.guard.finished(decision, outcome)
        await self.redis.set(claim_key, "done:blocked", ex=CLAIM_TTL_S)
        return outcome

    async def compensate(self, decision: Decision, action: Action) -> ActionOutcome | None:
        """Run the compensating ``action`` of ``decision``, once; None if already done.

        The kill switch is honoured (a paused system runs nothing); breakers
        and budgets are not charged again, the failed verification already was.
        """
        started = now_ms()
        key = self.keys.compensation_claim(decision.decision_id)
        if not await self._claim(key, started):
            return None
        info = await self.guard.kill_switch.info() if self.guard is not None else None
        if info is not None:
            outcome = self._outcome(decision, OutcomeStatus.blocked, started,
                                    "compensation not run: automation paused "
                                    f"({info.get('reason') or 'ia resume to continue'})",
                                    phase=OutcomePhase.compensation, action=action)
        else:
            outcome = await self._run_locked(decision.model_copy(update={"action": action}),
                                             action, started)
            outcome = outcome.model_copy(update={"phase": OutcomePhase.compensation})
        await self.redis.set(key, f"done:{outcome.status.value}", ex=CLAIM_TTL_S)
        return outcome

    async def _notify(self, d: Decision, started: int) -> ActionOutcome:
        """``notify`` mode: tell humans what would be done; the action itself never runs."""
        claim_key = self.keys.action_claim(d.decision_id)
        if not await self._claim(claim_key, started):
            return self._outcome(d, OutcomeStatus.skipped_duplicate, started,
                                 "already handled")
        if self.notifier is None:
            detail = "mode notify: not executed (no notify webhook configured)"
        else:
            try:
                sent = await asyncio.wait_for(self.notifier.execute(d.action, d), self.timeout_s)
                detail = f"mode notify: not executed; humans notified ({sent})"
            except (ActionFailed, TimeoutError) as exc:
                detail = f"mode notify: not executed; notification failed: {exc}"[:2000]
        await self.redis.set(claim_key, "done:blocked", ex=CLAIM_TTL_S)
        return self._outcome(d, OutcomeStatus.blocked, started, detail)

    async def _run_locked(self, d: Decision, action: Action, started: int) -> ActionOutcome:
        actuator = self.actuators.get(action.type)
        if actuator is None:
            return self._outcome(d, OutcomeStatus.failed, started, "no such actuator",
                                 error=f"unknown action type {action.type!r}", action=action)
        # A waiting action polls the lock every LOCK_POLL_S (redis-py's default of
        # 0.1 s would add up to 100 ms to every action queued behind another).
        lock = self.redis.lock(self.keys.target_lock(action.target),
                               timeout=self.timeout_s + 5, blocking_timeout=self.timeout_s,
                               sleep=LOCK_POLL_S)
        if not await lock.acquire():
            return self._outcome(d, OutcomeStatus.timeout, started,
                                 "target busy: lock not acquired", error="lock timeout",
                                 action=action)
        try:
            detail = await asyncio.wait_for(actuator.execute(action, d), self.timeout_s)
            return self._outcome(d, OutcomeStatus.succeeded, started, detail, attempts=1,
                                 action=action)
        except TimeoutError:
            return self._outcome(d, OutcomeStatus.timeout, started,
                                 f"no result within {self.timeout_s:g}s", error="timeout",
                                 action=action)
        except ActionFailed as exc:
            return self._outcome(d, OutcomeStatus.failed, started, "action failed",
                                 error=str(exc)[:2000], attempts=exc.attempts, action=action)
        except Exception as exc:  # an actuator bug must not kill the consumer
            return self._outcome(d, OutcomeStatus.failed, started, "actuator error",
                                 error=f"{type(exc).__name__}: {exc}"[:2000], action=action)
        finally:
            # The lock may have expired: then there is nothing left to release.
            with contextlib.suppress(LockError):
                await lock.release()
