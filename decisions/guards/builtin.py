"""The guards, and the two lists they run in.

:data:`DECISION_GUARDS` is the README's guard table as code, in its order;
:data:`EXECUTION_GUARDS` are the live guards the actuator checks again right
before an action runs (decision-time state can be stale by then).  At
execution time every action is about to run automatically, so it is checked
as an ``auto`` decision.

Which modes a guard looks at is its ``modes``: ``shadow`` decisions never act
and consume nothing; the cooldown and the rate limit also count ``notify``
decisions (telling humans twice is noise too); the error budget only
downgrades ``auto``.

The event-time guards (cooldown, rate limit, cost cap) place a decision at
:attr:`GuardCall.window_ts`, so a timestamp ahead of the clock cannot move
it past a cooldown or out of a window.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from ia.decisions.guards.base import PASS, Block, Downgrade, GuardCall, Pass, Verdict
from ia.decisions.guards.kill_switch import pause_reason
from ia.decisions.guards.stores import FleetStore, HealthSpan
from ia.decisions.policy import (
    BlastRadius,
    Health,
    health_group,
    param_problem,
    target_problem,
)
from ia.decisions.windows import FreezeWindow, held_reason
from ia.schemas.models import Action, Mode

ACTING = frozenset({Mode.auto, Mode.needs_approval, Mode.notify})
MAY_RUN = frozenset({Mode.auto, Mode.needs_approval})
AUTO = frozenset({Mode.auto})


def breaker_key(action: Action) -> str:
    return f"{action.type}:{action.target}"


def blast_group(br: BlastRadius, labels: Mapping[str, str]) -> str:
    """The service group an action counts against: ``label=value``, or ``all``."""
    if br.group_label is None:
        return "all"
    return f"{br.group_label}={labels.get(br.group_label, '')}"


async def blast_limit(fleet: FleetStore, br: BlastRadius, group: str) -> tuple[int, str]:
    """In-flight actions allowed in ``group`` now, and how that was worked out."""
    limits: list[tuple[int, str]] = []
    if br.max_concurrent is not None:
        limits.append((br.max_concurrent, f"max_concurrent {br.max_concurrent}"))
    if br.max_fleet_pct is not None:
        size = br.fleet_size or await fleet.fleet_size(group)
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


@dataclass(frozen=True)
class KillSwitchGuard:
    """``ia pause`` blocks every action decision; the actuator refuses to run."""

    name: str = "kill_switch"
    modes: frozenset[Mode] = ACTING

    async def check(self, call: GuardCall) -> Verdict:
        info = await call.kill_switch.info() if call.kill_switch is not None else None
        if info is None:
            return PASS
        reason = pause_reason(info)
        return Block(reason, f"kill switch: {reason}")

    async def release(self, call: GuardCall) -> None:
        return None


@dataclass(frozen=True)
class StaleEventGuard:
    """An event older than ``max_event_age_s`` by the clock does not act.

    Hours-old samples (a backlog after an outage, a back-dated producer) say
    how a target was, not how it is.  The decision is blocked rather than
    downgraded: ``notify`` and approval requests call out too, and a stale
    anomaly is still on record in the decision and its trace.  It runs before
    every guard that reserves something, so a stale event uses no budget.  The
    age is the clock minus the event time, so offline (event time) it is 0.
    """

    name: str = "stale_event"
    modes: frozenset[Mode] = ACTING

    async def check(self, call: GuardCall) -> Verdict:
        limit_s = call.settings.max_event_age_s
        age_ms = call.now - call.ts
        if limit_s is None or age_ms <= limit_s * 1000:
            return PASS
        return Block(f"event is {age_ms / 1000:.0f}s old (max_event_age_s {limit_s:g}): "
                     "stale data does not act")

    async def release(self, call: GuardCall) -> None:
        return None


@dataclass(frozen=True)
class TargetSanityGuard:
    """An action names a bounded set of plain targets, with params in their bounds.

    A target that is blank, has an empty part (``a,,b``), a wildcard (``*``,
    ``?``, ``[``) or names everything (``all``), or more parts (split on commas
    and whitespace) than ``max_targets``, is refused: tools read such targets
    as "everything" (an empty host list deleting every disk).  So is a param
    outside the bounds the policy declares for its action type.  Policy
    loading refuses what it can see already; this catches what only the
    rendered target shows (an entity called ``*``).
    """

    name: str = "target_sanity"
    modes: frozenset[Mode] = MAY_RUN

    async def check(self, call: GuardCall) -> Verdict:
        a, g = call.action, call.settings
        problem = target_problem(a.target, g.max_targets)
        if problem:
            return Block(f"target {a.target!r}: {problem}; not acted on")
        for pname, bound in g.param_bounds:
            value = a.params.get(pname)
            problem = f"param {pname!r} is missing (it has declared bounds)" if value is None \
                else param_problem(pname, value, bound)
            if problem:
                return Block(f"{problem}; not acted on")
        return PASS

    async def release(self, call: GuardCall) -> None:
        return None


async def scope_labels(call: GuardCall) -> dict[str, str]:
    """The event's labels: given at decision time, noted for execution time."""
    if call.labels is not None:
        return dict(call.labels)
    scope = await call.freeze.scope_of(call.decision_id) or {}
    return dict(scope.get("labels") or {})


@dataclass(frozen=True)
class FreezeWindowGuard:
    """Freeze and maintenance windows (the policy's, and ``ia windows add``'s).

    A window in force at the decision's clock whose scope covers the decision
    blocks it (``effect: block``) or downgrades ``auto`` to ``needs_approval``
    (``effect: needs_approval``; a ``needs_approval`` decision is only noted).
    The trace names the window.  At decision time the event's labels and the
    windows that held the decision are noted (:meth:`FreezeStore.note_scope`):
    at execution time, any ``block`` window in force refuses the action, and a
    ``needs_approval`` window refuses it unless that window held the decision
    (its approver saw it), so an action approved before a window opened does
    not run inside it.
    """

    name: str = "freeze_window"
    modes: frozenset[Mode] = MAY_RUN

    async def check(self, call: GuardCall) -> Verdict:
        deciding = call.labels is not None
        labels = await scope_labels(call)
        held: list[str] = []
        if not deciding:
            held = list((await call.freeze.scope_of(call.decision_id) or {}).get("held") or [])
        hits = await self._in_force(call, labels)
        verdict = self._verdict(call, hits, held, deciding)
        if deciding and not isinstance(verdict, Block):
            await call.freeze.note_scope(call.decision_id, {
                "labels": labels, "held": [w.name for w, _ in hits]})
        return verdict

    @staticmethod
    async def _in_force(call: GuardCall, labels: Mapping[str, str]
                        ) -> list[tuple[FreezeWindow, tuple[int, int]]]:
        out = []
        for w in [*call.settings.windows, *await call.freeze.freeze_windows()]:
            occurrence = w.in_force(call.now)
            if occurrence and w.covers(call.entity, labels, call.action.type):
                out.append((w, occurrence))
        # Blocking windows first: the strongest effect decides and is named.
        return sorted(out, key=lambda hit: hit[0].effect != "block")

    @staticmethod
    def _verdict(call: GuardCall, hits: list[tuple[FreezeWindow, tuple[int, int]]],
                 held: list[str], deciding: bool) -> Verdict:
        if not hits:
            return PASS
        w, occurrence = hits[0]
        if w.effect == "block":
            reason = held_reason(w, occurrence, "blocked")
            return Block(reason, f"freeze window: {reason}")
        if deciding:
            if call.mode is Mode.auto:
                return Downgrade(Mode.needs_approval, held_reason(
                    w, occurrence, "auto downgraded to needs_approval"))
            return Pass(reason=held_reason(w, occurrence, "needs approval, as decided"))
        unseen = next(((w, o) for w, o in hits if w.name not in held), None)
        if unseen is None:
            return PASS
        reason = held_reason(*unseen, "this action was not approved inside it")
        return Block(reason, f"freeze window: {reason}")

    async def release(self, call: GuardCall) -> None:
        return None


def health_span(h: Health) -> HealthSpan:
    return HealthSpan(int(h.fresh_s * 1000), int(h.anomaly_hold_s * 1000),
                      int(h.member_s * 1000))


@dataclass(frozen=True)
class CapacityFloorGuard:
    """Refuse an action that would leave less than ``min_healthy_pct`` of its group
    healthy.

    Health comes from telemetry (:class:`~ia.decisions.policy.Health`): a
    member is healthy if it sent a sample within ``fresh_s`` and none of its
    samples scored ``unhealthy_score`` or more within ``anomaly_hold_s``.  The
    action's target counts as out of service, and so do the targets of other
    admitted ``auto`` actions for ``lease_s`` (the hold is reserved, and given
    back if a later guard blocks).  A group with most members in trouble is
    a systemic problem that restarting members makes worse, so the floor also
    holds when the group is below it already.
    """

    name: str = "capacity_floor"
    modes: frozenset[Mode] = MAY_RUN

    async def check(self, call: GuardCall) -> Verdict:
        cf = call.settings.capacity_floor
        if cf is None:
            return PASS
        group = health_group(cf.group_label, await scope_labels(call))
        reserve = call.mode is Mode.auto
        v = await call.health.health_admit(
            group, call.action.target, call.decision_id, call.now,
            health_span(call.settings.health), cf.min_healthy_pct, int(cf.lease_s * 1000),
            reserve)
        if v.admitted:
            return Pass(reserved=reserve)
        if v.members == 0:
            reason = f"no health data for group {group}: the capacity floor cannot be judged"
        else:
            reason = (f"acting on {call.action.target} would leave {v.healthy} of "
                      f"{v.members} in group {group} healthy "
                      f"({100 * v.healthy / v.members:.0f}% < min_healthy_pct "
                      f"{cf.min_healthy_pct:g})")
        return Block(reason, f"capacity floor: {reason}")

    async def release(self, call: GuardCall) -> None:
        cf = call.settings.capacity_floor
        if cf is None:
            return
        group = health_group(cf.group_label, await scope_labels(call))
        await call.health.health_release(group, call.action.target, call.decision_id)


@dataclass(frozen=True)
class CircuitBreakerGuard:
    """Failures of an action type on a target open its breaker; a half-open probe
    (reserved, released if a later guard blocks) decides whether it closes."""

    name: str = "circuit_breaker"
    modes: frozenset[Mode] = MAY_RUN

    async def check(self, call: GuardCall) -> Verdict:
        cb = call.settings.circuit_breaker
        if cb is None:
            return PASS
        a = call.action
        b = await call.breakers.breaker_check(
            breaker_key(a), call.decision_id, call.now, cb.failures, int(cb.window_s * 1000),
            int(cb.open_s * 1000), int(cb.probe_timeout_s * 1000))
        if not b.allowed and b.state == "open":
            return Block(f"open for {a.type} on {a.target}: >= {cb.failures} failures within "
                         f"{cb.window_s:g}s; half-open probe after {cb.open_s:g}s",
                         f"circuit breaker open for {a.type} on {a.target}")
        if not b.allowed:
            return Block(f"half-open for {a.type} on {a.target}: probe {b.detail} in flight",
                         f"circuit breaker half-open, probe {b.detail} in flight for {a.type} "
                         f"on {a.target}")
        if b.state == "half_open":
            return Pass(reserved=True, reason=(
                f"half-open for {a.type} on {a.target}: this decision is the probe"))
        return PASS

    async def release(self, call: GuardCall) -> None:
        await call.breakers.breaker_release_probe(breaker_key(call.action), call.decision_id)


@dataclass(frozen=True)
class ErrorBudgetGuard:
    """Automation that fails too often loses its autonomy: ``auto`` becomes
    ``needs_approval``."""

    name: str = "error_budget"
    modes: frozenset[Mode] = AUTO

    async def check(self, call: GuardCall) -> Verdict:
        eb = call.settings.error_budget
        if eb is None:
            return PASS
        scope = _budget_scope(eb.scope, call.action, call.rule)
        ok, failed = await call.results.results(scope, call.now, int(eb.window_s * 1000))
        total = ok + failed
        burn = (failed / total) / (1 - eb.slo) if total else 0.0
        if total < eb.min_actions or burn <= eb.max_burn_rate:
            return PASS
        return Downgrade(Mode.needs_approval, (
            f"{failed} of {total} automated actions ({eb.scope}) failed within "
            f"{eb.window_s:g}s: burn rate {burn:.1f}x > {eb.max_burn_rate:g}x of a "
            f"{1 - eb.slo:.1%} budget; downgraded to needs_approval"))

    async def release(self, call: GuardCall) -> None:
        return None


@dataclass(frozen=True)
class BlastRadiusGuard:
    """In-flight actions per service group.

    It looks at every decision that may run: a ``needs_approval`` decision
    has its group noted (the actuator counts it against that group once it
    is approved and runs) but holds no slot while it waits for a human; an
    ``auto`` decision holds a leased slot, renewed when it runs.
    """

    name: str = "blast_radius"
    modes: frozenset[Mode] = MAY_RUN

    async def check(self, call: GuardCall) -> Verdict:
        br = call.settings.blast_radius
        if br is None:
            return PASS
        group = await self._group(call, br)
        if call.mode is not Mode.auto:
            return PASS
        limit, why = await blast_limit(call.fleet, br, group)
        held, in_use = await call.slots.slot_acquire(
            group, call.decision_id, call.now, limit, call.lease_ms or int(br.lease_s * 1000))
        if held:
            return Pass(reserved=True)
        return Block(f"{in_use} actions already in flight in group {group} "
                     f"(limit {limit}: {why})",
                     f"blast radius: {in_use} actions in flight in group {group} "
                     f"(limit {limit}: {why})")

    @staticmethod
    async def _group(call: GuardCall, br: BlastRadius) -> str:
        """At decision time the event's group, noted for execution; then that note."""
        if call.labels is not None:
            group = blast_group(br, call.labels)
            await call.slots.note_group(call.decision_id, group)
            return group
        return await call.slots.group_of(call.decision_id) or blast_group(br, {})

    async def release(self, call: GuardCall) -> None:
        await call.slots.slot_release(call.decision_id)


@dataclass(frozen=True)
class CooldownGuard:
    """After an action on a target, none from the same rule (or any rule) for
    ``cooldown_s`` of event time: a claim keyed by the owning decision."""

    name: str = "cooldown"
    modes: frozenset[Mode] = ACTING

    @staticmethod
    def _key(call: GuardCall) -> str:
        g = call.settings
        scope = "target" if g.cooldown_per == "target" else f"{call.rule}:{call.action.type}"
        return f"cooldown:{scope}:{call.action.target}"

    async def check(self, call: GuardCall) -> Verdict:
        g = call.settings
        if g.cooldown_s <= 0:
            return PASS
        at = call.window_ts
        holder = await call.claims.claim(self._key(call), call.decision_id, at,
                                         at + int(g.cooldown_s * 1000))
        if holder == call.decision_id:
            return Pass(reserved=True)
        return Block(f"{call.action.target} in cooldown ({g.cooldown_s:g}s) "
                     f"after decision {holder}")

    async def release(self, call: GuardCall) -> None:
        await call.claims.release_claim(self._key(call), call.decision_id)


@dataclass(frozen=True)
class RateLimitGuard:
    """At most ``max`` actions of a rule (per target, if asked) within a sliding
    window of event time."""

    name: str = "rate_limit"
    modes: frozenset[Mode] = ACTING

    @staticmethod
    def _key(call: GuardCall) -> str:
        rl = call.settings.rate_limit
        per_target = rl is not None and rl.per == "target"
        return f"rate:{call.rule}" + (f":{call.action.target}" if per_target else "")

    async def check(self, call: GuardCall) -> Verdict:
        rl = call.settings.rate_limit
        if rl is None:
            return PASS
        admitted, used = await call.windows.window_admit(self._key(call), call.decision_id,
                                                         call.window_ts, rl.window_ms, rl.max)
        if admitted:
            return Pass(reserved=True)
        per = f" on {call.action.target}" if rl.per == "target" else ""
        return Block(f"rule {call.rule} already acted {used:g} times{per} within "
                     f"{rl.window_ms / 1000:g}s (max {rl.max})")

    async def release(self, call: GuardCall) -> None:
        await call.windows.window_release(self._key(call), call.decision_id)


@dataclass(frozen=True)
class CostCapGuard:
    """The rules' ``cost`` spent within a sliding window of event time stays
    under the policy's cap."""

    name: str = "cost_cap"
    modes: frozenset[Mode] = MAY_RUN

    async def check(self, call: GuardCall) -> Verdict:
        g = call.settings
        cap = g.cost_cap
        if cap is None or g.cost <= 0:
            return PASS
        admitted, used = await call.windows.window_admit(
            "cost", call.decision_id, call.window_ts, int(cap.window_s * 1000), cap.max, g.cost)
        if admitted:
            return Pass(reserved=True)
        return Block(f"cost {g.cost:g} would exceed the cap: {used:g} of {cap.max:g} spent "
                     f"within {cap.window_s:g}s")

    async def release(self, call: GuardCall) -> None:
        await call.windows.window_release("cost", call.decision_id, call.settings.cost)


DECISION_GUARDS = (KillSwitchGuard(), StaleEventGuard(), TargetSanityGuard(),
                   FreezeWindowGuard(), CapacityFloorGuard(), CircuitBreakerGuard(),
                   ErrorBudgetGuard(), BlastRadiusGuard(), CooldownGuard(), RateLimitGuard(),
                   CostCapGuard())
EXECUTION_GUARDS = (KillSwitchGuard(), FreezeWindowGuard(), CapacityFloorGuard(),
                    CircuitBreakerGuard(), BlastRadiusGuard())
