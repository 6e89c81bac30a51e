"""Event time against the clock, end to end through the decision engine.

Live, the engine's clock is the wall clock: a sample hours old does not act
and a sample stamped ahead of it cannot skip a cooldown.  Offline the clock is
event time, so the same history decides as it always did.  The guards' own
semantics are pinned down in tests/test_guards.py.
"""

from __future__ import annotations

from ia.core.clock import now_ms
from ia.decisions.engine import DecisionEngine
from ia.decisions.guards import MemoryGuardStore
from ia.decisions.policy import Policy
from ia.features.store import MemoryFeatureStore
from ia.offline.run import Variant, decide
from ia.schemas.models import Decision, Mode, TelemetryEvent

POLICY = Policy.from_text("""\
version: 1
rules:
  - name: restart-on-deploy
    match: {kind: event, metric: deploy}
    action: {type: log}
    mode: auto
""", "<event-time>")  # the defaults: cooldown 300 s, max_event_age_s 600
HOUR_MS = 3600 * 1000


def deploy(entity: str, ts: int, n: int) -> TelemetryEvent:
    return TelemetryEvent(entity=entity, metric="deploy", kind="event", value=1.0, ts=ts,
                          event_id=f"deploy-{entity}-{n}")


def live_engine() -> DecisionEngine:
    """The engine as the worker builds it: its clock is the wall clock."""
    return DecisionEngine(lambda: POLICY, MemoryFeatureStore(), MemoryGuardStore())


def guard_steps(d: Decision) -> list[str]:
    return [step.guard for step in d.interventions() if step.guard is not None]


async def test_an_event_two_hours_old_does_not_act_live() -> None:
    now = now_ms()
    stale, fresh = await live_engine().process([deploy("svc-a", now - 2 * HOUR_MS, 1),
                                                deploy("svc-b", now, 1)])
    assert stale.action is not None and stale.mode is Mode.blocked
    assert guard_steps(stale) == ["stale_event"]
    assert fresh.mode is Mode.auto and guard_steps(fresh) == []


async def test_live_a_sample_stamped_five_minutes_ahead_stays_in_cooldown() -> None:
    engine, now = live_engine(), now_ms()
    (first,) = await engine.process([deploy("svc-a", now, 1)])
    (skewed,) = await engine.process([deploy("svc-a", now + 300_000, 2)])
    assert first.mode is Mode.auto
    assert skewed.mode is Mode.blocked and guard_steps(skewed) == ["cooldown"]


async def test_offline_history_of_any_age_decides_at_event_time() -> None:
    """Replay's clock is event time: age 0, and a window is never ahead of itself."""
    t0 = now_ms() - 24 * HOUR_MS
    history = [deploy("svc-a", t0, 1), deploy("svc-a", t0 + 299_999, 2),
               deploy("svc-a", t0 + 300_000, 3)]
    variant = Variant("event-time", "<test>", POLICY)
    decided = [d async for batch in decide(history, variant) for d in batch]
    assert [d.mode for d in decided] == [Mode.auto, Mode.blocked, Mode.auto]
    assert [guard_steps(d) for d in decided] == [[], ["cooldown"], []]
    assert all(d.decided_at == d.ts for d in decided)
