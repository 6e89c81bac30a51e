"""Every guard through the real broker and Redis: one worker and one actuator for the module.

Each test drives its own rule (selected by metric) with discrete events, which
need no model warm-up.  Event-time guards (rate limit, cooldown, cost cap)
get explicit timestamps; live guards (breaker, blast radius, error budget,
kill switch) run on the wall clock with short windows.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from ia.core.kafka import ensure_topics
from ia.core.settings import Topics
from ia.decisions.policy import Policy
from ia.schemas.models import Action, Decision, Mode, ModelInfo, RuleTrace
from tests.kafka_client import produce, read_topic
from tests.support import IaProcess, ia_env, signed, wait_until

pytestmark = pytest.mark.integration

POLICY = """\
version: 1
defaults: {{cooldown_s: 0, max_event_age_s: false}}  # historical timestamps
cost_cap: {{max: 100, window_s: 3600}}
windows:
  - name: policy-freeze
    start: {w_start}
    end: {w_end}
    effect: block
    match: {{labels: {{freeze: "yes"}}}}
    owner: pytest
    reason: integration freeze
commands:
  fail: ["false"]
  slow: ["sleep", "1.5"]
  flaky: ["{python}", "-c", "import os, sys; sys.exit(0 if os.path.exists('{flag}') else 1)"]
rules:
  - name: rate
    match: {{kind: event, metric: rl}}
    action: {{type: log, target: "{{entity}}"}}
    rate_limit: {{max: 2, window_s: 60}}
  - name: cool
    match: {{kind: event, metric: cd}}
    action: {{type: log, target: "{{entity}}"}}
    cooldown_s: 30
  - name: breaker
    match: {{kind: event, metric: cb}}
    action: {{type: command, target: "{{entity}}", params: {{command: flaky}}}}
    circuit_breaker: {{failures: 2, window_s: 60, open_s: 2, probe_timeout_s: 30}}
  - name: blast
    match: {{kind: event, metric: br}}
    action: {{type: command, target: "{{entity}}", params: {{command: slow}}}}
    blast_radius: {{group_label: service, max_concurrent: 2, lease_s: 60}}
  - name: fleet
    match: {{kind: event, metric: bf}}
    action: {{type: command, target: "{{entity}}", params: {{command: slow}}}}
    blast_radius: {{group_label: service, max_fleet_pct: 20, lease_s: 60}}
  - name: budget
    match: {{kind: event, metric: eb}}
    action: {{type: command, target: "{{entity}}", params: {{command: fail}}}}
    circuit_breaker: false
    error_budget: {{slo: 0.9, window_s: 120, max_burn_rate: 2, min_actions: 3, scope: rule}}
  - name: costly
    match: {{kind: event, metric: cost}}
    action: {{type: log, target: "{{entity}}"}}
    cost: 40
  - name: tick
    match: {{kind: event, metric: tick}}
    action: {{type: log, target: "{{entity}}"}}
