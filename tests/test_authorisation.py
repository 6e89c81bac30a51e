"""Re-authorisation at execution (ia.actuators.authorisation), on plain objects, then in
the actuator's service (real Redis).

A decision is checked against the actuator's own current policy: a record that
differs from what the policy would decide, in any way that could make something run,
is refused with a stable reason.
"""

from __future__ import annotations

import uuid

import pytest

from ia.actuators.approvals import ApprovalStore
from ia.actuators.authorisation import Authoriser, Reason, origin, parse_allow
from ia.actuators.executor import ActionExecutor
from ia.actuators.service import ActuatorService
from ia.core import metrics
from ia.core.clock import now_ms
from ia.core.errors import ConfigError
from ia.decisions.policy import Policy
from ia.schemas.models import (
    Action,
    ActionOutcome,
    ApprovalEvent,
    ApprovalStatus,
    Decision,
    Mode,
    ModelInfo,
    OutcomeStatus,
    RuleTrace,
)
from tests.support import TEST_APPROVAL_KEYS, TEST_KEYS, signed

POLICY = """\
version: 1
commands: {restart: [/bin/true]}
rules:
  - name: hook
    match: {entity: "svc-*", metric: latency_ms}
    action: {type: webhook, target: "{entity}/{metric}", params: {url: "https://hooks.example/x?t=1"}}
  - name: careful
    match: {metric: latency_ms}
    action: {type: command, params: {command: restart, notify_url: "http://chat.example:8080/h"}}
    mode: needs_approval
  - name: tell
    match: {metric: cpu}
    action: {type: notify, params: {url: "env:IA_TEST_CHAT_URL"}}
    mode: notify
  - name: watch
    match: {metric: disk}
    action: {type: log}
    mode: shadow
  - name: undo
    match: {metric: errors}
    action:
      type: simulator
      params: {op: restart, verify_within_s: "60", verify_below: "1", compensate: webhook,
               compensate.url: "https://rollback.example/"}
  - name: no-action
    match: {metric: mem}
"""


def policy() -> Policy:
    return Policy.from_text(POLICY)


def decision(rule: str = "hook", *, entity: str = "svc-a", metric: str = "latency_ms",
             action: Action | None = None, mode: Mode = Mode.auto) -> Decision:
    """What the worker would decide with ``rule`` (or ``action`` instead of the rule's)."""
    if action is None:
        found = policy().evaluate(entity=entity, metric=metric, kind="metric", labels={},
                                  features={}, score=1.0, confidence=1.0, drift="stable")
        assert found.rule == rule, found.trace
        action = found.action
    return Decision(decision_id=f"dc-{uuid.uuid4().hex}", correlation_id="c", event_id="e",
                    entity=entity, metric=metric, value=1.0, ts=1, decided_at=now_ms(),
                    anomaly_score=1.0,
                    confidence=1.0, model=ModelInfo(id="m", version="1"),
                    rule_trace=[RuleTrace(rule=rule, matched=True, reason="score"),
                                RuleTrace.of_guard("cooldown", "free", matched=False)],
                    action=action, mode=mode)


def check(d: Decision, allow: str | None = None):
    p = policy()
    return Authoriser(lambda: p, parse_allow(allow)).check(d)


def reason(d: Decision, allow: str | None = None) -> Reason | None:
    refusal = check(d, allow)
    return None if refusal is None else refusal.reason


def test_what_the_policy_decides_is_allowed() -> None:
    assert check(decision()) is None
    assert check(decision("careful", entity="db", mode=Mode.needs_approval)) is None
    assert check(decision("tell", metric="cpu", mode=Mode.notify)) is None
    assert check(decision("undo", metric="errors")) is None


def test_decisions_that_cannot_act_are_not_checked() -> None:
    wrong = Action(type="command", target="x", params={"command": "restart"})
    for mode in (Mode.shadow, Mode.blocked, Mode.none):
        assert check(decision(action=wrong, mode=mode)) is None


