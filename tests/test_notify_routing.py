"""Notifications go only to notification endpoints, never to an action's URL.

Two real HTTP sinks, one per URL: the action endpoint (``params.url``) and the
notification endpoint (``IA_NOTIFY_URL``). A ``notify``-mode decision and an
approval announcement must reach only the notification endpoint, under their own
idempotency keys, so the approved action later reaches its endpoint exactly once
under ``Idempotency-Key: <decision_id>``. Redis is real (claims, approvals).
"""

from __future__ import annotations

import uuid

import pytest

from ia.actuators.approvals import ApprovalStore
from ia.actuators.builtin import NotifyActuator, WebhookActuator
from ia.actuators.executor import ActionExecutor
from ia.actuators.service import ActuatorService
from ia.schemas.models import (
    Action,
    ApprovalStatus,
    Decision,
    Mode,
    ModelInfo,
    OutcomeStatus,
    RuleTrace,
)
from tests.support import TEST_APPROVAL_KEYS, TEST_KEYS, WebhookSink, signed

ANY_AGE_MS = 10 * 365 * 86_400_000  # the decisions here carry a fixed, old decided_at

pytestmark = pytest.mark.integration

T0 = 1_732_700_000_000


def decision(mode: Mode, **params: str) -> Decision:
    return signed(Decision(
        decision_id=f"dc-{uuid.uuid4().hex}", correlation_id="c", event_id="e", entity="svc-a",
        metric="latency_ms", value=900.0, ts=T0, decided_at=T0, anomaly_score=0.95,
        confidence=0.7, model=ModelInfo(id="m", version="1"),
        rule_trace=[RuleTrace(rule="restart", matched=True, reason="score")],
        action=Action(type="webhook", target="svc-a", params=params), mode=mode,
        policy_version="p1"))


@pytest.fixture(scope="module")
def sinks():
    with WebhookSink() as action_sink, WebhookSink() as notify_sink:
        yield action_sink, notify_sink


@pytest.fixture
async def service(aredis, topic_prefix, sinks):
    notify_sink = sinks[1]
    for s in sinks:
        s.calls.clear()
        s.bodies.clear()
    webhook = WebhookActuator(retries=0, timeout_s=2.0)
    notifier = NotifyActuator(default_url=notify_sink.url, retries=0, timeout_s=2.0)
    ex = ActionExecutor(aredis, {"webhook": webhook, "notify": notifier}, prefix=topic_prefix,
                        timeout_s=5, notifier=notifier)
    store = ApprovalStore(aredis, topic_prefix, ttl_s=60, keys=TEST_APPROVAL_KEYS)
    yield ActuatorService(ex, store, TEST_KEYS, max_age_ms=ANY_AGE_MS,
                          notifier=notifier), store
    await webhook.close()
    await notifier.close()


async def test_approval_is_announced_to_humans_and_the_action_runs_once(service, sinks) -> None:
    svc, store = service
    action_sink, notify_sink = sinks
    d = decision(Mode.needs_approval, url=action_sink.url)
    [req] = await svc.on_decision(d)
    assert action_sink.calls == {}  # nothing reaches the action endpoint before approval
    assert notify_sink.calls == {f"{d.decision_id}:announce": 1}
    assert req.approval_id in notify_sink.bodies[0]["text"]

    ok = await store.resolve(req.approval_id, ApprovalStatus.approved, by="ann", via="cli")
    [out] = await svc.on_approval(ok)
    assert out.status is OutcomeStatus.succeeded, out
    assert action_sink.calls == {d.decision_id: 1}
    assert notify_sink.calls == {f"{d.decision_id}:announce": 1}


async def test_notify_mode_reaches_only_the_notify_endpoint(service, sinks) -> None:
    svc, _ = service
    action_sink, notify_sink = sinks
    d = decision(Mode.notify, url=action_sink.url)
    [out] = await svc.on_decision(d)
    assert out.status is OutcomeStatus.blocked and "humans notified" in out.detail
    assert action_sink.calls == {}  # a notify decision never calls the action endpoint
    assert notify_sink.calls == {f"{d.decision_id}:notify": 1}
    assert "would run webhook on svc-a" in notify_sink.bodies[0]["text"]


async def test_notify_url_param_chooses_the_notification_endpoint(service, sinks) -> None:
    svc, _ = service
    action_sink, notify_sink = sinks
    d = decision(Mode.notify, url=notify_sink.url + "/never", notify_url=action_sink.url)
    await svc.on_decision(d)
    assert action_sink.calls == {f"{d.decision_id}:notify": 1}  # the rule's own notify_url
    assert notify_sink.calls == {}
