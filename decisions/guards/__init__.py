"""Guards: everything that stands between a policy decision and an actuator.

The policy says *what* to do and how autonomously (:mod:`ia.decisions.policy`);
the guards say whether it may happen *now*.  Each guard is a small object
(:mod:`~ia.decisions.guards.builtin`) that names the decision modes it looks
at, and :func:`~ia.decisions.guards.base.admit` runs a list of them in order.
The decision engine runs :data:`DECISION_GUARDS` (:func:`apply_guards`) for
every decision that carries an action:

=================  ==========================================  ====================  =======
guard              what it does                                clock                 effect
=================  ==========================================  ====================  =======
kill_switch        ``ia pause`` stops all automation            live (cached 200 ms)  blocked
stale_event        an event older than ``max_event_age_s``      event time vs. live   blocked
target_sanity      a blank, wildcard, ``all`` or over-broad     -                     blocked
                   target; params outside ``action_bounds``
freeze_window      a freeze/maintenance window in force over   live (event time      blocked or
                   the decision's scope (policy, ia windows)   offline)              needs_approval
capacity_floor     the group would keep < ``min_healthy_pct``  live                  blocked
                   healthy members (telemetry health)
circuit_breaker    per action type + target: K failures in a   live                  blocked
                   window open it; after ``open_s`` one
                   half-open probe may run; its outcome closes
                   (success) or re-opens (failure) it
error_budget       automation's own failure rate burns the     live                  auto ->
                   budget (1 - slo) faster than max_burn_rate                        needs_approval
blast_radius       in-flight actions per service group: an     live                  blocked
                   absolute cap and/or a share of the fleet
cooldown           per rule (or target) and target              event time            blocked
rate_limit         max N per window (``once_within`` = max 1)  event time            blocked
cost_cap           sum of rule ``cost`` within a window        event time            blocked
=================  ==========================================  ====================  =======

Guards that reserve something (a cooldown claim, a rate-limit slot, cost, a
blast-radius slot, a half-open probe) hand it back when a later guard blocks
the decision, so a refused action uses no budget.

*Event-time* guards are keyed by the owning decision id, so reprocessing a
batch after a crash finds its own reservations and makes the same call; they
place a decision at its event time, but never ahead of the worker's clock
(:attr:`GuardCall.window_ts`), so a producer's fast clock cannot skip a cooldown.
*Live* guards depend on what actuators are doing; the worker evaluates them
with its clock (wall time live; event time in replay, where the memory store
sees no outcomes and so makes deterministic calls).  Because decision-time
state can be stale by the time an action runs, the actuator runs
:data:`EXECUTION_GUARDS` through the same loop (:class:`ExecutionGuard`) and
feeds outcomes back through it.

State sits behind one small protocol per mechanism (:mod:`~ia.decisions.guards.stores`),
implemented in memory (:class:`MemoryGuardStore`: replay, the policy tester)
and in Redis (:class:`RedisGuardStore`: workers and actuators, atomic Lua
scripts shared by all processes).
"""

from ia.decisions.guards.base import Block, Downgrade, Guard, GuardCall, Pass, admit
from ia.decisions.guards.builtin import (
    DECISION_GUARDS,
    EXECUTION_GUARDS,
    blast_group,
    breaker_key,
    budget_scopes,
)
from ia.decisions.guards.decision import (
    GuardVerdict,
    apply_guards,
    observe_anomaly,
    observe_fleet,
    observe_health,
)
from ia.decisions.guards.execution import ExecutionGuard, record_outcome
from ia.decisions.guards.kill_switch import KillSwitch, KillSwitchState, MemoryKillSwitch
from ia.decisions.guards.memory import MemoryGuardStore
from ia.decisions.guards.redis_store import RedisGuardStore
from ia.decisions.guards.stores import (
    BreakerStore,
    BreakerVerdict,
    ClaimStore,
    FleetStore,
    FloorVerdict,
    FreezeStore,
    GuardStore,
    HealthSpan,
    HealthStore,
    ResultStore,
    SlotStore,
    WindowStore,
)

__all__ = [
    "DECISION_GUARDS", "EXECUTION_GUARDS", "Block", "BreakerStore", "BreakerVerdict",
    "ClaimStore", "Downgrade", "ExecutionGuard", "FleetStore", "FloorVerdict", "FreezeStore",
    "Guard", "GuardCall", "GuardStore", "GuardVerdict", "HealthSpan", "HealthStore",
    "KillSwitch", "KillSwitchState", "MemoryGuardStore", "MemoryKillSwitch", "Pass",
    "RedisGuardStore", "ResultStore", "SlotStore", "WindowStore", "admit", "apply_guards",
    "blast_group", "breaker_key", "budget_scopes", "observe_anomaly", "observe_fleet",
    "observe_health", "record_outcome",
]
