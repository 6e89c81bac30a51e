"""Guards without Kafka: policy settings, the autonomy ladder, each guard, the execution guard.

The integration tests (tests/test_guards_integration.py) run each guard
through the real broker and Redis; these pin down the semantics.  The stores
themselves have their conformance suite in tests/test_guard_stores.py.
"""

from __future__ import annotations

import asyncio
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from ia.decisions.engine import DecisionEngine
from ia.decisions.guards import (
    ExecutionGuard,
    KillSwitch,
    MemoryGuardStore,
    MemoryKillSwitch,
    apply_guards,
    observe_fleet,
    record_outcome,
)
from ia.decisions.policy import Policy, PolicyError
from ia.decisions.policy_source import PolicySource
from ia.features.store import MemoryFeatureStore
from ia.schemas.models import Action, Decision, Mode, ModelInfo, RuleTrace, TelemetryEvent

T0 = 1_700_000_000_000
SPIKE = {"zscore": 9.0, "value": 99.0}


def policy(text: str) -> Policy:
    return Policy.from_text(textwrap.dedent(text), "<test>")


def evaluate(p: Policy, entity: str = "svc-a", confidence: float = 0.99, score: float = 0.99,
             labels: dict[str, str] | None = None, metric: str = "cpu"):
    return p.evaluate(entity=entity, metric=metric, kind="metric", labels=labels or {},
                      features=SPIKE, score=score, confidence=confidence, drift="stable")


async def guard(p: Policy, store, *, n: int, ts: int, now: int | None = None,
                entity: str = "svc-a", labels: dict[str, str] | None = None,
                confidence: float = 0.99, kill_switch=None, metric: str = "cpu"):
    """Evaluate and guard one decision (decision id ``d{n}``); return (mode, trace)."""
    r = evaluate(p, entity=entity, labels=labels, confidence=confidence, metric=metric)
    v = await apply_guards(r, decision_id=f"d{n}", ts=ts, now=ts if now is None else now,
                           labels=labels or {}, store=store, kill_switch=kill_switch)
    return v.mode, r.trace


def guard_lines(trace: list[RuleTrace]) -> list[str]:
    return [t.rule for t in trace if t.guard is not None and t.matched]


# --- policy settings ------------------------------------------------------------------------