"""

T0 = 1_750_000_000_000


@pytest.fixture(scope="module")
def loop(infra, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("guards")
    prefix = f"g{uuid.uuid4().hex[:8]}"
    flag = tmp / "healthy"
    policy = tmp / "policy.yaml"
    now = int(time.time() * 1000)
    text = POLICY.format(python=sys.executable, flag=flag, w_start=now - 3_600_000,
                         w_end=now + 86_400_000)
    policy.write_text(text)
    env = ia_env(infra, prefix, policy, IA_ACTION_TIMEOUT_S="5")
    ensure_topics(infra.kafka, Topics(prefix).all(), 4)
    worker = IaProcess(["worker"], env, tmp / "worker.log").start()
    actuator = IaProcess(["actuate"], env, tmp / "actuator.log").start()
    try:
        yield {"prefix": prefix, "kafka": infra.kafka, "redis": infra.redis, "env": env,
               "worker": worker, "actuator": actuator, "flag": flag, "policy": policy,
               "text": text, "tmp": tmp}
    finally:
        worker.stop()
        actuator.stop()


def ev(metric: str, entity: str, n: int, ts: int, labels: dict | None = None) -> dict:
    return {"entity": entity, "metric": metric, "kind": "event", "value": 1.0, "ts": ts,
            "event_id": f"{metric}-{entity}-{n}-{uuid.uuid4().hex[:6]}", "labels": labels or {}}


def send(loop, events: list[dict], partition: int | None = None) -> None:
    produce(loop["kafka"], f"{loop['prefix']}.telemetry", events, key=lambda r: r["entity"],
            partition=partition)


def decisions(loop, events: list[dict], timeout_s: float = 60) -> list[dict]:
    """The decisions of ``events``, in the order of ``events``."""
    want = {e["event_id"] for e in events}
    recs = read_topic(loop["kafka"], f"{loop['prefix']}.decisions", timeout_s=timeout_s,
                      until=lambda rs: want <= {r["event_id"] for r in rs})
    by_event = {r["event_id"]: r for r in recs if r["event_id"] in want}
    assert set(by_event) == want, (
        f"missing decisions for {want - set(by_event)}\n{loop['worker'].tail()}")
    return [by_event[e["event_id"]] for e in events]


def outcomes(loop, decided: list[dict], timeout_s: float = 60) -> list[dict]:
    """The (action-phase) outcome of each decision, in order."""
    want = {d["decision_id"] for d in decided}
    recs = read_topic(loop["kafka"], f"{loop['prefix']}.outcomes", timeout_s=timeout_s,
                      until=lambda rs: want <= {r["decision_id"] for r in rs})
    by_id = {r["decision_id"]: r for r in recs
             if r["decision_id"] in want and r.get("phase", "action") == "action"}
    assert set(by_id) == want, f"missing outcomes\n{loop['actuator'].tail()}"
    return [by_id[d["decision_id"]] for d in decided]


def guards_of(d: dict) -> list[str]:
    return [t["rule"] for t in d["rule_trace"] if t["rule"].startswith("guard:") and t["matched"]]


def decide_one(loop, metric: str, entity: str, n: int, **kw) -> dict:
    e = ev(metric, entity, n, T0 + n * 1000, **kw)
    send(loop, [e])
    return decisions(loop, [e])[0]


# --------------------------------------------------------------------------------------------


def test_rate_limit(loop):
    events = [ev("rl", "rl-1", i, T0 + i * 1000) for i in range(5)]
    events.append(ev("rl", "rl-1", 5, T0 + 61_000))  # the window has slid (event time)
    send(loop, events)
    ds = decisions(loop, events)
    assert [d["mode"] for d in ds] == ["auto", "auto", "blocked", "blocked", "blocked", "auto"]
    assert guards_of(ds[2]) == ["guard:rate_limit"]
    assert ds[2]["rule_trace"][-1]["reason"] == \
        "rule rate already acted 2 times within 60s (max 2)"
    outs = outcomes(loop, ds)
    assert [o["status"] for o in outs] == ["succeeded", "succeeded", "blocked", "blocked",
                                           "blocked", "succeeded"]


def test_cooldown(loop):
    events = [ev("cd", "cd-1", 0, T0), ev("cd", "cd-1", 1, T0 + 10_000),
              ev("cd", "cd-2", 0, T0 + 10_000), ev("cd", "cd-1", 2, T0 + 31_000)]
    send(loop, events)
    ds = decisions(loop, events)
    assert [d["mode"] for d in ds] == ["auto", "blocked", "auto", "auto"]
    assert guards_of(ds[1]) == ["guard:cooldown"]
    assert ds[1]["rule_trace"][-1]["reason"] == \
        f"cd-1 in cooldown (30s) after decision {ds[0]['decision_id']}"


def test_circuit_breaker_opens_and_half_open_probe_decides(loop):
    def step(n: int) -> tuple[dict, dict | None]:
        d = decide_one(loop, "cb", "cb-1", n)
        return d, (outcomes(loop, [d])[0] if d["action"] else None)

    loop["flag"].unlink(missing_ok=True)
    for n in (1, 2):  # two failures within the window...
        d, o = step(n)
        assert (d["mode"], o["status"]) == ("auto", "failed"), o
    d, o = step(3)  # ...open the breaker for command on cb-1
    assert d["mode"] == "blocked" and guards_of(d) == ["guard:circuit_breaker"]
    assert d["rule_trace"][-1]["reason"].startswith("open for command on cb-1: >= 2 failures")
    assert o["status"] == "blocked"
    other = decide_one(loop, "cb", "cb-2", 1)  # other targets are unaffected
    assert other["mode"] == "auto"

    time.sleep(2.2)  # open_s: one half-open probe goes through; it fails: open again
    d, o = step(4)
    assert d["mode"] == "auto" and d["rule_trace"][-1]["reason"].endswith(
        "this decision is the probe")
    assert o["status"] == "failed"
    d, _ = step(5)
    assert d["mode"] == "blocked" and "open for command on cb-1" in d["rule_trace"][-1]["reason"]

    loop["flag"].touch()  # the target recovers; the next probe succeeds and closes it
    time.sleep(2.2)
    d, o = step(6)
    assert d["mode"] == "auto" and o["status"] == "succeeded"
    d, o = step(7)
    assert d["mode"] == "auto" and not [t for t in d["rule_trace"]
                                        if t["rule"].startswith("guard:")]
    assert o["status"] == "succeeded"


def test_blast_radius_max_concurrent_and_share_of_fleet(loop):
    pay = {"service": "pay"}
    events = [ev("br", f"pay-{i}", 0, T0, labels=pay) for i in range(4)]
    send(loop, events, partition=0)  # one batch: decided together, before any finishes
    ds = decisions(loop, events)
    assert sorted(d["mode"] for d in ds) == ["auto", "auto", "blocked", "blocked"]
    blocked = next(d for d in ds if d["mode"] == "blocked")
    assert guards_of(blocked) == ["guard:blast_radius"]
    assert blocked["rule_trace"][-1]["reason"] == (
        "2 actions already in flight in group service=pay (limit 2: max_concurrent 2)")
    outs = outcomes(loop, ds)
    assert sorted(o["status"] for o in outs) == ["blocked", "blocked", "succeeded", "succeeded"]
    # finished actions free their slots
    again = [ev("br", f"pay-{i}", 1, T0 + 1, labels=pay) for i in range(2)]
    send(loop, again, partition=0)
    assert [d["mode"] for d in decisions(loop, again)] == ["auto", "auto"]

    # 20% of a fleet of 10 (counted from the telemetry) may be acted on at once
    web = {"service": "web"}
    fleet = [ev("seen", f"web-{i}", 0, T0, labels=web) for i in range(10)]
    send(loop, fleet)
    decisions(loop, fleet)
    acts = [ev("bf", f"web-{i}", 0, T0, labels=web) for i in range(4)]
    send(loop, acts, partition=0)
    ds = decisions(loop, acts)
    assert sorted(d["mode"] for d in ds) == ["auto", "auto", "blocked", "blocked"]
    blocked = next(d for d in ds if d["mode"] == "blocked")
    assert blocked["rule_trace"][-1]["reason"].endswith("(limit 2: 20% of a fleet of 10)")


def test_error_budget_gate_downgrades_to_needs_approval(loop):
    events = [ev("eb", f"eb-{i}", 0, T0) for i in range(3)]
    send(loop, events)
    outs = outcomes(loop, decisions(loop, events))
    assert [o["status"] for o in outs] == ["failed"] * 3
    d = decide_one(loop, "eb", "eb-9", 0)
    assert d["mode"] == "needs_approval" and guards_of(d) == ["guard:error_budget"]
    assert d["rule_trace"][-1]["reason"] == (
        "3 of 3 automated actions (rule) failed within 120s: burn rate 10.0x > 2x of a "
        "10.0% budget; downgraded to needs_approval")


def test_cost_cap(loop):
    events = [ev("cost", "cost-1", i, T0 + i) for i in range(3)]
    send(loop, events)
    ds = decisions(loop, events)
    assert [d["mode"] for d in ds] == ["auto", "auto", "blocked"]
    assert guards_of(ds[2]) == ["guard:cost_cap"]
    assert ds[2]["rule_trace"][-1]["reason"] == \
        "cost 40 would exceed the cap: 80 of 100 spent within 3600s"


def _crafted_decision(n: int) -> dict:
    """A decision produced straight to the decisions topic, signed as a worker would (a
    key that leaked, or a worker gone wrong): only the actuator's guards can stop it."""
    d = signed(Decision(decision_id=f"dc-crafted-{uuid.uuid4().hex}", correlation_id="x",
                 event_id=f"crafted-{n}", entity="direct-1", metric="tick", value=1.0, ts=T0,
                 decided_at=int(time.time() * 1000), anomaly_score=0.0, confidence=0.0,
                 model=ModelInfo(id="none", version="0"),
                 rule_trace=[RuleTrace(rule="tick", matched=True, reason="crafted")],
                 action=Action(type="log", target="direct-1"), mode=Mode.auto))
    return json.loads(d.model_dump_json())


