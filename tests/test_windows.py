"""Freeze windows, the capacity floor and target sanity, on plain objects.

The stores have their conformance suite in tests/test_guard_stores.py and the
worker path its integration test in tests/test_guards_integration.py; these
pin the semantics: when a window is in force, what each guard decides and says
in the trace, what execution refuses, which policy mistakes are refused (with
file and line), and what a backtest shows of a window.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import random
import re
import uuid
from dataclasses import replace
from pathlib import Path

import pytest

from ia.decisions.guards import (
    EXECUTION_GUARDS,
    ExecutionGuard,
    GuardCall,
    MemoryGuardStore,
    admit,
    apply_guards,
    observe_anomaly,
    observe_health,
)
from ia.decisions.policy import Policy, PolicyError, Range, RuleGuards
from ia.decisions.windows import FreezeWindow, held_by
from ia.offline.backtest_run import LabelSource, run_backtest
from ia.offline.history import History
from ia.offline.run import Variant
from ia.schemas.models import Action, Decision, Mode, ModelInfo, TelemetryEvent

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "windows-policy.yaml"
H = 3_600_000


def ms(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).timestamp() * 1000)


def window(**kw) -> FreezeWindow:
    return FreezeWindow.model_validate({"name": "w", "effect": "block", "owner": "op",
                                        "reason": "test", **kw})


# --- when a window is in force ---------------------------------------------------------------


def test_a_one_off_window_holds_from_start_to_end_in_its_zone() -> None:
    w = window(start="2025-11-28T00:00:00", end="2025-12-01T08:00:00", tz="America/New_York")
    start = ms("2025-11-28T05:00:00+00:00")  # midnight in New York
    assert w.in_force(start - 1) is None
    assert w.in_force(start) == (start, ms("2025-12-01T13:00:00+00:00"))
    assert w.in_force(ms("2025-12-01T12:59:59+00:00")) is not None
    assert w.in_force(ms("2025-12-01T13:00:00+00:00")) is None


def test_a_recurring_window_keeps_its_wall_clock_across_dst_and_stops_at_expiry() -> None:
    w = window(rrule="FREQ=WEEKLY;BYDAY=SA", start="2025-01-04T02:00:00", duration_s=7200,
               tz="Europe/Paris", expires="2025-08-01T00:00:00")
    winter, summer = ms("2025-01-11T01:00:00+00:00"), ms("2025-07-05T00:00:00+00:00")
    assert w.in_force(winter) == (winter, winter + 2 * H)      # 02:00 CET
    assert w.in_force(summer) == (summer, summer + 2 * H)      # 02:00 CEST
    assert w.in_force(summer + 2 * H) is None                  # over
    assert w.in_force(summer - 1) is None                      # not yet
    assert w.in_force(ms("2025-07-06T00:30:00+00:00")) is None  # a Sunday
    assert w.in_force(ms("2025-08-02T00:30:00+00:00")) is None  # a Saturday after expiry


def test_a_window_survives_its_json_round_trip() -> None:
    w = window(rrule="FREQ=DAILY", start="2025-01-01T22:00:00", duration_s=3600,
               tz="Asia/Tokyo", expires="2025-06-01", match={"labels": {"env": "prod"}})
    again = FreezeWindow.model_validate_json(w.model_dump_json())
    t = ms("2025-03-03T13:30:00+00:00")  # 22:30 in Tokyo
    assert again == w and again.in_force(t) == w.in_force(t) is not None


@pytest.mark.parametrize(("fields", "message"), [
    ({"start": "2025-01-01"}, "a one-off window needs an end"),
    ({"start": "2025-01-02", "end": "2025-01-01"}, "the window ends before it starts"),
    ({"start": "2025-01-01", "end": "2026-06-01"}, "at most 366 days"),
    ({"start": "2025-01-01", "rrule": "FREQ=DAILY", "duration_s": 60}, "needs expires"),
    ({"start": "2025-01-01", "rrule": "FREQ=DAILY", "expires": "2025-02-01"}, "duration_s"),
    ({"start": "2025-01-01", "rrule": "FREQ=MINUTELY", "duration_s": 60,
      "expires": "2025-02-01"}, "finer than HOURLY"),
    ({"start": "2025-01-01", "rrule": "FREQ=SOMETIMES", "duration_s": 60,
      "expires": "2025-02-01"}, "cannot read rrule"),
    ({"start": "2025-01-01", "end": "2025-01-02", "tz": "Mars/Olympus"}, "unknown time zone"),
    ({"start": "2025-01-01", "end": "2025-01-02", "owner": " "}, "must not be blank"),
    ({"start": "2025-01-01", "end": "2025-01-02", "name": "no spaces"}, "a window name"),
])
def test_bad_windows_are_refused_with_a_reason(fields: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        window(**fields)


# --- the example policy and `ia policy check` --------------------------------------------------


def test_the_readme_example_is_the_example_file_and_loads() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Freeze windows, the capacity floor"):]
    block = section[section.index("```yaml\n") + 8:]
    assert block[:block.index("```\n")] == EXAMPLE.read_text(encoding="utf-8")
    p = Policy.from_file(EXAMPLE)
    assert [w.name for w in p.doc.windows] == ["black-friday", "saturday-db-maintenance"]
    g = p.guards_for("restart-on-errors")
    assert (g.capacity_floor.min_healthy_pct, g.capacity_floor.lease_s) == (75, 600)
    assert p.guards_for("scale-out-on-latency").param_bounds == (("step", Range(min=-2, max=2)),)


def _line(text: str, needle: str) -> int:
    return next(i for i, line in enumerate(text.splitlines(), 1) if needle in line)


# (what to change in the example, the line the error must name, the message)
MISTAKES = {
    "window-without-owner": ("    owner: sre-oncall\n", "", "- name: black-friday",
                             "windows.0.owner: Field required"),
    "recurring-without-expiry": ("    expires: 2026-01-01T00:00:00     # mandatory: no window "
                                 "lasts for ever (at most 366 days)\n", "",
                                 "- name: saturday-db-maintenance", "needs expires"),
    "unknown-zone": ("tz: Europe/Paris", "tz: Europe/Pariss", "tz: Europe/Pariss",
                     "windows.1.tz: Value error, unknown time zone"),
    "bad-rrule": ('"FREQ=WEEKLY;BYDAY=SA"', '"FREQ=WEEKLY;BYDAY=XX"',
                  "- name: saturday-db-maintenance", "cannot read rrule"),
    "ends-before-start": ("end: 2025-12-01T08:00:00", "end: 2025-11-01T08:00:00",
                          "- name: black-friday", "the window ends before it starts"),
    "duplicate-window": ("- name: saturday-db-maintenance", "- name: black-friday  # again",
                         "# again", "duplicate window name 'black-friday'"),
    "floor-over-100": ("min_healthy_pct: 60}", "min_healthy_pct: 160}", "min_healthy_pct: 160",
                       "defaults.capacity_floor.min_healthy_pct: Input should be less"),
    "wildcard-target": ('target: "{entity}"}', 'target: "web-*"}', 'target: "web-*"',
                        "target 'web-*': it has wildcard characters '*'"),
    "everything-target": ('target: "{entity}", params', 'target: "all", params',
                          'target: "all"', "target 'all': it names everything"),
    "list-target": ('target: "{entity}", params', 'target: "{entity},web-2", params',
                    "web-2", "names 2 things, more than max_targets 1"),
    "param-out-of-bounds": ("params: {step: 1}", "params: {step: 5}", "params: {step: 5}",
                            "param step=5 outside its declared bounds [-2.0, 2.0]"),
    "param-missing": ("params: {step: 1}", "params: {}", "action: {type: scale",
                      "needs param 'step'"),
    "bounds-inverted": ("{min: -2, max: 2}", "{min: 3, max: 2}", "scale: {step:",
                        "action_bounds.scale.step: min 3 > max 2"),
}


@pytest.mark.parametrize("mistake", MISTAKES)
def test_policy_check_refuses_each_mistake_with_file_and_line(mistake: str, tmp_path) -> None:
    old, new, at, message = MISTAKES[mistake]
    text = EXAMPLE.read_text(encoding="utf-8")
    assert old in text, mistake
    text = text.replace(old, new, 1)
    path = tmp_path / "policy.yaml"
    path.write_text(text)
    with pytest.raises(PolicyError) as err:
        Policy.from_file(path)
    assert err.value.source == str(path)
    assert err.value.line == _line(text, at), (str(err.value), _line(text, at))
    assert message in str(err.value)


# --- the guards at decision time --------------------------------------------------------------

POLICY = """\
version: 1
defaults: {cooldown_s: 0, circuit_breaker: false, max_event_age_s: false}
windows:
  - name: freeze-prod
    start: 2025-01-01T00:00:00
    end: 2025-01-02T00:00:00
    effect: block
    match: {labels: {env: prod}}
    owner: sre
    reason: release freeze
  - name: approve-db
    start: 2025-01-01T00:00:00
    end: 2025-01-03T00:00:00
    effect: needs_approval
    match: {entity: "db-*"}
    owner: dba
    reason: maintenance
