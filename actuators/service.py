"""What the actuator process does, minus Kafka: decisions and approvals in,
outcomes and approval events out, plus the periodic work (expiry, verification).

Flow of one decision with an action, once its signature is verified (unsigned,
badly signed, signed with an unknown key or too old: a ``rejected`` outcome with
the reason, nothing runs -- :mod:`ia.core.signing`) and the actuator's own current
policy allows it (rule, action, params, target, mode, webhook destinations: else
a ``rejected`` outcome too -- :mod:`ia.actuators.authorisation`; checked again
when an approved or expired-to-approve request is about to run):

* ``auto`` → executed once (:class:`~actuators.executor.ActionExecutor`); if
  the action declares a verification it is scheduled with the outcome
  (:mod:`ia.actuators.verification`);
* ``needs_approval`` → an approval request is stored and announced
  (``requested`` on ``ia.approvals``); nothing runs yet.  ``approved`` runs
  the action through the same executor (outcome carries ``approval_id`` and
  ``approved_by``); ``rejected`` and ``expired`` give a ``blocked`` outcome
  with who and why (``expired`` with ``on_expiry: approve`` runs it instead);
* ``notify`` → humans are told what would be done; ``blocked`` outcome;
* ``shadow`` / ``blocked`` → ``blocked`` outcome.

:meth:`ActuatorService.tick` (every half second in each actuator process)
expires overdue approval requests, settles approvals whose resolution event
was lost, and finishes verifications: recovered → a ``verification``
outcome ``succeeded``; not recovered → ``verification`` ``failed``, then the
compensating action and its ``compensation`` outcome.  Every step is
claimed in Redis, so any number of actuator processes cooperate.  A
verification stays pending until :meth:`ActuatorService.published` is told
that its outcomes are on the topic.
"""

from __future__ import annotations

import asyncio
import logging

from pydantic import BaseModel

from ia.actuators.approvals import ApprovalStore, approval_refused
from ia.actuators.authorisation import Authoriser, Refusal
from ia.actuators.builtin import NotifyActuator
from ia.actuators.executor import ActionExecutor
from ia.actuators.verification import SpecError, Verdict, spec_of
from ia.core import clock, metrics
from ia.core.signing import KeyRing
from ia.schemas.models import (
    ActionOutcome,
    ApprovalEvent,
    ApprovalStatus,
    Decision,
    ExpiryPolicy,
    Mode,
    OutcomePhase,
    OutcomeStatus,
)

log = logging.getLogger("ia.actuate")

# A resolved approval whose outcome has not appeared after this long is
# settled by the periodic pass (its event was lost, e.g. the CLI crashed).
UNFINISHED_GRACE_MS = 10_000