def test_the_rule_must_exist_and_have_an_action() -> None:
    d = decision()
    assert reason(d.model_copy(update={"rule_trace": [
        RuleTrace(rule="gone", matched=True, reason="")]})) is Reason.unknown_rule
    assert reason(d.model_copy(update={"rule_trace": []})) is Reason.unknown_rule
    assert reason(d.model_copy(update={"rule_trace": [
        RuleTrace(rule="no-action", matched=True, reason="")]})) is Reason.unknown_rule
    # a guard step is not a rule
    assert reason(d.model_copy(update={"rule_trace": [
        RuleTrace.of_guard("hook", "")]})) is Reason.unknown_rule


def test_type_params_and_target_are_exactly_the_policys() -> None:
    d = decision()
    assert d.action is not None
    act = d.action
    assert reason(decision(action=act.model_copy(update={"type": "command"}))) \
        is Reason.action_type
    evil = act.model_copy(update={"params": {"url": "https://evil.example/"}})
    refusal = check(decision(action=evil))
    assert refusal is not None and refusal.reason is Reason.params
    assert "evil" not in refusal.detail and "url" in refusal.detail  # names, not values
    more = act.model_copy(update={"params": {**act.params, "notify_url": "http://x/"}})
    assert reason(decision(action=more)) is Reason.params
    fewer = act.model_copy(update={"params": {}})
    assert reason(decision(action=fewer)) is Reason.params
    assert act.target == "svc-a/latency_ms"
    assert reason(decision(action=act.model_copy(update={"target": "svc-b/latency_ms"}))) \
        is Reason.target


def test_the_rules_selectors_must_take_the_series() -> None:
    # The target rendered for this entity, but the rule only selects svc-*.
    act = Action(type="webhook", target="db/latency_ms",
                 params={"url": "https://hooks.example/x?t=1"})
    assert reason(decision(entity="db", action=act)) is Reason.not_selected


@pytest.mark.parametrize("rule, metric, mode", [
    ("careful", "latency_ms", Mode.auto),          # needs approval: never auto
    ("tell", "cpu", Mode.auto),
    ("tell", "cpu", Mode.needs_approval),           # notify: at most notify
])
def test_no_more_autonomy_than_the_rule_allows(rule: str, metric: str, mode: Mode) -> None:
    entity = "db"  # careful, not hook
    assert reason(decision(rule, entity=entity, metric=metric, mode=mode)) is Reason.mode


def test_less_autonomy_than_the_rule_allows_is_fine() -> None:
    # guards (error budget) and the autonomy ladder lower the mode, never raise it
    assert check(decision(mode=Mode.needs_approval)) is None
    assert check(decision(mode=Mode.notify)) is None
    assert check(decision("careful", entity="db", mode=Mode.notify)) is None


def test_a_shadow_rule_never_acts() -> None:
    act = Action(type="log", target="svc-a")
    for mode in (Mode.auto, Mode.needs_approval, Mode.notify):
        assert reason(decision("watch", metric="disk", action=act, mode=mode)) is Reason.mode


def test_destinations_default_to_the_policys_own() -> None:
    assert check(decision()) is None
    assert check(decision("tell", metric="cpu", mode=Mode.notify)) is None  # env: reference


def test_an_explicit_allow_list_is_enforced(monkeypatch) -> None:
    allow = "https://hooks.example, http://chat.example:8080, https://rollback.example"
    assert check(decision(), allow) is None
    assert check(decision("careful", entity="db", mode=Mode.needs_approval), allow) is None
    assert check(decision("undo", metric="errors"), allow) is None
    refusal = check(decision(), "https://other.example")
    assert refusal is not None and refusal.reason is Reason.destination
    assert "https://hooks.example" in refusal.detail and "t=1" not in refusal.detail
    # the port counts: chat.example without one means port 80
    assert reason(decision("careful", entity="db", mode=Mode.needs_approval),
                  "http://chat.example") is Reason.destination
    # the compensation's destination is checked too
    assert reason(decision("undo", metric="errors"), "https://hooks.example") \
        is Reason.destination
    # with an explicit list a secret reference is resolved and checked
    tell = decision("tell", metric="cpu", mode=Mode.notify)
    monkeypatch.setenv("IA_TEST_CHAT_URL", "https://evil.example/hook")
    assert reason(tell, allow) is Reason.destination
    monkeypatch.setenv("IA_TEST_CHAT_URL", "https://hooks.example/hook")
    assert check(tell, allow) is None