rules:
  - name: restart
    action: {type: restart, target: "{entity}"}
  - name: tell
    match: {metric: tell}
    action: {type: log, target: "{entity}"}
    mode: notify
"""
IN = ms("2025-01-01T12:00:00+00:00")


async def decide(p: Policy, store, entity: str, labels: dict, at: int, n: int = 0,
                 metric: str = "cpu", score: float = 0.99):
    r = p.evaluate(entity=entity, metric=metric, kind="metric", labels=labels,
                   features={"zscore": 5.0}, score=score, confidence=0.99, drift="stable")
    v = await apply_guards(r, decision_id=f"d-{entity}-{n}", ts=at, now=at, labels=labels,
                           store=store, entity=entity)
    return v.mode, [t for t in r.trace if t.guard is not None]


async def test_windows_block_or_downgrade_what_they_cover_and_name_themselves() -> None:
    p, store = Policy.from_text(POLICY), MemoryGuardStore()
    mode, trace = await decide(p, store, "web-1", {"env": "prod"}, IN)
    assert mode is Mode.blocked and [t.guard for t in trace] == ["freeze_window"]
    assert held_by(trace[0].reason) == "freeze-prod"
    assert trace[0].reason == ("window 'freeze-prod' (block) in force 2025-01-01T00:00:00Z - "
                               "2025-01-02T00:00:00Z, owner sre: release freeze; blocked")
    mode, trace = await decide(p, store, "db-1", {"env": "stage"}, IN)
    assert mode is Mode.needs_approval and held_by(trace[0].reason) == "approve-db"
    # Both in force: the blocking one wins and is the one named.
    mode, trace = await decide(p, store, "db-1", {"env": "prod"}, IN)
    assert mode is Mode.blocked and held_by(trace[0].reason) == "freeze-prod"
    # Outside the scope, or after the window: untouched; notify is never held.
    assert (await decide(p, store, "web-1", {"env": "stage"}, IN))[0] is Mode.auto
    assert (await decide(p, store, "web-1", {"env": "prod"}, IN + 12 * H))[0] is Mode.auto
    tell = Policy.from_text(POLICY.replace("  - name: restart\n    action: {type: restart, "
                                           "target: \"{entity}\"}\n", ""))
    assert (await decide(tell, store, "web-1", {"env": "prod"}, IN, metric="tell"))[0] \
        is Mode.notify


async def test_a_window_added_to_the_store_takes_effect() -> None:
    p, store = Policy.from_text(POLICY), MemoryGuardStore()
    assert (await decide(p, store, "api-1", {}, IN))[0] is Mode.auto
    await store.add_freeze_window(window(name="rt", start=IN - H, end=IN + H,
                                         match={"action": "restart"}))
    mode, trace = await decide(p, store, "api-1", {}, IN, n=1)
    assert mode is Mode.blocked and held_by(trace[0].reason) == "rt"
    await store.remove_freeze_window("rt")
    assert (await decide(p, store, "api-1", {}, IN, n=2))[0] is Mode.auto


# --- the guards at execution time -------------------------------------------------------------


def _execution_call(p: Policy, store, decision_id: str, entity: str, at: int) -> GuardCall:
    return GuardCall(decision_id=decision_id, action=Action(type="restart", target=entity),
                     rule="restart", mode=Mode.auto, settings=p.guards_for("restart"),
                     ts=at, now=at, store=store, entity=entity)


async def test_execution_refuses_inside_a_window_the_approver_did_not_see() -> None:
    p, store = Policy.from_text(POLICY), MemoryGuardStore()
    before = IN - 36 * H  # before both windows
    # Decided (and approved) before the windows opened, executed inside them: refused.
    assert (await decide(p, store, "db-1", {"env": "stage"}, before))[0] is Mode.auto
    held = await admit(EXECUTION_GUARDS, _execution_call(p, store, "d-db-1-0", "db-1", IN))
    assert held.blocked is not None
    assert "window 'approve-db'" in held.blocked.refusal
    assert "not approved inside it" in held.blocked.refusal
    # Decided inside the needs_approval window (so its approver saw it): runs.
    assert (await decide(p, store, "db-1", {"env": "stage"}, IN, n=1))[0] is Mode.needs_approval
    ok = await admit(EXECUTION_GUARDS, _execution_call(p, store, "d-db-1-1", "db-1", IN))
    assert ok.blocked is None
    # A block window refuses whatever the decision saw; the labels come from the note.
    assert (await decide(p, store, "web-9", {"env": "prod"}, before, n=2))[0] is Mode.auto
    no = await admit(EXECUTION_GUARDS, _execution_call(p, store, "d-web-9-2", "web-9", IN))
    assert no.blocked is not None and "window 'freeze-prod'" in no.blocked.refusal


@pytest.mark.integration
async def test_the_actuators_execution_guard_honours_windows_in_redis(aredis) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    p = Policy.from_text(POLICY.split("windows:")[0] + "rules:" + POLICY.split("rules:")[1])
    now = [IN]
    guard = ExecutionGuard(aredis, prefix, lambda: p, clock=lambda: now[0])
    d = Decision(decision_id="dc-x", correlation_id="c", event_id="e", entity="web-1",
                 metric="cpu", value=1.0, ts=IN - H, decided_at=IN - H, anomaly_score=0.99,
                 confidence=0.99, model=ModelInfo(id="m", version="1"),
                 action=Action(type="restart", target="web-1"), mode=Mode.auto)
    await guard.store.note_scope("dc-x", {"labels": {"env": "prod"}, "held": []})
    assert await guard.admit(d) is None
    await guard.store.add_freeze_window(window(name="late", start=IN, end=IN + H,
                                               match={"labels": {"env": "prod"}}))
    guard.store._freeze_read = -float("inf")
    refusal = await guard.admit(d)
    assert refusal is not None and refusal.startswith("freeze window: window 'late' (block)")


# --- the capacity floor -----------------------------------------------------------------------

FLOOR = """\
version: 1
defaults: {cooldown_s: 0, circuit_breaker: false, max_event_age_s: false}
health: {unhealthy_score: 0.8, fresh_s: 120, anomaly_hold_s: 300}
rules:
  - name: restart
    when: {min_score: 0.8}
    action: {type: restart, target: "{entity}"}
    capacity_floor: {group_label: service, min_healthy_pct: 60, lease_s: 600}