def _ia(loop, *args: str) -> dict:
    run = subprocess.run([sys.executable, "-m", "ia.cli", *args], env={**loop["env"]},
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_kill_switch_is_honoured_by_worker_and_actuator_within_1s(loop):
    """Ticks stream in; `ia pause`; from then on, within 1 s, nothing is executed."""
    stop = threading.Event()
    sent: list[dict] = []
    crafted: list[dict] = []

    def stream() -> None:
        n = 0
        while not stop.is_set():
            e = ev("tick", "tick-1", n, T0 + n)
            c = _crafted_decision(n)
            send(loop, [e])
            produce(loop["kafka"], f"{loop['prefix']}.decisions", [c], key=lambda r: "direct-1")
            sent.append(e)
            crafted.append(c)
            n += 1
            time.sleep(0.05)

    producer = threading.Thread(target=stream, daemon=True)
    producer.start()
    try:
        wait_until(lambda: len(sent) > 20, 30, "ticks flowing")
        decisions(loop, sent[:5])  # the loop is live
        info = _ia(loop, "pause", "--reason", "kill-switch test", "--by", "pytest")
        paused_at = info["at"]
        time.sleep(max(0.0, (paused_at + 2500) / 1000 - time.time()))  # 2.5 s of ticks after
    finally:
        stop.set()
        producer.join(10)
    ds = decisions(loop, sent)
    after = [d for d in ds if d["decided_at"] > paused_at]
    assert after, "no decision after the pause"
    first_blocked = min(d["decided_at"] for d in after if d["mode"] == "blocked")
    assert first_blocked - paused_at <= 1000
    late = [d for d in ds if d["decided_at"] > paused_at + 1000]
    assert late and all(d["mode"] == "blocked" for d in late)
    assert all(guards_of(d) == ["guard:kill_switch"] for d in late)
    assert "automation paused by pytest: kill-switch test" in late[0]["rule_trace"][-1]["reason"]

    # the actuator refuses too: crafted auto decisions it receives after the pause
    outs = outcomes(loop, crafted)
    started_after = [o for o in outs if o["started_at"] > paused_at]
    first = min(o["started_at"] for o in started_after if o["status"] == "blocked")
    assert first - paused_at <= 1000
    late_outs = [o for o in outs if o["started_at"] > paused_at + 1000]
    assert late_outs and all(o["status"] == "blocked" for o in late_outs)
    assert late_outs[0]["detail"].startswith("kill switch: automation paused by pytest")

    # `ia resume` lifts it
    assert _ia(loop, "resume") == {"paused": False, "was_paused": True}
    time.sleep(0.5)
    d = decide_one(loop, "tick", "tick-2", 0)
    assert d["mode"] == "auto"
    assert outcomes(loop, [d])[0]["status"] == "succeeded"


def test_hot_reload_is_atomic(loop):
    """A new policy takes effect without a restart; a broken one is rejected, the old stays."""
    policy: Path = loop["policy"]
    original = loop["text"]
    v1 = Policy.from_text(original).version
    d = decide_one(loop, "tick", "hr-1", 0)
    assert d["policy_version"] == v1 and d["mode"] == "auto"

    changed = original.replace("  - name: tick\n", "  - name: tick\n    mode: shadow\n")
    v2 = Policy.from_text(changed).version
    tmp = policy.with_suffix(".tmp")
    tmp.write_text(changed)
    tmp.replace(policy)  # an editor's write-and-rename
    try:
        def reloaded() -> bool:
            return decide_one(loop, "tick", "hr-1", int(time.time() * 1000) % 10**6)[
                "policy_version"] == v2
        wait_until(reloaded, 30, "the worker to pick up the new policy", every_s=0.5)
        d = decide_one(loop, "tick", "hr-2", 0)
        assert (d["policy_version"], d["mode"]) == (v2, "shadow")

        policy.write_text(changed.replace("cost: 40", "cost: lots"))  # broken in place
        time.sleep(2.5)  # more than one reload check
        d = decide_one(loop, "tick", "hr-3", 0)
        assert (d["policy_version"], d["mode"]) == (v2, "shadow")  # the old policy stays
        assert loop["worker"].alive()
        wait_until(lambda: "policy change rejected" in loop["worker"].tail(200), 10,
                   "the rejection to be logged")
        assert f"{policy}:" in loop["worker"].tail(200)  # with file and line
    finally:
        policy.write_text(original)
    wait_until(lambda: decide_one(loop, "tick", "hr-4", int(time.time() * 1000) % 10**6)[
        "policy_version"] == v1, 30, "the original policy back", every_s=0.5)


def test_freeze_windows_from_the_policy_and_added_at_run_time(loop):
    """The policy's window blocks the decision it covers and the trace names it;
    `ia windows add` takes effect at run time, `ia windows remove` lifts it, and both
    changes are recorded."""
    d = decide_one(loop, "tick", "fz-1", 0, labels={"freeze": "yes"})
    assert d["mode"] == "blocked" and guards_of(d) == ["guard:freeze_window"]
    assert d["rule_trace"][-1]["reason"].startswith("window 'policy-freeze' (block) in force")
    assert "owner pytest: integration freeze; blocked" in d["rule_trace"][-1]["reason"]
    assert decide_one(loop, "tick", "fz-2", 0, labels={"freeze": "no"})["mode"] == "auto"

    added = _ia(loop, "windows", "add", "rt-hold", "--effect", "needs_approval", "--for", "1h",
                "--label", "hold=yes", "--reason", "runtime test", "--by", "pytest")
    assert added["added"]["added_by"] == "pytest"
    d = decide_one(loop, "tick", "fz-3", 0, labels={"hold": "yes"})
    assert d["mode"] == "needs_approval" and guards_of(d) == ["guard:freeze_window"]
    assert d["rule_trace"][-1]["reason"].startswith("window 'rt-hold' (needs_approval)")
    assert d["rule_trace"][-1]["reason"].endswith("auto downgraded to needs_approval")

    _ia(loop, "windows", "remove", "rt-hold", "--reason", "done", "--by", "pytest")
    time.sleep(0.6)  # past the workers' 0.5 s refresh
    assert decide_one(loop, "tick", "fz-4", 0, labels={"hold": "yes"})["mode"] == "auto"
    run = subprocess.run([sys.executable, "-m", "ia.cli", "windows", "list", "--log", "--json"],
                         env=loop["env"], capture_output=True, text=True, timeout=60, check=True)
    log = [json.loads(line) for line in run.stdout.splitlines()]
    assert [(e["op"], e["window"]["name"], e["by"]) for e in log] == [
        ("remove", "rt-hold", "pytest"), ("add", "rt-hold", "pytest")]
    assert log[0]["reason"] == "done"
