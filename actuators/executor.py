"""Executes action decisions safely and reports an outcome for each.

Guarantees, all backed by Redis so they hold across actuator processes:

* **At most once per decision id, and never dropped without a trace.**
  Before running, the executor claims ``{prefix}:act:{decision_id}`` with
  ``SET NX`` (``claimed:{owner}:{since}``); right before the action runs the
  claim becomes ``running:{owner}:{since}`` and, once the outcome is recorded,
  ``done:{status}``.  A delivery that finds the claim

  - ``done``: reports ``skipped_duplicate`` with the first delivery's status
    (or ``interrupted`` again, if that is what it was);
  - held by a live actuator: waits for it (at most the claim lease, the
    action timeout + ``claim_grace_s``);
  - ``claimed`` but abandoned (its owner failed or died before the action
    started: this executor's own failed attempt, or older than the lease):
    takes it over and runs the action;
  - ``running`` but abandoned: reports ``interrupted``.  The action may have
    run, so it is not run again (repeating a restart or rollback is worse
    than reporting it); its result is unknown.

  An action that ran but whose outcome could not be recorded (a Redis blip)
  has its real outcome recorded and reported by the retry.  Approved, rejected
  and expired approvals settle through the same claim, so a decision gets one
  action outcome whatever path it takes.
* **Execution-time guards** (:class:`ia.decisions.guards.ExecutionGuard`):
  once the target lock is held, right before running, the kill switch, the
  circuit breaker and the blast radius are checked again (decision-time state
  can be stale, and so is anything checked before a wait for the lock); every
  outcome is fed back to the breaker and the error budgets.
* **One action per target at a time**, through a Redis lock.
* **A timeout on every action.**
* **Verification scheduled with the outcome**: the ``done`` claim of an action
  that declares a verification and the pending verification are written in
  one transaction, so a crash cannot keep one and lose the other.

Only ``auto`` decisions run on delivery.  ``needs_approval`` decisions run
through :meth:`ActionExecutor.run` once approved; ``notify`` decisions send a
notification describing the action instead of running it; ``shadow`` and
``blocked`` decisions are only reported.  A compensating action runs through
the actuator's ``compensate`` method when it has one (the webhook actuators
do: their own ``Idempotency-Key`` and a body that says so).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

from redis.exceptions import LockError, RedisError

from ia.actuators.approvers import approved_by
from ia.actuators.base import ActionFailed, Actuator
from ia.actuators.builtin import NotifyActuator
from ia.actuators.verification import SpecError, VerificationJob, Verifier, spec_of
from ia.core.clock import now_ms
from ia.core.keys import Keys
from ia.core.times import iso
from ia.schemas.models import (
    Action,
    ActionOutcome,
    ApprovalEvent,
    Decision,
    Mode,
    OutcomePhase,
    OutcomeStatus,
)

log = logging.getLogger("ia.actuate")

CLAIM_TTL_S = 7 * 24 * 3600
LOCK_POLL_S = 0.005
CLAIM_POLL_S = 0.05

# Compare-and-set of a claim: only whoever holds the value ARGV[1] moves it on
# (to ARGV[2], or deletes it when ARGV[2] is empty).
_SWAP = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[2] == '' then redis.call('DEL', KEYS[1])
else redis.call('SET', KEYS[1], ARGV[2], 'EX', ARGV[3]) end
return 1
"""


def _int(text: str) -> int:
    return int(text) if text.isdigit() else 0


@dataclass(frozen=True)
class Claim:
    """The value of an action claim: its state, who holds it and since when (epoch ms).

    ``state`` is ``claimed``, ``running`` or ``done``; ``status`` is the
    outcome status once done.  A claim written before owners were recorded
    (``running:{since}``) parses with an empty owner.
    """

    state: str
    owner: str = ""
    since: int = 0
    status: str = ""

    @classmethod
    def parse(cls, raw: bytes) -> Claim:
        state, _, rest = raw.decode(errors="replace").partition(":")
        if state == "done":
            status, _, rest = rest.partition(":")
            owner, _, since = rest.partition(":")
            return cls(state, owner, _int(since), status)
        owner, _, since = rest.rpartition(":")
        return cls(state, owner, _int(since))

    def encode(self) -> str:
        if self.state != "done":
            return f"{self.state}:{self.owner}:{self.since}"
        return f"done:{self.status}" + (f":{self.owner}:{self.since}" if self.owner else "")


@dataclass
class _Held:
    """A claim this executor holds: its key, its current value, and whether the action started."""

    key: str
    value: str
    started: bool = False


