"""Decision time: the guards over one policy result, and the fleet they count against."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from ia.decisions.guards.base import GuardCall, Pass, admit
from ia.decisions.guards.builtin import DECISION_GUARDS
from ia.decisions.guards.kill_switch import KillSwitchState
from ia.decisions.guards.stores import FleetStore, GuardStore
from ia.decisions.policy import Policy, PolicyResult
from ia.schemas.models import Mode, RuleTrace, TelemetryEvent


@dataclass
class GuardVerdict:
    mode: Mode
    interventions: list[str] = field(default_factory=list)


async def apply_guards(result: PolicyResult, *, decision_id: str, ts: int, now: int,
                       labels: dict[str, str], store: GuardStore,
                       kill_switch: KillSwitchState | None = None,
                       lease_ms: int | None = None) -> GuardVerdict:
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
        labels=labels, lease_ms=lease_ms))
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