class ActuatorService:
    def __init__(self, executor: ActionExecutor, approvals: ApprovalStore, keys: KeyRing,
                 *, max_age_ms: int, notifier: NotifyActuator | None = None,
                 authoriser: Authoriser | None = None) -> None:
        """Verifications are the executor's ``verifier``'s (None: no verification);
        ``keys`` verify decisions, which must have been decided within ``max_age_ms``;
        ``authoriser`` checks them against the current policy (``ia actuate`` always
        has one; None, for tests of the rest: every verified decision is allowed)."""
        self.executor = executor
        self.approvals = approvals
        self.keys = keys
        self.max_age_ms = max_age_ms
        self.notifier = notifier
        self.authoriser = authoriser

    async def on_decision(self, d: Decision) -> list[BaseModel]:
        """Records to publish for one delivered decision (outcomes, approval events).

        The signature is checked before anything else, then the decision against the
        current policy (approval requests too: an approved forgery would run).  A
        replayed genuine decision passes and meets the executor's claim on its
        ``decision_id``: it does not run twice.
        """
        if d.action is None:
            return []
        refused = self.keys.check(d.model_dump(mode="json"), clock.now_ms(), self.max_age_ms)
        if refused is not None:
            _count_refusal(d, refused.value, "signature check")
            return [_rejected(d, refused.value, "signature",
                              f"decision rejected before execution: {refused.value}")]
        disallowed = self._disallowed(d)
        if disallowed is not None:
            return [_rejected(d, disallowed.reason.value, "policy",
                              f"not allowed by the current policy: {disallowed.detail}")]
        if d.mode is Mode.needs_approval:
            ev, created = await self.approvals.request(d)
            if created and self.notifier is not None:
                await self._announce(d)
            # Re-announced on redelivery (same bytes); nothing once resolved.
            return [ev] if ev.status is ApprovalStatus.requested else []
        outcome = await self.executor.handle(d)
        return await self._after_action(d, outcome)

    def _disallowed(self, d: Decision) -> Refusal | None:
        """Why the current policy does not allow ``d`` (logged and counted; None: it does)."""
        refusal = self.authoriser.check(d) if self.authoriser is not None else None
        if refusal is not None:
            _count_refusal(d, refusal.reason.value, refusal.detail)
        return refusal

    async def _announce(self, d: Decision) -> None:
        assert self.notifier is not None and d.action is not None
        try:
            await asyncio.wait_for(self.notifier.announce(d), self.executor.timeout_s)
        except Exception as exc:  # a chat outage must not hold up the approval
            log.warning("approval request %s not announced: %s", d.decision_id, exc)

    async def _after_action(self, d: Decision, outcome: ActionOutcome | None
                            ) -> list[BaseModel]:
        if outcome is None:
            return []
        out: list[BaseModel] = [outcome]
        if outcome.status is not OutcomeStatus.succeeded or outcome.phase is not \
                OutcomePhase.action:
            return out
        try:
            spec_of(d)  # a valid one was scheduled with the outcome
        except SpecError as exc:
            out.append(self._verification(d, outcome.finished_at, clock.now_ms(), False,
                                          f"invalid verification: {exc}"))
        return out

    def _verification(self, d: Decision, started: int, finished: int, ok: bool, detail: str
                      ) -> ActionOutcome:
        assert d.action is not None
        return ActionOutcome(
            decision_id=d.decision_id, entity=d.entity, action_type=d.action.type,
            target=d.action.target,
            status=OutcomeStatus.succeeded if ok else OutcomeStatus.failed, actuator="verifier",
            started_at=started, finished_at=finished,
            duration_ms=float(max(0, finished - started)),
            detail=detail, error=None if ok else "verification failed",
            phase=OutcomePhase.verification)

    async def on_approval(self, ev: ApprovalEvent) -> list[BaseModel]:
        """Records to publish for one approval event (the outcome of a resolution)."""
        if ev.status is ApprovalStatus.requested:
            return []
        found = await self.approvals.get(ev.approval_id)
        if found is None:
            log.warning("approval %s is unknown here (expired from Redis?)", ev.approval_id)
            metrics.APPROVAL_EVENTS_IGNORED.labels(reason="unknown").inc()
            return []
        current, d = found
        if current.status is ApprovalStatus.requested:
            # Only the store's state counts: an event claiming otherwise is ignored.
            log.warning("ignoring %s event for approval %s that is still requested",
                        ev.status.value, ev.approval_id)
            metrics.APPROVAL_EVENTS_IGNORED.labels(reason="still_requested").inc()
            return []
        return await self._settle(current, d)

    async def _settle(self, ev: ApprovalEvent, d: Decision) -> list[BaseModel]:
        run = ev.status is ApprovalStatus.approved or (
            ev.status is ApprovalStatus.expired and ev.on_expiry is ExpiryPolicy.approve)
        refused = await self.approvals.release_refusal(ev.approval_id, d, self.keys) \
            if run else None
        if refused is not None:  # Redis said approved; the signed records do not
            await self.approvals.finish(ev.approval_id)
            return [approval_refused(d, ev, refused)]
        # The policy may have changed while the request waited: it must still allow it.
        disallowed = self._disallowed(d) if run else None
        if disallowed is not None:
            outcome = await self.executor.settle(
                d, f"approved, but not allowed by the current policy: {disallowed.detail}",
                approval=ev, status=OutcomeStatus.rejected,
                error=f"rejected: {disallowed.reason.value}")
            out = [outcome] if outcome is not None else []
        elif run:
            outcome = await self.executor.run(d, approval=ev)
            if outcome.status is OutcomeStatus.skipped_duplicate:
                await self.approvals.finish(ev.approval_id)
                return []  # settled before (a re-sent event); reported then
            out = await self._after_action(d, outcome)
        else:
            what = "rejected" if ev.status is ApprovalStatus.rejected else "expired"
            detail = f"approval {what} by {ev.by} via {ev.via}" + \
                (f": {ev.reason}" if ev.reason else "")
            outcome = await self.executor.settle(d, detail, approval=ev)
            out = [outcome] if outcome is not None else []
        await self.approvals.finish(ev.approval_id)
        return out

    async def tick(self, now_ms: int | None = None) -> list[BaseModel]:
        """Periodic work; returns the records to publish (then call :meth:`published`)."""
        now = clock.now_ms() if now_ms is None else now_ms
        out: list[BaseModel] = []
        for ev in await self.approvals.expire_due(now):
            out.append(ev)
            found = await self.approvals.get(ev.approval_id)
            if found is not None:
                out += await self._settle(ev, found[1])
        for aid in await self.approvals.unfinished(now - UNFINISHED_GRACE_MS):
            found = await self.approvals.get(aid)
            if found is None:
                await self.approvals.finish(aid)
                continue
            ev, d = found
            log.warning("settling approval %s whose %s event was not seen", aid,
                        ev.status.value)
            settled = await self._settle(ev, d)
            if settled:
                out += [ev, *settled]  # re-announce the resolution with its outcome
        verifier = self.executor.verifier
        for verdict in await verifier.poll(now) if verifier is not None else []:
            try:
                out += await self._conclude(verdict)
            except Exception as exc:  # the job stays pending: retried at the next tick
                log.warning("verification of %s not concluded (%s: %s); retrying",
                            verdict.decision.decision_id, type(exc).__name__, exc)
        return out

    async def _conclude(self, verdict: Verdict) -> list[BaseModel]:
        """The verification outcome and, if it failed, the compensation's."""
        d = verdict.decision
        out: list[BaseModel] = [self._verification(d, verdict.started_at, verdict.at,
                                                   verdict.recovered, verdict.detail)]
        if verdict.recovered:
            return out
        if self.executor.guard is not None:
            await self.executor.guard.finished(d, "verification_failed")
        if verdict.spec.compensate is not None:
            out.append(await self.executor.compensate(d, verdict.spec.compensate))
        return out

    async def published(self, records: list[BaseModel]) -> None:
        """``records`` (from :meth:`tick`) are confirmed on their topics: the
        verifications they conclude are done."""
        verifier = self.executor.verifier
        if verifier is not None:
            await verifier.finish(r.decision_id for r in records
                                  if isinstance(r, ActionOutcome)
                                  and r.phase is OutcomePhase.verification)


def _count_refusal(d: Decision, reason: str, detail: str) -> None:
    log.warning("decision %s rejected (%s: %s): not executed", d.decision_id, reason, detail)
    metrics.DECISIONS_REJECTED.labels(reason).inc()


def _rejected(d: Decision, reason: str, by: str, detail: str) -> ActionOutcome:
    """The outcome of a decision refused before anything ran (``by``: which check)."""
    assert d.action is not None
    now = clock.now_ms()
    return ActionOutcome(
        decision_id=d.decision_id, entity=d.entity, action_type=d.action.type,
        target=d.action.target, status=OutcomeStatus.rejected, actuator=by,
        started_at=now, finished_at=now, duration_ms=0.0, detail=detail[:2000],
        error=f"rejected: {reason}")