def test_origins_and_allow_lists() -> None:
    assert origin("HTTPS://Hooks.Example/x") == ("https", "hooks.example", 443)
    assert origin("http://h:81/") == ("http", "h", 81)
    assert origin("not a url") is None and origin("/relative") is None
    assert parse_allow(None) is None and parse_allow(" ") is None
    assert parse_allow("https://a, http://b:8080/") == {("https", "a", 443), ("http", "b", 8080)}
    for bad in ("a.example", "https://a/path", "ftp//x"):
        with pytest.raises(ConfigError, match="IA_WEBHOOK_ALLOW"):
            parse_allow(bad)


def test_the_current_policy_is_the_one_checked() -> None:
    current = [policy()]
    auth = Authoriser(lambda: current[0])
    d = decision()
    assert auth.check(d) is None
    current[0] = Policy.from_text(POLICY.replace("https://hooks.example/x?t=1",
                                                 "https://hooks.example/y"))
    refusal = auth.check(d)
    assert refusal is not None and refusal.reason is Reason.params


# --------------------------------------------------------------------------- in the service


class Recorder:
    name = "command"

    def __init__(self) -> None:
        self.ran: list[str] = []

    async def execute(self, action, decision) -> str:
        self.ran.append(decision.decision_id)
        return "ran"


@pytest.fixture
def service(aredis, topic_prefix):
    current = [policy()]
    act = Recorder()
    ex = ActionExecutor(aredis, {"command": act}, prefix=topic_prefix, timeout_s=5)
    store = ApprovalStore(aredis, topic_prefix, ttl_s=60, keys=TEST_APPROVAL_KEYS,
                          terms=lambda rule: current[0].approval_terms(rule))
    svc = ActuatorService(ex, store, TEST_KEYS, max_age_ms=10 * 365 * 86_400_000,
                          authoriser=Authoriser(lambda: current[0]))
    return svc, store, act, current


def _rejected_count(reason: str) -> float:
    return metrics.DECISIONS_REJECTED.labels(reason)._value.get()


@pytest.mark.integration
async def test_the_service_rejects_right_after_the_signature(service) -> None:
    svc, _store, act, _ = service
    before = _rejected_count("mode")
    d = signed(decision("careful", entity="db", mode=Mode.auto))
    [out] = await svc.on_decision(d)
    assert isinstance(out, ActionOutcome) and out.status is OutcomeStatus.rejected
    assert (out.actuator, out.error) == ("policy", "rejected: mode")
    assert "allows at most mode needs_approval" in out.detail
    assert _rejected_count("mode") == before + 1 and act.ran == []
    # a bad signature is still the first refusal
    [out] = await svc.on_decision(d.model_copy(update={"signature": None}))
    assert out.error == "rejected: unsigned"


@pytest.mark.integration
async def test_an_approved_request_is_checked_again_before_it_runs(service) -> None:
    svc, store, act, current = service
    d = signed(decision("careful", entity="db", mode=Mode.needs_approval))
    [req] = await svc.on_decision(d)
    assert isinstance(req, ApprovalEvent) and req.status is ApprovalStatus.requested
    # while it waits, the rule is changed: the decision's params are no longer the policy's
    changed = POLICY.replace("commands: {restart: [/bin/true]}",
                             "commands: {restart: [/bin/true], stop: [/bin/false]}")
    current[0] = Policy.from_text(changed.replace("params: {command: restart,",
                                                  "params: {command: stop,"))
    before = _rejected_count("params")
    ok = await store.resolve(req.approval_id, ApprovalStatus.approved, by="ann", via="cli")
    [out] = await svc.on_approval(ok)
    assert isinstance(out, ActionOutcome) and out.status is OutcomeStatus.rejected
    assert out.error == "rejected: params" and out.approved_by is None
    assert out.approval_id == req.approval_id and act.ran == []
    assert _rejected_count("params") == before + 1
    assert await svc.on_approval(ok) == []  # settled once