class ActionExecutor:
    def __init__(self, redis, actuators: Mapping[str, Actuator], prefix: str = "ia",
                 timeout_s: float = 10.0, guard=None,
                 notifier: NotifyActuator | None = None,
                 verifier: Verifier | None = None, claim_grace_s: float = 5.0) -> None:
        """``guard`` is an :class:`~ia.decisions.guards.ExecutionGuard` (None: no
        execution-time guards); ``notifier`` tells humans about ``notify``
        decisions (None: they are only reported); ``verifier`` schedules the
        verification an action declares (None: none is scheduled).  A claim
        whose owner has not moved it on within the action timeout +
        ``claim_grace_s`` is taken to be abandoned."""
        self.redis = redis
        self.actuators = dict(actuators)
        self.keys = Keys(prefix)
        self.timeout_s = timeout_s
        self.guard = guard
        self.notifier = notifier
        self.verifier = verifier
        self.owner = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lease_ms = int((timeout_s + claim_grace_s) * 1000)
        self._in_flight: set[str] = set()  # claim keys this executor is working on now
        # Outcomes of actions that ran but could not be recorded, by claim key:
        # the retry records and reports them rather than calling them interrupted.
        self._unrecorded: dict[str, ActionOutcome] = {}

    def _outcome(self, d: Decision, status: OutcomeStatus, started: int, detail: str,
                 error: str | None = None, attempts: int = 0, *,
                 phase: OutcomePhase = OutcomePhase.action, action: Action | None = None,
                 approval: ApprovalEvent | None = None) -> ActionOutcome:
        action = action or d.action
        assert action is not None
        finished = now_ms()
        approved = approval is not None and status not in (
            OutcomeStatus.blocked, OutcomeStatus.skipped_duplicate, OutcomeStatus.rejected)
        return ActionOutcome(
            decision_id=d.decision_id, entity=d.entity, action_type=action.type,
            target=action.target, status=status, actuator=action.type,
            started_at=started, finished_at=finished,
            duration_ms=float(max(0, finished - started)), attempts=attempts, detail=detail,
            error=error, phase=phase,
            approval_id=approval.approval_id if approval else None,
            approved_by=approved_by(approval) if approved and approval else None)

    # -- the claim ---------------------------------------------------------------------------

    def _abandoned(self, key: str, held: Claim) -> bool:
        mine_and_idle = held.owner == self.owner and key not in self._in_flight
        return mine_and_idle or now_ms() - held.since > self._lease_ms

    async def _swap(self, key: str, expected: bytes | str, new: str) -> bool:
        return bool(await self.redis.eval(_SWAP, 1, key, expected, new, CLAIM_TTL_S))

    async def _acquire(self, key: str) -> _Held | Claim:
        """Hold ``key``'s claim (a :class:`_Held`), or the state it settled in (a :class:`Claim`).

        Waits while another live actuator holds it; takes over a claim
        abandoned before its action started; settles one abandoned after it
        may have started as ``done:interrupted``.
        """
        while True:
            mine = Claim("claimed", self.owner, now_ms()).encode()
            if await self.redis.set(key, mine, nx=True, ex=CLAIM_TTL_S):
                self._in_flight.add(key)
                return _Held(key, mine)
            raw = await self.redis.get(key)
            if raw is None:
                continue  # released in between: claim it again
            held = Claim.parse(raw)
            if held.state == "done":
                return held
            if not self._abandoned(key, held):
                await asyncio.sleep(CLAIM_POLL_S)
                continue
            if held.state == "running" and key in self._unrecorded:
                self._in_flight.add(key)
                return _Held(key, raw.decode(), started=True)
            if held.state == "claimed":
                if await self._swap(key, raw, mine):
                    self._in_flight.add(key)
                    return _Held(key, mine)
                continue
            # "running", or a value nothing writes: it may have started.
            interrupted = Claim("done", held.owner or "unknown", held.since, "interrupted")
            if await self._swap(key, raw, interrupted.encode()):
                return interrupted

    async def _start(self, held: _Held) -> bool:
        """Mark the claim ``running`` right before the action starts; False if it was taken over."""
        running = Claim("running", self.owner, now_ms()).encode()
        if not await self._swap(held.key, held.value, running):
            return False
        held.value, held.started = running, True
        return True

    async def _release(self, held: _Held) -> None:
        """Give up a claim whose action never started, so that a retry can run it."""
        try:
            await self._swap(held.key, held.value, "")
        except RedisError as exc:  # the retry takes it over as its own abandoned claim
            log.warning("claim %s not released (%s)", held.key, exc)

    async def _once(self, key: str, attempt: Callable[[_Held], Awaitable[ActionOutcome | None]],
                    record: Callable[[_Held, ActionOutcome], Awaitable[None]]
                    ) -> ActionOutcome | Claim | None:
        """Run ``attempt`` under ``key``'s claim and ``record`` its outcome.

        Returns the outcome, the :class:`Claim` the key had already settled
        in, or None if another actuator took the claim over before the
        action started.  If anything raises before the action starts the
        claim is released; after it started the claim stays ``running`` for
        the retry to reconcile.
        """
        held = await self._acquire(key)
        if isinstance(held, Claim):
            return held
        try:
            outcome = self._unrecorded[key] if held.started else await attempt(held)
            if outcome is not None:
                await record(held, outcome)
            return outcome
        except BaseException:
            if not held.started:
                await self._release(held)
            raise
        finally:
            self._in_flight.discard(key)

    async def _finish(self, held: _Held, decision: Decision, outcome: ActionOutcome,
                      charge: bool) -> None:
        """Record ``outcome``: the guards' accounting (if ``charge``), then the ``done``
        claim together with the verification the action declares, in one transaction."""
        if held.started:
            self._unrecorded[held.key] = outcome
        if charge and self.guard is not None:
            await self.guard.finished(decision, outcome)
        job = await self._verification(decision, outcome)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(held.key, f"done:{outcome.status.value}", ex=CLAIM_TTL_S)
            if job is not None:
                job.queue(pipe)
            await pipe.execute()
        self._unrecorded.pop(held.key, None)

    async def _verification(self, d: Decision, outcome: ActionOutcome) -> VerificationJob | None:
        if self.verifier is None or outcome.status is not OutcomeStatus.succeeded or \
                outcome.phase is not OutcomePhase.action:
            return None
        try:
            spec = spec_of(d)
        except SpecError:  # reported by the service as a failed verification
            return None
        return None if spec is None else await self.verifier.job(d, spec)

    def _settled(self, d: Decision, claim: Claim, started: int, *,
                 phase: OutcomePhase = OutcomePhase.action,
                 approval: ApprovalEvent | None = None) -> ActionOutcome:
        """The outcome of a delivery that found ``d``'s claim settled."""
        if claim.status == "interrupted":
            return self._outcome(
                d, OutcomeStatus.interrupted, started,
                f"interrupted: actuator {claim.owner} started it at {iso(claim.since)} UTC and "
                "failed or died before recording the result; the result is unknown, so it is "
                "not run again", error="interrupted", phase=phase, approval=approval)
        return self._outcome(d, OutcomeStatus.skipped_duplicate, started,
                             f"already handled (done: {claim.status or 'unknown'})",
                             phase=phase, approval=approval)

    def _taken_over(self, d: Decision, started: int, phase: OutcomePhase = OutcomePhase.action,
                    approval: ApprovalEvent | None = None) -> ActionOutcome:
        return self._outcome(d, OutcomeStatus.skipped_duplicate, started,
                             "already handled (taken over by another actuator)", phase=phase,
                             approval=approval)

    # -- entry points ------------------------------------------------------------------------

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
        action = decision.action
        assert action is not None
        started = now_ms()

        async def attempt(held: _Held) -> ActionOutcome | None:
            admit = (lambda: self.guard.admit(decision)) if self.guard is not None else None
            outcome = await self._execute(decision, action, held, started, admit,
                                          lambda act: act.execute(action, decision))
            return None if outcome is None else _with_approval(outcome, approval)

        async def record(held: _Held, outcome: ActionOutcome) -> None:
            await self._finish(held, decision, outcome, charge=True)

        result = await self._once(self.keys.action_claim(decision.decision_id), attempt, record)
        if isinstance(result, Claim):
            return self._settled(decision, result, started, approval=approval)
        return result or self._taken_over(decision, started, approval=approval)

    async def settle(self, decision: Decision, detail: str,
                     approval: ApprovalEvent | None = None, *,
                     status: OutcomeStatus = OutcomeStatus.blocked,
                     error: str | None = None) -> ActionOutcome | None:
        """Report ``decision``'s action as not run (``blocked``, or ``rejected`` when the
        policy no longer allows it), once; None if already settled."""
        started = now_ms()

        async def attempt(held: _Held) -> ActionOutcome:
            return self._outcome(decision, status, started, detail, error=error,
                                 approval=approval)

        async def record(held: _Held, outcome: ActionOutcome) -> None:
            if self.guard is not None and decision.action is not None:
                await self.guard.release(decision)
                await self.guard.finished(decision, outcome)
            await self._finish(held, decision, outcome, charge=False)

        result = await self._once(self.keys.action_claim(decision.decision_id), attempt, record)
        if isinstance(result, Claim):
            interrupted = result.status == "interrupted"
            return self._settled(decision, result, started, approval=approval) \
                if interrupted else None
        return result

    async def compensate(self, decision: Decision, action: Action) -> ActionOutcome:
        """Run the compensating ``action`` of ``decision``, once.

        The kill switch is honoured (a paused system runs nothing); breakers
        and budgets are not charged again, the failed verification already
        was.  Asked again, it reports ``skipped_duplicate`` with the first
        run's status (or ``interrupted``).
        """
        started = now_ms()
        comp = decision.model_copy(update={"action": action})
        phase = OutcomePhase.compensation

        def call(act: Actuator) -> Awaitable[str]:
            run = getattr(act, "compensate", None)
            return run(action, decision) if run is not None else act.execute(action, comp)

        async def attempt(held: _Held) -> ActionOutcome | None:
            outcome = await self._execute(comp, action, held, started, self._paused, call)
            return None if outcome is None else outcome.model_copy(update={"phase": phase})

        async def record(held: _Held, outcome: ActionOutcome) -> None:
            await self._finish(held, comp, outcome, charge=False)

        result = await self._once(self.keys.compensation_claim(decision.decision_id), attempt,
                                  record)
        if isinstance(result, Claim):
            return self._settled(comp, result, started, phase=phase)
        return result or self._taken_over(comp, started, phase)

    async def _paused(self) -> str | None:
        info = await self.guard.kill_switch.info() if self.guard is not None else None
        if info is None:
            return None
        return f"compensation not run: automation paused " \
               f"({info.get('reason') or 'ia resume to continue'})"

    async def _notify(self, d: Decision, started: int) -> ActionOutcome:
        """``notify`` mode: tell humans what would be done; the action itself never runs."""

        async def attempt(held: _Held) -> ActionOutcome:
            if self.notifier is None:
                detail = "mode notify: not executed (no notify webhook configured)"
            else:
                try:
                    sent = await asyncio.wait_for(self.notifier.notify_instead(d),
                                                  self.timeout_s)
                    detail = f"mode notify: not executed; humans notified ({sent})"
                except (ActionFailed, TimeoutError) as exc:
                    detail = f"mode notify: not executed; notification failed: {exc}"[:2000]
            return self._outcome(d, OutcomeStatus.blocked, started, detail)

        async def record(held: _Held, outcome: ActionOutcome) -> None:
            await self._finish(held, d, outcome, charge=False)

        result = await self._once(self.keys.action_claim(d.decision_id), attempt, record)
        if isinstance(result, Claim):
            return self._settled(d, result, started)
        return result or self._taken_over(d, started)

    # -- running -----------------------------------------------------------------------------

    async def _execute(self, d: Decision, action: Action, held: _Held, started: int,
                       admit: Callable[[], Awaitable[str | None]] | None,
                       call: Callable[[Actuator], Awaitable[str]]) -> ActionOutcome | None:
        """Take the target lock, check the execution-time guards, then run the action.

        The guards run under the lock, right before the action: a pause or an
        opened breaker stops an action that was queued behind another on the
        same target.  None if the claim was taken over before the action started.
        """
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
            refusal = await admit() if admit is not None else None
            if refusal is not None:
                return self._outcome(d, OutcomeStatus.blocked, started, refusal, action=action)
            if not await self._start(held):
                return None
            return await self._invoke(d, action, started, call(actuator))
        finally:
            # The lock may have expired, or Redis be away for a moment: it expires anyway.
            with contextlib.suppress(LockError, RedisError):
                await lock.release()

    async def _invoke(self, d: Decision, action: Action, started: int,
                      running: Awaitable[str]) -> ActionOutcome:
        try:
            detail = await asyncio.wait_for(running, self.timeout_s)
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


def _with_approval(outcome: ActionOutcome, approval: ApprovalEvent | None) -> ActionOutcome:
    """An approved action's outcome names its approval, and who approved unless it was refused."""
    if approval is None:
        return outcome
    if outcome.status is OutcomeStatus.blocked:
        return outcome.model_copy(update={"approval_id": approval.approval_id})
    who = approved_by(approval)
    via = f" via {approval.via}" if not approval.approvals or len(approval.approvals) == 1 \
        else f", last via {approval.via}"
    return outcome.model_copy(update={
        "approval_id": approval.approval_id, "approved_by": who,
        "detail": f"{outcome.detail} (approved by {who}{via})"})
