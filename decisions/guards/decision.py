"""Decision time: the guards over one policy result, and the fleet they count against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ia.decisions.guards.base import GuardCall, Pass, admit
from ia.decisions.guards.builtin import DECISION_GUARDS
from ia.decisions.guards.kill_switch import KillSwitchState
from ia.decisions.guards.stores import FleetStore, GuardStore, HealthStore
from ia.decisions.policy import Policy, PolicyResult, health_group
from ia.schemas.models import Mode, RuleTrace, TelemetryEvent


@dataclass
class GuardVerdict:
    mode: Mode
    interventions: list[str] = field(default_factory=list)


async def apply_guards(result: PolicyResult, *, decision_id: str, ts: int, now: int,
                       labels: dict[str, str], store: GuardStore,
                       kill_switch: KillSwitchState | None = None,
                       lease_ms: int | None = None, entity: str = "") -> GuardVerdict:
    """Run :data:`DECISION_GUARDS` over one policy result; append what they say to
    ``result.trace``.

    ``ts`` is the event time (its age; cooldown, rate limit and cost cap, never
    ahead of ``now``), ``now`` the engine's clock (wall time live, event time
    offline: kill switch, breaker, error budget, blast radius).
    ``lease_ms`` overrides blast-radius leases (the policy tester uses it to
    model how long actions take).  Every guard that intervenes adds a
    ``guard:<name>`` entry (``matched=True``); a note that does not
    intervene (the half-open probe) is added with ``matched=False``.
    Returns the final mode and the names of the guards that intervened.
    """
    verdict = GuardVerdict(result.mode)
    if result.action is None:
        return verdict
    admission = await admit(DECISION_GUARDS, GuardCall(
        decision_id=decision_id, action=result.action, rule=result.rule, mode=result.mode,
        settings=result.guards, ts=ts, now=now, store=store, kill_switch=kill_switch,
        labels=labels, lease_ms=lease_ms, entity=entity))
    for name, said in admission.said:
        intervened = not isinstance(said, Pass)
        result.trace.append(RuleTrace.of_guard(name, said.reason, matched=intervened))
        if intervened:
            verdict.interventions.append(name)
    verdict.mode = admission.mode
    return verdict


async def observe_fleet(store: FleetStore, policy: Policy,
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


async def observe_health(store: HealthStore, policy: Policy,
                         events: Sequence[TelemetryEvent]) -> None:
    """Note when each member of a capacity-floor group last sent a sample (worker, per
    batch, before deciding it): the freshness half of health."""
    if not policy.health_labels:
        return
    groups: dict[str, dict[str, int]] = {}
    for ev in events:
        for label in policy.health_labels:
            seen = groups.setdefault(health_group(label, ev.labels), {})
            seen[ev.entity] = max(ev.ts, seen.get(ev.entity, ev.ts))
    resolution = int(policy.doc.health.fresh_s * 1000) // 4
    for group, seen in groups.items():
        await store.health_seen(group, seen, resolution)


async def observe_anomaly(store: HealthStore, policy: Policy, ev: TelemetryEvent,
                          score: float) -> None:
    """Note an anomalous sample (score >= ``health.unhealthy_score``) of a capacity-floor
    group's member before its own decision is guarded: the other half of health.
    Anomalies are rare, so this is rarely a write."""
    if not policy.health_labels or score < policy.doc.health.unhealthy_score:
        return
    for label in policy.health_labels:
        await store.health_anomaly(health_group(label, ev.labels), ev.entity, ev.ts)