"""


def _event(entity: str, ts: int, service: str = "web") -> TelemetryEvent:
    return TelemetryEvent(entity=entity, metric="cpu", value=1.0, ts=ts,
                          labels={"service": service})


async def test_incidents_on_most_of_a_group_at_once_stop_at_the_floor() -> None:
    p, store = Policy.from_text(FLOOR), MemoryGuardStore()
    members = [f"web-{i}" for i in range(10)]
    t = IN
    await observe_health(store, p, [_event(e, t) for e in members])
    await observe_health(store, p, [_event(f"api-{i}", t, "api") for i in range(5)])
    modes = []
    for n, e in enumerate(members[:8]):  # eight of ten go anomalous in the same minute
        ev = _event(e, t + n)
        await observe_anomaly(store, p, ev, 0.95)
        modes.append((await decide(p, store, e, {"service": "web"}, t + n, score=0.95))[0])
    # web-0..3 acted on: then 4 of 10 out, 6 healthy is the floor; web-4 would breach it.
    assert modes == [Mode.auto] * 4 + [Mode.blocked] * 4
    mode, trace = await decide(p, store, "web-5", {"service": "web"}, t + 9, n=1, score=0.95)
    assert mode is Mode.blocked
    # Eight anomalous: only web-8 and web-9 are healthy.
    assert trace[-1].reason == ("acting on web-5 would leave 2 of 10 in group service=web "
                                "healthy (20% < min_healthy_pct 60)")
    # Another group is judged on its own (4 of 5 left healthy).
    assert (await decide(p, store, "api-1", {"service": "api"}, t + 9))[0] is Mode.auto


async def test_stale_members_count_as_unhealthy_and_a_blocked_decision_gives_back_its_hold(
        ) -> None:
    p, store = Policy.from_text(FLOOR), MemoryGuardStore()
    await observe_health(store, p, [_event(f"web-{i}", IN) for i in range(5)])
    await observe_health(store, p, [_event(f"web-{i}", IN + 200_000) for i in range(3)])
    # 2 of 5 went quiet (stale): acting on web-0 leaves 2 of 5 healthy.
    mode, _ = await decide(p, store, "web-0", {"service": "web"}, IN + 200_000)
    assert mode is Mode.blocked
    # A later guard blocking gives the hold back (admit releases reserved guards).
    rg = p.guards_for("restart")
    low = rg.capacity_floor.model_copy(update={"min_healthy_pct": 20})
    call = GuardCall(decision_id="dx", action=Action(type="restart", target="web-1"),
                     rule="restart", mode=Mode.auto,
                     settings=replace(rg, capacity_floor=low),
                     ts=IN + 200_000, now=IN + 200_000, store=store, labels={"service": "web"},
                     entity="web-1")
    from ia.decisions.guards.builtin import CapacityFloorGuard, KillSwitchGuard

    class Refuse(KillSwitchGuard):
        async def check(self, call):
            from ia.decisions.guards import Block
            return Block("refused later")

    got = await admit([CapacityFloorGuard(), Refuse()], call)
    assert got.blocked is not None
    assert store._out["service=web"] == {}
    assert (await admit([CapacityFloorGuard()], call)).blocked is None  # and it holds now
    assert list(store._out["service=web"]) == [("web-1", "dx")]


# --- target sanity ----------------------------------------------------------------------------


@pytest.mark.parametrize(("entity", "why"), [
    ("*", "wildcard"), ("web-[12]", "wildcard"), ("ALL", "names everything"),
    ("a,b", "names 2 things"), ("a, ,b", "empty part")])
async def test_a_rendered_target_that_reads_as_everything_is_refused(entity, why) -> None:
    p = Policy.from_text(POLICY.split("windows:")[0] + "rules:" + POLICY.split("rules:")[1])
    mode, trace = await decide(p, MemoryGuardStore(), entity, {}, IN)
    assert mode is Mode.blocked and trace[0].guard == "target_sanity" and why in trace[0].reason


async def test_params_outside_their_bounds_are_refused_at_decision_time() -> None:
    settings = RuleGuards(param_bounds=(("step", Range(min=1, max=3)),))
    from ia.decisions.guards import DECISION_GUARDS

    async def mode_of(params: dict[str, str]) -> Mode:
        got = await admit(DECISION_GUARDS, GuardCall(
            decision_id=f"d{random.random()}", action=Action(type="scale", target="web-1",
                                                             params=params),
            rule="r", mode=Mode.auto, settings=settings, ts=IN, now=IN,
            store=MemoryGuardStore(), labels={}, entity="web-1"))
        return got.mode

    assert await mode_of({"step": "2"}) is Mode.auto
    assert await mode_of({"step": "7"}) is Mode.blocked
    assert await mode_of({"step": "nan"}) is Mode.blocked
    assert await mode_of({}) is Mode.blocked


# --- a backtest with and without a window -----------------------------------------------------

WITHOUT = """\
version: 1
defaults: {cooldown_s: 0}
rules:
  - name: page
    when: {min_score: 0.8}
    action: {type: log, target: "{entity}"}
