"""Executes action decisions safely and reports an outcome for each.

Guarantees, all backed by Redis so they hold across actuator processes:

* **At most once per decision id.**  Before running, the executor claims
  ``{prefix}:act:{decision_id}`` with ``SET NX``.  A redelivered decision
  finds the claim and yields ``skipped_duplicate``.  If a process dies
  mid-action the claim stays ``running`` and the action is *not* retried:
  repeating a restart or rollback is worse than reporting it as unknown.
* **One action per target at a time**, through a Redis lock.
* **A timeout on every action.**
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Mapping

from redis.exceptions import LockError

from actuators.base import ActionFailed, Actuator
from schemas.models import ActionOutcome, Decision, Mode, OutcomeStatus

CLAIM_TTL_S = 7 * 24 * 3600


def _now_ms() -> int:
    return int(time.time() * 1000)


class ActionExecutor:
    def __init__(self, redis, actuators: Mapping[str, Actuator], prefix: str = "ia",
                 timeout_s: float = 10.0) -> None:
        self.redis = redis
        self.actuators = dict(actuators)
        self.prefix = prefix
        self.timeout_s = timeout_s

    def _outcome(self, d: Decision, status: OutcomeStatus, started: int, detail: str,
                 error: str | None = None, attempts: int = 0) -> ActionOutcome:
        assert d.action is not None
        finished = _now_ms()
        return ActionOutcome(
            decision_id=d.decision_id, entity=d.entity, action_type=d.action.type,
            target=d.action.target, status=status, actuator=d.action.type,
            started_at=started, finished_at=finished,
            duration_ms=float(max(0, finished - started)), attempts=attempts, detail=detail,
            error=error)

    async def handle(self, decision: Decision) -> ActionOutcome | None:
        """Execute ``decision``'s action if it may run; ``None`` if it has no action."""
        if decision.action is None:
            return None
        started = _now_ms()
        if decision.mode is not Mode.auto:
            return self._outcome(decision, OutcomeStatus.blocked, started,
                                 f"mode {decision.mode.value}: not executed automatically")
        claim_key = f"{self.prefix}:act:{decision.decision_id}"
        claimed = await self.redis.set(claim_key, f"running:{started}", nx=True, ex=CLAIM_TTL_S)
        if not claimed:
            previous = (await self.redis.get(claim_key) or b"").decode()
            return self._outcome(decision, OutcomeStatus.skipped_duplicate, started,
                                 f"already handled ({previous.split(':')[0] or 'unknown'})")
        outcome = await self._run_locked(decision, started)
        await self.redis.set(claim_key, f"done:{outcome.status.value}", ex=CLAIM_TTL_S)
        return outcome

    async def _run_locked(self, d: Decision, started: int) -> ActionOutcome:
        assert d.action is not None
        actuator = self.actuators.get(d.action.type)
        if actuator is None:
            return self._outcome(d, OutcomeStatus.failed, started, "no such actuator",
                                 error=f"unknown action type {d.action.type!r}")
        lock = self.redis.lock(f"{self.prefix}:lock:{d.action.target}",
                               timeout=self.timeout_s + 5, blocking_timeout=self.timeout_s)
        if not await lock.acquire():
            return self._outcome(d, OutcomeStatus.timeout, started,
                                 "target busy: lock not acquired", error="lock timeout")
        try:
            detail = await asyncio.wait_for(actuator.execute(d.action, d), self.timeout_s)
            return self._outcome(d, OutcomeStatus.succeeded, started, detail, attempts=1)
        except TimeoutError:
            return self._outcome(d, OutcomeStatus.timeout, started,
                                 f"no result within {self.timeout_s:g}s", error="timeout")
        except ActionFailed as exc:
            return self._outcome(d, OutcomeStatus.failed, started, "action failed",
                                 error=str(exc)[:2000], attempts=exc.attempts)
        except Exception as exc:  # an actuator bug must not kill the consumer
            return self._outcome(d, OutcomeStatus.failed, started, "actuator error",
                                 error=f"{type(exc).__name__}: {exc}"[:2000])
        finally:
            # The lock may have expired: then there is nothing left to release.
            with contextlib.suppress(LockError):
                await lock.release()