BAD = {
    "rate-two-windows": ("""\
        version: 1
        rules:
          - name: a
            action: {type: log}
            rate_limit:
              once_within: 60
              window_s: 60
        """, 5, "rules.0.rate_limit: Value error, give exactly one of window_s"),
    "ladder-unordered": ("""\
        version: 1
        rules:
          - name: a
            action: {type: log}
            autonomy: {auto_above: 0.5, approval_above: 0.9}
        """, 5, "auto_above >= approval_above"),
    "blast-without-limit": ("""\
        version: 1
        defaults:
          blast_radius: {group_label: service}
        """, 3, "max_concurrent and/or max_fleet_pct"),
    "unknown-guard-key": ("""\
        version: 1
        rules:
          - name: a
            circuit_breaker: {failures: 3, windw_s: 10}
        """, 4, "rules.0.circuit_breaker"),
    "negative-cost": ("""\
        version: 1
        rules:
          - name: a
            action: {type: log}
            cost: -1
        """, 5, "rules.0.cost"),
    "bad-mode": ("""\
        version: 1
        rules:
          - name: a
            action: {type: log}
            mode: yolo
        """, 5, "rules.0.mode"),
    "cost-cap-zero": ("""\
        version: 1
        cost_cap:
          max: 0
        """, 3, "cost_cap.max"),
    "event-age-zero": ("""\
        version: 1
        defaults:
          max_event_age_s: 0
        """, 3, "defaults.max_event_age_s: Value error, give a number of seconds > 0"),
    "event-age-true": ("""\
        version: 1
        rules:
          - name: a
            action: {type: log}
            max_event_age_s: true
        """, 5, "rules.0.max_event_age_s: Value error, give a number of seconds > 0, or false"),
    "event-age-null-default": ("""\
        version: 1
        defaults:
          max_event_age_s: null
        """, 3, "defaults.max_event_age_s"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_guard_settings_errors_name_file_and_line(case: str, tmp_path: Path) -> None:
    text, line, fragment = BAD[case]
    path = tmp_path / f"{case}.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(PolicyError) as info:
        Policy.from_file(path)
    assert (info.value.source, info.value.line) == (str(path), line), str(info.value)
    assert str(info.value).startswith(f"{path}:{line}: ")
    assert fragment in str(info.value)


def test_guard_settings_inherit_and_switch_off() -> None:
    p = policy("""\
        version: 1
        defaults:
          cooldown_s: 30
          rate_limit: {max: 5, window_s: 60}
          blast_radius: {max_concurrent: 2}
        cost_cap: {max: 10}
        rules:
          - name: inherits
            action: {type: log}
          - name: overrides
            action: {type: log}
            cooldown_s: 0
            cooldown_per: target
            rate_limit: {once_within: 600}
            circuit_breaker: {failures: 1, window_s: 5, open_s: 1}
            blast_radius: false
            cost: 2
          - name: unguarded
            action: {type: log}
            rate_limit: false
            circuit_breaker: false
    """)
    a, b, c = (p.guards_for(n) for n in ("inherits", "overrides", "unguarded"))
    assert a.cooldown_s == 30 and a.rate_limit.max == 5 and a.blast_radius.max_concurrent == 2
    assert a.circuit_breaker.failures == 3  # the breaker is on by default
    assert a.cost == 0 and a.cost_cap is None  # no cost, no cap
    assert (b.cooldown_s, b.cooldown_per) == (0, "target")
    assert b.rate_limit.once_within == 600 and b.rate_limit.window_ms == 600_000
    assert b.circuit_breaker.failures == 1 and b.blast_radius is None
    assert b.cost == 2 and b.cost_cap.max == 10
    assert c.rate_limit is None and c.circuit_breaker is None
    assert p.guards_for("no-such-rule").rate_limit.max == 5  # the defaults


def test_max_event_age_has_a_default_a_rule_override_and_an_off_switch() -> None:
    rules = """\
        rules:
          - name: inherits
            action: {type: log}
          - name: tighter
            action: {type: log}
            max_event_age_s: 30
          - name: any-age
            action: {type: log}
            max_event_age_s: false
    """
    p = policy("version: 1\n" + textwrap.dedent(rules))
    assert [p.guards_for(n).max_event_age_s for n in ("inherits", "tighter", "any-age")] \
        == [600, 30, None]
    off = policy("version: 1\ndefaults: {max_event_age_s: false}\n" + textwrap.dedent(rules))
    assert [off.guards_for(n).max_event_age_s for n in ("inherits", "tighter", "any-age")] \
        == [None, 30, None]


# --- the autonomy ladder --------------------------------------------------------------------


LADDER = """\
    version: 1
    rules:
      - name: ladder
        match: {entity: "svc-*"}
        action: {type: log}
        autonomy: {auto_above: 0.9, approval_above: 0.6, notify_above: 0.3}
      - name: capped
        match: {entity: "db-*"}
        action: {type: log}
        mode: needs_approval
        autonomy: {auto_above: 0.9, approval_above: 0.6}
      - name: shadowed
        match: {entity: "lab-*"}
        action: {type: log}
        mode: shadow
        autonomy: {auto_above: 0.9}
      - name: fallback
        action: {type: log}
        mode: notify
"""


@pytest.mark.parametrize(("entity", "confidence", "rule", "mode"), [
    ("svc-a", 0.95, "ladder", Mode.auto),
    ("svc-a", 0.9, "ladder", Mode.auto),            # bands are inclusive
    ("svc-a", 0.7, "ladder", Mode.needs_approval),
    ("svc-a", 0.4, "ladder", Mode.notify),
    ("svc-a", 0.1, "fallback", Mode.notify),        # below the ladder: the rule does not fire
    ("db-1", 0.99, "capped", Mode.needs_approval),  # mode caps the ladder
    ("db-1", 0.7, "capped", Mode.needs_approval),
    ("db-1", 0.5, "fallback", Mode.notify),
    ("lab-1", 0.99, "shadowed", Mode.shadow),        # shadow never acts
    ("lab-1", 0.5, "fallback", Mode.notify),
])
def test_autonomy_ladder(entity: str, confidence: float, rule: str, mode: Mode) -> None:
    r = evaluate(policy(LADDER), entity=entity, confidence=confidence)
    assert (r.rule, r.mode) == (rule, mode), r.trace


def test_autonomy_ladder_explains_itself() -> None:
    p = policy(LADDER)
    r = evaluate(p, confidence=0.7)
    assert r.trace[-1].reason.endswith("; autonomy ladder: needs_approval")
    r = evaluate(p, confidence=0.1)
    assert r.trace[0] == RuleTrace(rule="ladder", matched=False, reason=(
        "confidence 0.100 below the autonomy ladder (lowest band 0.3)"))
    r = evaluate(p, entity="db-1", confidence=0.99)
    assert "needs_approval (capped by mode needs_approval)" in r.trace[-1].reason
    r = evaluate(p, entity="lab-1", confidence=0.99)
    assert "ladder says auto, rule is shadow" in r.trace[-1].reason


def test_score_and_confidence_ranges_and_label_lists() -> None:
    p = policy("""\
        version: 1
        rules:
          - name: mild
            match: {labels: {env: [prod, "stag*"]}}
            when: {score: {min: 0.5, max: 0.8}, confidence: {max: 0.9}}
            action: {type: log}
    """)
    assert evaluate(p, score=0.6, confidence=0.5, labels={"env": "staging"}).rule == "mild"
    assert evaluate(p, score=0.6, confidence=0.5, labels={"env": "prod"}).rule == "mild"
    r = evaluate(p, score=0.6, confidence=0.5, labels={"env": "dev"})
    assert r.trace[0].reason == "label env does not match ['prod', 'stag*']"
    assert evaluate(p, score=0.9, labels={"env": "prod"}).trace[0].reason \
        == "score 0.900 outside [0.5, 0.8]"
    r = evaluate(p, score=0.6, confidence=0.95, labels={"env": "prod"})
    assert r.trace[0].reason == "confidence 0.950 outside [None, 0.9]"


# --- each guard (memory store) --------------------------------------------------------------


async def test_rate_limit_max_n_per_window_and_once_within() -> None:
    p = policy("""\
        version: 1
        defaults: {cooldown_s: 0}
        rules:
          - name: per-rule
            match: {metric: cpu}
            action: {type: log}
            rate_limit: {max: 2, window_s: 60}
          - name: per-target
            match: {metric: mem}
            action: {type: log}
            rate_limit: {once_within: 60, per: target}
    """)
    store = MemoryGuardStore()
    modes = [(await guard(p, store, n=i, ts=T0 + i * 1000, entity=f"svc-{i}"))[0]
             for i in range(4)]
    assert modes == [Mode.auto, Mode.auto, Mode.blocked, Mode.blocked]
    mode, trace = await guard(p, store, n=4, ts=T0 + 3000)
    assert guard_lines(trace) == ["guard:rate_limit"]
    assert trace[-1].reason == "rule per-rule already acted 2 times within 60s (max 2)"
    # the window slides in event time; a redelivered decision is admitted again
    assert (await guard(p, store, n=9, ts=T0 + 60_500))[0] is Mode.auto
    assert (await guard(p, store, n=9, ts=T0 + 60_500))[0] is Mode.auto
    assert (await guard(p, store, n=10, ts=T0 + 60_600))[0] is Mode.blocked
    # per target: another target has its own budget
    assert (await guard(p, store, n=20, ts=T0, metric="mem"))[0] is Mode.auto
    mode, trace = await guard(p, store, n=21, ts=T0 + 59_000, metric="mem")
    assert mode is Mode.blocked and "on svc-a within 60s (max 1)" in trace[-1].reason
    assert (await guard(p, store, n=22, ts=T0 + 1, metric="mem", entity="svc-b"))[0] \
        is Mode.auto


async def test_cooldown_per_target_spans_rules() -> None:
    p = policy("""\
        version: 1
        defaults: {cooldown_s: 60, cooldown_per: target}
        rules:
          - name: cpu
            match: {metric: cpu}
            action: {type: log}
          - name: mem
            match: {metric: mem}
            action: {type: webhook}
    """)
    store = MemoryGuardStore()
    assert (await guard(p, store, n=1, ts=T0, metric="cpu"))[0] is Mode.auto
    mode, trace = await guard(p, store, n=2, ts=T0 + 5000, metric="mem")
    assert mode is Mode.blocked and guard_lines(trace) == ["guard:cooldown"]
    assert "svc-a in cooldown (60s) after decision d1" in trace[-1].reason


STALE = """\
    version: 1
    defaults: {cooldown_s: 60}
    rules:
      - name: restart
        match: {metric: cpu}
        action: {type: log}
        rate_limit: {max: 5, window_s: 600}
        max_event_age_s: 600
      - name: ask
        match: {metric: mem}
        action: {type: log}
        mode: needs_approval
      - name: tell
        match: {metric: disk}
        action: {type: log}
        mode: notify
      - name: backfill
        match: {metric: backfill}
        action: {type: log}
        max_event_age_s: false
"""
HOURS_2 = 2 * 3600 * 1000


async def test_an_event_two_hours_old_does_not_act_live_and_reserves_nothing() -> None:
    p, store = policy(STALE), MemoryGuardStore()
    mode, trace = await guard(p, store, n=1, ts=T0, now=T0 + HOURS_2)
    assert mode is Mode.blocked and guard_lines(trace) == ["guard:stale_event"]
    assert trace[-1].guard == "stale_event"
    assert trace[-1].reason == ("event is 7200s old (max_event_age_s 600): "
                                "stale data does not act")
    # Blocked first: no cooldown claim, no rate-limit entry, so a fresh sample acts.
    assert not store._claims and not any(store._windows.values())
    assert (await guard(p, store, n=2, ts=T0 + HOURS_2, now=T0 + HOURS_2 + 50))[0] is Mode.auto


@pytest.mark.parametrize("metric", ["mem", "disk"])
async def test_stale_approval_requests_and_notifications_are_blocked_too(metric: str) -> None:
    mode, trace = await guard(policy(STALE), MemoryGuardStore(), n=1, ts=T0,
                              now=T0 + HOURS_2, metric=metric)
    assert mode is Mode.blocked and guard_lines(trace) == ["guard:stale_event"]


async def test_max_event_age_is_inclusive_and_per_rule() -> None:
    p = policy(STALE)
    assert (await guard(p, MemoryGuardStore(), n=1, ts=T0, now=T0 + 600_000))[0] is Mode.auto
    assert (await guard(p, MemoryGuardStore(), n=1, ts=T0, now=T0 + 600_001))[0] \
        is Mode.blocked
    assert (await guard(p, MemoryGuardStore(), n=1, ts=T0, now=T0 + HOURS_2,
                        metric="backfill"))[0] is Mode.auto
    # Stamped ahead of the clock is not stale (validation bounds how far ahead).
    assert (await guard(p, MemoryGuardStore(), n=1, ts=T0 + 300_000, now=T0))[0] is Mode.auto


async def test_a_sample_stamped_ahead_of_the_clock_cannot_skip_the_cooldown() -> None:
    p = policy("""\
        version: 1
        rules:
          - name: restart
            action: {type: log}
    """)  # the default cooldown: 300 s
    store = MemoryGuardStore()
    assert (await guard(p, store, n=1, ts=T0, now=T0))[0] is Mode.auto
    # A second later, a sample stamped 300 s ahead (the skew validation accepts).
    mode, trace = await guard(p, store, n=2, ts=T0 + 300_000, now=T0 + 1000)
    assert mode is Mode.blocked and guard_lines(trace) == ["guard:cooldown"]
    assert (await guard(p, store, n=3, ts=T0 + 300_000, now=T0 + 300_000))[0] is Mode.auto


async def test_a_sample_stamped_ahead_of_the_clock_cannot_slide_a_window() -> None:
    p = policy("""\
        version: 1
        defaults: {cooldown_s: 0}
        cost_cap: {max: 1, window_s: 300}
        rules:
          - name: once
            match: {metric: cpu}
            action: {type: log}
            rate_limit: {once_within: 300}
          - name: costly
            match: {metric: mem}
            action: {type: log}
            cost: 1
    """)
    store = MemoryGuardStore()
    for n, metric, name in ((1, "cpu", "rate_limit"), (3, "mem", "cost_cap")):
        assert (await guard(p, store, n=n, ts=T0, now=T0, metric=metric))[0] is Mode.auto
        mode, trace = await guard(p, store, n=n + 1, ts=T0 + 300_000, now=T0 + 1000,
                                  metric=metric)
        assert mode is Mode.blocked and guard_lines(trace) == [f"guard:{name}"]


BREAKER = """\
    version: 1
    defaults: {cooldown_s: 0}
    rules:
      - name: restart
        action: {type: log}
        circuit_breaker: {failures: 2, window_s: 60, open_s: 10, probe_timeout_s: 30}
"""


def _decision(n: int, rule: str = "restart", target: str = "svc-a", type_: str = "log",
              mode: Mode = Mode.auto) -> Decision:
    return Decision(
        decision_id=f"d{n}", correlation_id="c", event_id=f"e{n}", entity=target, metric="cpu",
        value=1.0, ts=T0, decided_at=T0, anomaly_score=0.9, confidence=0.9,
        model=ModelInfo(id="m", version="1"),
        rule_trace=[RuleTrace(rule=rule, matched=True, reason="r")],
        action=Action(type=type_, target=target), mode=mode)


async def test_circuit_breaker_opens_probes_and_closes() -> None:
    p, store = policy(BREAKER), MemoryGuardStore()
    # two failures within the window open the breaker at the next check
    for n, at in ((1, T0), (2, T0 + 1000)):
        assert (await guard(p, store, n=n, ts=at))[0] is Mode.auto
        await record_outcome(store, _decision(n), "failed", at + 500)
    mode, trace = await guard(p, store, n=3, ts=T0 + 2000)
    assert mode is Mode.blocked and guard_lines(trace) == ["guard:circuit_breaker"]
    assert trace[-1].reason.startswith("open for log on svc-a: >= 2 failures within 60s")
    # another target is independent
    assert (await guard(p, store, n=4, ts=T0 + 2000, entity="svc-b"))[0] is Mode.auto
    assert (await guard(p, store, n=5, ts=T0 + 11_000))[0] is Mode.blocked  # still open
    # after open_s one probe is let through, and visible in the trace
    mode, trace = await guard(p, store, n=6, ts=T0 + 12_500)
    assert mode is Mode.auto
    assert trace[-1].rule == "guard:circuit_breaker" and not trace[-1].matched
    assert trace[-1].reason.endswith("this decision is the probe")
    mode, trace = await guard(p, store, n=7, ts=T0 + 13_000)
    assert mode is Mode.blocked and trace[-1].reason.endswith("probe d6 in flight")
    assert (await guard(p, store, n=6, ts=T0 + 12_500))[0] is Mode.auto  # redelivery
    # the probe fails: open again, from the probe's outcome
    await record_outcome(store, _decision(6), "failed", T0 + 14_000)
    assert (await guard(p, store, n=8, ts=T0 + 20_000))[0] is Mode.blocked
    # next probe succeeds: closed, and the old failures no longer count
    assert (await guard(p, store, n=9, ts=T0 + 24_500))[0] is Mode.auto
    await record_outcome(store, _decision(9), "succeeded", T0 + 25_000)
    for n in (10, 11, 12):
        assert (await guard(p, store, n=n, ts=T0 + 25_000 + n))[0] is Mode.auto


async def test_interrupted_actions_open_the_breaker() -> None:
    p, store = policy(BREAKER), MemoryGuardStore()
    for n, at in ((1, T0), (2, T0 + 1000)):
        assert (await guard(p, store, n=n, ts=at))[0] is Mode.auto
        await record_outcome(store, _decision(n), "interrupted", at + 500)
    mode, trace = await guard(p, store, n=3, ts=T0 + 2000)
    assert mode is Mode.blocked and guard_lines(trace) == ["guard:circuit_breaker"]


async def test_circuit_breaker_stale_probe_is_replaced() -> None:
    p, store = policy(BREAKER), MemoryGuardStore()
    for n in (1, 2):
        await record_outcome(store, _decision(n), "timeout", T0)
    assert (await guard(p, store, n=3, ts=T0 + 1))[0] is Mode.blocked
    assert (await guard(p, store, n=4, ts=T0 + 10_001))[0] is Mode.auto  # probe
    assert (await guard(p, store, n=5, ts=T0 + 20_000))[0] is Mode.blocked
    assert (await guard(p, store, n=6, ts=T0 + 40_001))[0] is Mode.auto  # probe timed out


async def test_blast_radius_concurrency_and_share_of_fleet() -> None:
    p = policy("""\
        version: 1
        defaults: {cooldown_s: 0}
        rules:
          - name: abs
            match: {metric: cpu}
            action: {type: log}
            blast_radius: {group_label: service, max_concurrent: 2, lease_s: 60}
          - name: pct
            match: {metric: mem}
            action: {type: log}
            blast_radius: {group_label: service, max_fleet_pct: 25}
    """)
    store = MemoryGuardStore()
    pay = {"service": "pay"}
    modes = [(await guard(p, store, n=i, ts=T0, entity=f"pay-{i}", labels=pay))[0]
             for i in range(3)]
    assert modes == [Mode.auto, Mode.auto, Mode.blocked]
    _, trace = await guard(p, store, n=3, ts=T0, entity="pay-3", labels=pay)
    assert guard_lines(trace) == ["guard:blast_radius"]
    assert trace[-1].reason == ("2 actions already in flight in group service=pay "
                                "(limit 2: max_concurrent 2)")
    # another group is independent
    assert (await guard(p, store, n=4, ts=T0, entity="web-1", labels={"service": "web"}))[0] \
        is Mode.auto
    # a finished action frees its slot; an unfinished one frees it when its lease ends
    await store.slot_release("d0")
    assert (await guard(p, store, n=5, ts=T0, entity="pay-5", labels=pay))[0] is Mode.auto
    assert (await guard(p, store, n=6, ts=T0 + 1, entity="pay-6", labels=pay))[0] \
        is Mode.blocked
    assert (await guard(p, store, n=7, ts=T0 + 60_001, entity="pay-7", labels=pay))[0] \
        is Mode.auto
    # share of the fleet: 25% of 8 entities seen = 2 in flight
    await observe_fleet(store, p, [
        TelemetryEvent(entity=f"db-{i}", metric="mem", value=1, ts=T0, labels={"service": "db"})
        for i in range(8)])
    db = {"service": "db"}
    modes = [(await guard(p, store, n=100 + i, ts=T0, entity=f"db-{i}", labels=db,
                          metric="mem"))[0] for i in range(3)]
    assert modes == [Mode.auto, Mode.auto, Mode.blocked]
    _, trace = await guard(p, store, n=110, ts=T0, entity="db-7", labels=db, metric="mem")
    assert "(limit 2: 25% of a fleet of 8)" in trace[-1].reason


async def test_error_budget_downgrades_to_needs_approval() -> None:
    p = policy("""\
        version: 1
        defaults: {cooldown_s: 0, circuit_breaker: false}
        rules:
          - name: fix
            action: {type: log}
            error_budget: {slo: 0.9, window_s: 60, max_burn_rate: 2, min_actions: 4,
                           scope: rule}
    """)
    store = MemoryGuardStore()
    # 1 failure in 4: 25% / 10% budget = 2.5x > 2x, but only with min_actions outcomes
    for n, status in enumerate(["succeeded", "succeeded", "failed"]):
        await record_outcome(store, _decision(n, rule="fix"), status, T0)
    assert (await guard(p, store, n=10, ts=T0 + 1))[0] is Mode.auto
    await record_outcome(store, _decision(3, rule="fix"), "succeeded", T0)
    mode, trace = await guard(p, store, n=11, ts=T0 + 1)
    assert mode is Mode.needs_approval and guard_lines(trace) == ["guard:error_budget"]
    assert trace[-1].reason == ("1 of 4 automated actions (rule) failed within 60s: burn rate "
                                "2.5x > 2x of a 10.0% budget; downgraded to needs_approval")
    # outcomes of other rules do not count against this rule's budget
    for n in range(20, 30):
        await record_outcome(store, _decision(n, rule="other"), "succeeded", T0)
    assert (await guard(p, store, n=12, ts=T0 + 1))[0] is Mode.needs_approval
    # the window moves on
    assert (await guard(p, store, n=13, ts=T0 + 60_000))[0] is Mode.auto
    # blocked and duplicate outcomes are not the automation's failures
    for n in range(30, 40):
        await record_outcome(store, _decision(n, rule="fix"), "blocked", T0 + 60_000)
    assert (await guard(p, store, n=14, ts=T0 + 60_001))[0] is Mode.auto


async def test_cost_cap() -> None:
    p = policy("""\
        version: 1
        defaults: {cooldown_s: 0}
        cost_cap: {max: 100, window_s: 3600}
        rules:
          - name: scale
            match: {metric: cpu}
            action: {type: log}
            cost: 40
          - name: free
            action: {type: log}
    """)
    store = MemoryGuardStore()
    modes = [(await guard(p, store, n=i, ts=T0 + i, entity=f"s{i}"))[0] for i in range(3)]
    assert modes == [Mode.auto, Mode.auto, Mode.blocked]
    _, trace = await guard(p, store, n=3, ts=T0 + 3)
    assert trace[-1].reason == "cost 40 would exceed the cap: 80 of 100 spent within 3600s"
    assert (await guard(p, store, n=4, ts=T0 + 4, metric="mem"))[0] is Mode.auto  # no cost
    assert (await guard(p, store, n=5, ts=T0 + 3_600_001))[0] is Mode.auto


async def test_kill_switch_blocks_everything_but_shadow() -> None:
    p = policy(LADDER)
    store, ks = MemoryGuardStore(), MemoryKillSwitch(paused=True)
    for n, (entity, conf) in enumerate([("svc-a", 0.99), ("svc-a", 0.7), ("svc-a", 0.4)]):
        mode, trace = await guard(p, store, n=n, ts=T0, entity=entity, confidence=conf,
                                  kill_switch=ks)
        assert mode is Mode.blocked and guard_lines(trace) == ["guard:kill_switch"]
        assert trace[-1].reason.startswith("automation paused by test")
    assert (await guard(p, store, n=9, ts=T0, entity="lab-1", kill_switch=ks))[0] is Mode.shadow


async def test_a_blocked_decision_gives_back_what_earlier_guards_reserved() -> None:
    p = policy("""\
        version: 1
        defaults: {cooldown_s: 60}
        cost_cap: {max: 10}
        rules:
          - name: r
            action: {type: log}
            blast_radius: {max_concurrent: 1}
            rate_limit: {max: 5, window_s: 60}
            cost: 6
    """)
    store = MemoryGuardStore()
    assert (await guard(p, store, n=1, ts=T0, entity="a"))[0] is Mode.auto
    await store.slot_release("d1")
    mode, trace = await guard(p, store, n=2, ts=T0 + 1, entity="b")  # over the cost cap
    assert mode is Mode.blocked and guard_lines(trace) == ["guard:cost_cap"]
    # d2 holds no cooldown on b, no rate-limit slot and no blast-radius slot
    assert "cooldown:r:log:b" not in store._claims
    assert all("d2" not in m for m in store._windows["rate:r"])
    assert store._slots["all"] == {}
    p2 = policy("""\
        version: 1
        defaults: {cooldown_s: 60}
        rules:
          - name: r
            action: {type: log}
            rate_limit: {max: 5, window_s: 60}
    """)
    assert (await guard(p2, store, n=3, ts=T0 + 2, entity="b"))[0] is Mode.auto


async def test_engine_runs_the_guards_and_replay_stays_deterministic() -> None:
    p = policy("""\
        version: 1
        defaults: {cooldown_s: 0}
        rules:
          - name: on-deploy
            match: {kind: event, metric: deploy}
            action: {type: log}
            rate_limit: {max: 2, window_s: 60}
    """)
    events = [TelemetryEvent(entity=f"e{i}", metric="deploy", kind="event", value=1,
                             ts=T0 + i * 10_000) for i in range(8)]

    async def run(ks=None):
        eng = DecisionEngine(lambda: p, MemoryFeatureStore(), MemoryGuardStore(),
                             clock=lambda ev: ev.ts, kill_switch=ks)
        out = [d for i in range(0, 8, 3) for d in await eng.process(events[i:i + 3])]
        return eng, out

    eng, first = await run()
    _, again = await run()
    assert [d.model_dump_json() for d in first] == [d.model_dump_json() for d in again]
    assert [d.mode for d in first] == [Mode.auto, Mode.auto, Mode.blocked, Mode.blocked,
                                       Mode.blocked, Mode.blocked, Mode.auto, Mode.auto]
    assert eng.stats.guards == {"rate_limit": 4}
    eng, paused = await run(MemoryKillSwitch(paused=True))
    assert {d.mode for d in paused} == {Mode.blocked}
    assert eng.stats.guards == {"kill_switch": 8}


# --- kill switch and execution guard (Redis) ------------------------------------------------


async def test_kill_switch_is_cached_for_at_most_200ms(aredis) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    reader, writer = KillSwitch(aredis, prefix), KillSwitch(aredis, prefix)
    assert not await reader.paused()
    info = await writer.pause("alice", "incident 42")
    assert info["by"] == "alice" and info["reason"] == "incident 42"
    started = time.monotonic()
    while not await reader.paused():
        await asyncio.sleep(0.01)
    assert time.monotonic() - started <= 0.3
    assert (await reader.info())["reason"] == "incident 42"
    assert await writer.resume() is True
    await asyncio.sleep(0.25)
    assert not await reader.paused()
    assert await writer.resume() is False


async def test_execution_guard_refuses_and_accounts(aredis) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    p = policy("""\
        version: 1
        rules:
          - name: restart
            action: {type: log}
            circuit_breaker: {failures: 2, window_s: 60, open_s: 0.3}
            blast_radius: {group_label: service, max_concurrent: 1}
    """)
    clock = {"now": T0}
    eg = ExecutionGuard(aredis, prefix, lambda: p, clock=lambda: clock["now"])
    d1, d2 = _decision(1), _decision(2, target="svc-b")
    assert d1.chosen_rule == "restart"
    # blast radius: the worker noted the group; the first holds the only slot
    await eg.store.note_group("d1", "service=pay")
    await eg.store.note_group("d2", "service=pay")
    assert await eg.admit(d1) is None
    assert await eg.admit(d1) is None  # idempotent
    assert await eg.admit(d2) == ("blast radius: 1 actions in flight in group service=pay "
                                  "(limit 1: max_concurrent 1)")
    await eg.finished(d1, "failed")
    assert await eg.admit(d2) is None
    await eg.finished(d2, "succeeded")
    # breaker: two failures on svc-a open it for execution as well
    d3 = _decision(3)
    assert await eg.admit(d3) is None
    await eg.finished(d3, "timeout")
    d4 = _decision(4)
    assert await eg.admit(d4) == "circuit breaker open for log on svc-a"
    await eg.finished(d4, "blocked")
    clock["now"] += 400
    d5, d6 = _decision(5), _decision(6)
    assert await eg.admit(d5) is None  # the half-open probe
    assert await eg.admit(d6) == "circuit breaker half-open, probe d5 in flight for log on svc-a"
    await eg.finished(d5, "succeeded")
    assert await eg.admit(d6) is None
    # kill switch
    await KillSwitch(aredis, prefix).pause("bob", "maintenance")
    eg.kill_switch._checked = float("-inf")
    refusal = await eg.admit(_decision(7))
    assert refusal == ("kill switch: automation paused by bob: maintenance "
                       "(ia resume to continue)")


async def test_execution_guard_release_gives_back_the_probe_and_the_slot(aredis) -> None:
    """A decision that will never run (rejected, expired) must not hold the breaker's
    half-open probe until it times out, nor a blast-radius slot until its lease ends."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    p = policy("""\
        version: 1
        rules:
          - name: restart
            action: {type: log}
            circuit_breaker: {failures: 1, window_s: 60, open_s: 1, probe_timeout_s: 600}
            blast_radius: {max_concurrent: 1}
    """)
    clock = {"now": T0}
    eg = ExecutionGuard(aredis, prefix, lambda: p, clock=lambda: clock["now"])
    await eg.finished(_decision(0), "failed", at=T0 - 1)
    assert await eg.admit(_decision(9)) == "circuit breaker open for log on svc-a"
    clock["now"] += 1000
    assert await eg.admit(_decision(1)) is None  # the half-open probe, holding the slot
    assert await eg.admit(_decision(2)) == (
        "circuit breaker half-open, probe d1 in flight for log on svc-a")
    await eg.release(_decision(1))
    assert await eg.admit(_decision(2)) is None


# --- hot reload notices same-second rewrites ------------------------------------------------


def test_policy_source_notices_a_rewrite_with_the_same_mtime(tmp_path: Path,
                                                              monkeypatch) -> None:
    import os

    import ia.decisions.policy_source as policy_source

    monkeypatch.setattr(policy_source, "CHECK_EVERY_S", 0.0)
    path = tmp_path / "p.yaml"
    path.write_text("version: 1\nrules: []\n")
    src = PolicySource(path)
    st = path.stat()
    path.write_text("version: 1\nrules:\n  - name: a\n    action: {type: log}\n")
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # same mtime, other size
    assert [r.name for r in src.current().doc.rules] == ["a"]