"""
T0 = 1_700_000_000_000  # 2023-11-14T22:13:20Z
STEP = 60_000


def _history() -> History:
    rng = random.Random(5)
    events = []
    for i in range(500):
        for entity in ("a-1", "b-1"):
            spike = 400 if i in (300, 450) else 0
            events.append(TelemetryEvent(entity=entity, metric="latency_ms",
                                         value=100 + rng.gauss(0, 2) + spike,
                                         ts=T0 + i * STEP))
    return History(read=lambda _dead: iter(events), source={"kind": "test"})


def test_a_backtest_with_and_without_a_window_shows_what_it_held(tmp_path) -> None:
    # The window covers the first spike (i = 300) on a-1 only.
    start, end = T0 + 290 * STEP, T0 + 310 * STEP
    with_window = WITHOUT.replace("rules:", f"""windows:
  - name: change-freeze
    start: {start}
    end: {end}
    effect: block
    match: {{entity: "a-*"}}
    owner: sre
    reason: quarter-end freeze
rules:""")
    base = Variant("without", "<without>", Policy.from_text(WITHOUT))
    cand = Variant("with", "<with>", Policy.from_text(with_window))
    result = run_backtest(_history(), base, cand, LabelSource(), tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    held = summary["candidate"]["held_by_windows"]
    assert summary["baseline"]["held_by_windows"] == {}
    assert set(held) == {"change-freeze"} and held["change-freeze"]["blocked"] >= 1
    assert summary["candidate"]["guard_interventions"]["freeze_window"] == \
        held["change-freeze"]["blocked"]
    removed = [c for c in summary["diff"]["examples"] if c["kind"] == "removed"]
    assert removed and all(c["entity"] == "a-1" and start <= c["ts"] < end for c in removed)
    assert all(c["candidate"]["guards"] == ["freeze_window"] for c in removed)
    assert summary["diff"]["added"] == summary["diff"]["changed"] == 0
    base_actions = summary["baseline"]["volume"]["actions"]
    assert summary["candidate"]["volume"]["actions"] == base_actions - len(removed)
    html = result.paths["report"].read_text()
    assert "Held by freeze windows" in html
    row = re.search(r"<tr><td>change-freeze</td><td>candidate</td><td>(\d+)</td>", html)
    assert row and int(row.group(1)) == held["change-freeze"]["blocked"]
    assert asyncio.iscoroutinefunction(apply_guards)
