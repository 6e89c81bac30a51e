"""Approvals, verification, the approval API and actuator plug-ins, without Kafka.

Redis is real (approval state transitions are Lua scripts); the HTTP API is
served in-process; plug-ins are real distributions on ``sys.path``.
"""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from ia.actuators.approvals import ApprovalError, ApprovalStore, approval_id_for, normalise_id
from ia.actuators.base import ActionFailed
from ia.actuators.builtin import LogActuator, NotifyActuator, slack_escape
from ia.actuators.executor import ActionExecutor
from ia.actuators.registry import ActuatorContext, build_actuators, discover, load_plugins
from ia.actuators.service import ActuatorService
from ia.actuators.verification import SpecError, Verifier, spec_of
from ia.core import metrics
from ia.core.errors import ConfigError
from ia.decisions.policy import Policy
from ia.governance.api import (
    ApprovalDesk,
    RateLimiter,
    Tokens,
    build_api,
    load_tokens,
    token_hash,
)
from ia.schemas.models import (
    Action,
    ActionOutcome,
    ApprovalEvent,
    ApprovalStatus,
    Decision,
    Mode,
    ModelInfo,
    OutcomePhase,
    OutcomeStatus,
    RuleTrace,
)
from ia.schemas.serde import decode, encode
from tests.redis_faults import FailOnce, RedisConnectionError
from tests.support import TEST_APPROVAL_KEYS, TEST_KEYS, signed
from tests.test_governance import make_plugin

pytestmark = pytest.mark.integration

T0 = 1_732_700_000_000
# The decisions here are decided at T0, long ago: their age is not what is tested.
ANY_AGE_MS = 10 * 365 * 86_400_000


# The actuator's policy: the approval terms of each rule come from here, never from
# the decision.
POLICY = Policy.from_text("""
version: 1
approvers:
  oncall: [ann, bo]
  leads: [cy]
rules:
  - {name: slow, action: {type: log}, mode: needs_approval}
  - name: brief
    action: {type: log}
    approval: {ttl_s: 1}
  - name: brief-yes
    action: {type: log}
    approval: {ttl_s: 1, on_expiry: approve}
  - name: guarded
    action: {type: log}
    approval: {approvers: [oncall, leads], four_eyes: true}
""")


def decision(mode: Mode = Mode.needs_approval, entity: str = "svc-a", rule: str = "slow",
             **params: str) -> Decision:
    return signed(Decision(
        decision_id=f"dc-{uuid.uuid4().hex}", correlation_id="c", event_id="e", entity=entity,
        metric="latency_ms", value=900.0, ts=T0, decided_at=T0, anomaly_score=0.95,
        confidence=0.7, model=ModelInfo(id="m", version="1"),
        rule_trace=[RuleTrace(rule=rule, matched=True, reason="score"),
                    RuleTrace(rule="guard:cooldown", matched=False, reason="free")],
        action=Action(type="log", target=entity, params=params), mode=mode,
        policy_version="p1"))


@pytest.fixture
def store(aredis, topic_prefix) -> ApprovalStore:
    return ApprovalStore(aredis, topic_prefix, ttl_s=60, keys=TEST_APPROVAL_KEYS,
                         terms=POLICY.approval_terms)


# --------------------------------------------------------------------------- the store


def test_ids() -> None:
    assert approval_id_for("dc-abc") == "ap-abc"
    assert normalise_id("dc-abc") == "ap-abc" and normalise_id("ap-abc") == "ap-abc"
    assert approval_id_for("other").startswith("ap-")


async def test_request_is_created_once_and_replayed_identically(store) -> None:
    d = decision()
    ev, created = await store.request(d, now_ms=T0)
    assert created and ev.status is ApprovalStatus.requested and ev.rule == "slow"
    assert (ev.expires_at - ev.requested_at, ev.on_expiry.value) == (60_000, "reject")
    again, created = await store.request(d, now_ms=T0 + 5000)
    assert not created and again == ev  # same bytes on the wire
    assert [e.approval_id for e in await store.list()] == [ev.approval_id]


async def test_expiry_terms_come_from_the_policy_never_from_the_decision(store) -> None:
    # A decision cannot lengthen its own approval window or approve itself on expiry.
    ev, _ = await store.request(decision(approval_ttl_s="99999", on_expiry="approve"),
                                now_ms=T0)
    assert ev.expires_at - ev.requested_at == 60_000 and ev.on_expiry.value == "reject"
    brief, _ = await store.request(decision(rule="brief-yes", approval_ttl_s="99999"),
                                   now_ms=T0)
    assert brief.expires_at - brief.requested_at == 1000 and brief.on_expiry.value == "approve"
    guarded, _ = await store.request(decision(rule="guarded"), now_ms=T0)
    assert (guarded.approvers, guarded.required) == (["ann", "bo", "cy"], 2)
    # a restricted rule never approves by default, whatever the setting says
    lax = ApprovalStore(store.client, store.keys.prefix, ttl_s=60, on_expiry="approve",
                        keys=TEST_APPROVAL_KEYS, terms=POLICY.approval_terms)
    assert (await lax.request(decision(rule="guarded"), now_ms=T0))[0].on_expiry.value == \
        "reject"
    assert (await lax.request(decision(), now_ms=T0))[0].on_expiry.value == "approve"


async def test_one_answer_wins(store) -> None:
    ev, _ = await store.request(decision(), now_ms=T0)
    answers = await asyncio.gather(
        *(store.resolve(ev.approval_id, s, by=f"u{i}", via="cli", reason="r", now_ms=T0 + 1)
          for i, s in enumerate([ApprovalStatus.approved, ApprovalStatus.rejected] * 5)),
        return_exceptions=True)
    winners = [a for a in answers if isinstance(a, ApprovalEvent)]
    assert len(winners) == 1
    assert all(isinstance(a, ApprovalError) and "already" in str(a)
               for a in answers if a not in winners)
    stored = (await store.get(ev.approval_id))[0]
    assert stored == winners[0] and stored.at == T0 + 1 and stored.reason == "r"
    assert await store.list() == []
    assert await store.unfinished(T0 + 1) == [ev.approval_id]
    with pytest.raises(ValueError):
        await store.resolve(ev.approval_id, ApprovalStatus.expired, by="x", via="cli")
    with pytest.raises(ApprovalError, match="no approval request"):
        await store.resolve("ap-nope", ApprovalStatus.approved, by="x", via="cli")


async def test_expiry_wins_after_the_deadline(store) -> None:
    ev, _ = await store.request(decision(), now_ms=T0)
    assert await store.expire_due(now_ms=T0 + 59_999) == []
    with pytest.raises(ApprovalError, match="expired"):
        await store.resolve(ev.approval_id, ApprovalStatus.approved, by="late", via="cli",
                            now_ms=T0 + 60_000)
    [expired] = await store.expire_due(now_ms=T0 + 60_000)
    assert (expired.status, expired.by, expired.via) == (ApprovalStatus.expired, "expiry",
                                                         "actuator")
    assert "rejected by default" in expired.reason
    assert await store.expire_due(now_ms=T0 + 70_000) == []


# --------------------------------------------------------------------------- the service


class Recorder(LogActuator):
    def __init__(self) -> None:
        self.ran: list[str] = []

    async def execute(self, action, decision) -> str:
        self.ran.append(decision.decision_id)
        return "ran"


def make_service(client, prefix: str, store: ApprovalStore, act: LogActuator,
                 verifier: Verifier) -> ActuatorService:
    ex = ActionExecutor(client, {"log": act}, prefix=prefix, timeout_s=5, verifier=verifier)
    return ActuatorService(ex, store, TEST_KEYS, max_age_ms=ANY_AGE_MS)


@pytest.fixture
def service(aredis, topic_prefix, store):
    act = Recorder()
    return make_service(aredis, topic_prefix, store, act, Verifier(aredis, topic_prefix)), act


async def test_approved_decision_runs_once(service, store) -> None:
    svc, act = service
    d = decision()
    [req] = await svc.on_decision(d)
    assert isinstance(req, ApprovalEvent) and act.ran == []
    assert await svc.on_decision(d) == [req]  # redelivery re-announces, runs nothing
    ok = await store.resolve(req.approval_id, ApprovalStatus.approved, by="ann", via="cli")
    [out] = await svc.on_approval(ok)
    assert isinstance(out, ActionOutcome) and out.status is OutcomeStatus.succeeded
    assert (out.approval_id, out.approved_by) == (req.approval_id, "ann")
    assert "approved by ann via cli" in out.detail
    assert await svc.on_approval(ok) == []  # a re-sent event is settled already
    assert act.ran == [d.decision_id]
    assert await svc.on_decision(d) == []  # resolved: nothing to announce
    assert await store.unfinished(10**15) == []


async def test_forged_event_for_a_pending_request_is_ignored(service) -> None:
    svc, act = service
    [req] = await svc.on_decision(decision())
    forged = req.model_copy(update={"status": ApprovalStatus.approved, "by": "mallory"})
    assert await svc.on_approval(forged) == []
    assert act.ran == []


async def test_expired_request_defaults_to_reject_or_to_approve(service, store,
                                                                monkeypatch) -> None:
    svc, act = service
    reject, approve = decision(rule="brief"), decision(rule="brief-yes")
    for d in (reject, approve):
        await svc.on_decision(d)
    later = int(__import__("time").time() * 1000) + 1500
    # the actuator checks an approval on expiry against its own clock, not Redis's word
    monkeypatch.setattr("ia.core.clock.now_ms", lambda: later)
    out = await svc.tick(later)
    events = [r for r in out if isinstance(r, ApprovalEvent)]
    outcomes = {r.decision_id: r for r in out if isinstance(r, ActionOutcome)}
    assert {e.status for e in events} == {ApprovalStatus.expired}
    assert outcomes[reject.decision_id].status is OutcomeStatus.blocked
    assert "expired by expiry via actuator" in outcomes[reject.decision_id].detail
    assert outcomes[approve.decision_id].status is OutcomeStatus.succeeded
    assert outcomes[approve.decision_id].approved_by == "expiry"
    assert act.ran == [approve.decision_id]
    # the expiry events come back from the topic: nothing more happens
    for e in events:
        assert await svc.on_approval(e) == []


async def test_lost_answer_is_settled_by_the_periodic_pass(service, store) -> None:
    svc, act = service
    [req] = await svc.on_decision(decision())
    await store.resolve(req.approval_id, ApprovalStatus.rejected, by="bo", via="api:ops",
                        reason="no")  # ... and the event never reaches the actuator
    out = await svc.tick(int(__import__("time").time() * 1000) + 20_000)
    assert [type(r).__name__ for r in out] == ["ApprovalEvent", "ActionOutcome"]
    assert out[1].status is OutcomeStatus.blocked and "rejected by bo via api:ops: no" in \
        out[1].detail
    assert act.ran == []


# --------------------------------------------------------------------------- forged approvals
# A client with write access to Redis (or the approvals topic) but not the approval key.


def approved(req: ApprovalEvent) -> ApprovalEvent:
    """What a forger sends to the approvals topic after writing to Redis."""
    return req.model_copy(update={"status": ApprovalStatus.approved, "by": "mallory"})


def refused(out: list) -> ActionOutcome:
    [outcome] = out
    assert isinstance(outcome, ActionOutcome) and outcome.status is OutcomeStatus.rejected, out
    assert outcome.error == "rejected: unverified approval" and outcome.approved_by is None
    return outcome


async def test_approval_written_straight_to_redis_is_not_taken(service, store) -> None:
    svc, act = service
    before = _refusals()
    [req] = await svc.on_decision(decision())
    key = store.keys.approval(req.approval_id)
    await store.client.hset(key, mapping={"status": "approved", "by": "mallory", "via": "cli",
                                          "at": T0, "reason": "trust me"})
    await store.client.zadd(store.keys.approvals_unfinished, {req.approval_id: 0})
    forged = req.model_copy(update={"status": ApprovalStatus.approved, "by": "mallory"})
    assert "0 valid approval(s) of the 1 required" in refused(await svc.on_approval(forged)).detail
    assert await svc.tick(10**15) == []  # settled as refused: the periodic pass leaves it
    assert act.ran == [] and _refusals() == before + 1


async def test_forged_votes_and_tampered_terms_are_not_taken(service, store) -> None:
    svc, act = service
    # a genuine vote copied from another request does not count here
    [other] = await svc.on_decision(decision())
    await store.resolve(other.approval_id, ApprovalStatus.rejected, by="ann", via="cli",
                        reason="no")
    [req] = await svc.on_decision(decision(rule="guarded"))
    key = store.keys.approval(req.approval_id)
    copied = await store.client.hget(store.keys.approval(other.approval_id), "vote:ann")
    await store.client.hset(key, mapping={"vote:ann": copied, "status": "approved"})
    assert "0 valid" in await refusal(svc, req)
    # one genuine approval of the two required, then Redis is told it is approved
    [req] = await svc.on_decision(decision(rule="guarded"))
    key = store.keys.approval(req.approval_id)
    await store.resolve(req.approval_id, ApprovalStatus.approved, by="ann", via="cli")
    await store.client.hset(key, mapping={"required": 1, "vote:bo": "{}", "status": "approved"})
    assert "1 valid approval(s) of the 2 required" in await refusal(svc, req)
    # terms rewritten in the stored request (anyone may approve, one is enough)
    [req] = await svc.on_decision(decision(rule="guarded"))
    key = store.keys.approval(req.approval_id)
    lax = req.model_copy(update={"approvers": [], "required": 1}).model_dump_json()
    await store.client.hset(key, "request", lax)
    with pytest.raises(ApprovalError, match="fails verification"):
        await store.resolve(req.approval_id, ApprovalStatus.approved, by="dee", via="cli")
    await store.client.hset(key, mapping={"status": "approved", "by": "dee"})  # malformed
    assert await svc.on_approval(approved(req)) == []
    await store.client.hset(key, mapping={"via": "cli", "at": T0, "reason": ""})
    assert "request signature: bad_signature" in await refusal(svc, req)
    # an on_expiry: approve request marked expired before its deadline
    [req] = await svc.on_decision(decision(rule="brief-yes"))
    await store.client.hset(store.keys.approval(req.approval_id), "status", "expired")
    expired = req.model_copy(update={"status": ApprovalStatus.expired})
    assert "before its deadline" in refused(await svc.on_approval(expired)).detail
    assert act.ran == []


async def test_swapped_decision_is_not_taken(service, store) -> None:
    """A genuine approval cannot carry a different action: the stored decision is
    checked against its own signature and the one the request was signed with."""
    svc, act = service
    [req] = await svc.on_decision(decision())
    await store.resolve(req.approval_id, ApprovalStatus.approved, by="ann", via="cli")
    key = store.keys.approval(req.approval_id)
    d = decode(await store.client.hget(key, "decision"), Decision, "json")
    evil = d.model_copy(update={"action": Action(type="log", target="everything")})
    await store.client.hset(key, "decision", encode(evil, "json"))
    assert "decision signature: bad_signature" in await refusal(svc, req)
    resigned = signed(evil)  # even a genuine decision the request was not made for
    await store.client.hset(key, "decision", encode(resigned, "json"))
    assert "request signature" in await refusal(svc, req)
    assert act.ran == []


async def refusal(svc: ActuatorService, req: ApprovalEvent) -> str:
    """Why the actuator refuses the forged ``approved`` event of ``req``."""
    return refused(await svc.on_approval(approved(req))).detail


def _refusals() -> float:
    return metrics.APPROVALS_REFUSED._value.get()


class FakeSeries(Verifier):
    """The worker's feature store reduced to what verification reads (the real
    store is read in tests/test_governance.py, through the worker)."""

    def __init__(self, client, prefix: str) -> None:
        super().__init__(client, prefix)
        self.seen: dict[tuple[str, str], tuple[int, float]] = {}

    async def latest(self, entity: str, metric: str) -> tuple[int, float] | None:
        return self.seen.get((entity, metric))


async def test_verification_recovered_failed_and_compensated(aredis, topic_prefix, store
                                                             ) -> None:
    act = Recorder()
    verifier = FakeSeries(aredis, topic_prefix)
    svc = make_service(aredis, topic_prefix, store, act, verifier)

    async def sample(entity: str, n: int, value: float) -> None:
        verifier.seen[(entity, "latency_ms")] = (n, value)

    ok = decision(Mode.auto, entity="svc-ok", verify_within_s="30", verify_below="200")
    bad = decision(Mode.auto, entity="svc-bad", verify_within_s="0.2", verify_below="200",
                   compensate="log", **{"compensate.op": "undo"})
    silent = decision(Mode.auto, entity="svc-quiet", verify_within_s="0.2",
                      verify_above="1")
    for d in (ok, bad, silent):
        await sample(d.entity, 10, 900)
        [out] = await svc.on_decision(d)
        assert out.status is OutcomeStatus.succeeded
    await sample("svc-ok", 11, 120)
    await sample("svc-bad", 11, 650)
    await asyncio.sleep(0.3)
    out = await svc.tick()
    phases = [(o.decision_id, o.phase, o.status) for o in out]
    assert (ok.decision_id, OutcomePhase.verification, OutcomeStatus.succeeded) in phases
    assert (bad.decision_id, OutcomePhase.verification, OutcomeStatus.failed) in phases
    assert (bad.decision_id, OutcomePhase.compensation, OutcomeStatus.succeeded) in phases
    assert (silent.decision_id, OutcomePhase.verification, OutcomeStatus.failed) in phases
    texts = {(o.decision_id, o.phase): o.detail for o in out}
    assert "recovered to 120" in texts[(ok.decision_id, OutcomePhase.verification)]
    assert "last value 650" in texts[(bad.decision_id, OutcomePhase.verification)]
    assert "no new latency_ms sample" in texts[(silent.decision_id, OutcomePhase.verification)]
    assert act.ran.count(bad.decision_id) == 2  # the action, then the compensation
    await svc.published(out)
    assert await svc.tick() == []  # each verification is settled once


async def test_blip_between_the_action_and_its_verification_keeps_both(aredis, topic_prefix,
                                                                        store) -> None:
    flaky = FailOnce(aredis, "pipeline")  # the transaction that would schedule the verification
    verifier = FakeSeries(flaky, topic_prefix)
    act = Recorder()
    svc = make_service(flaky, topic_prefix, store, act, verifier)
    d = decision(Mode.auto, entity="svc-v", verify_within_s="0.2", verify_below="200")
    verifier.seen[(d.entity, "latency_ms")] = (10, 900)
    with pytest.raises(RedisConnectionError):
        await svc.on_decision(d)
    assert flaky.fired
    [out] = await svc.on_decision(d)  # what with_retry does next
    assert out.status is OutcomeStatus.succeeded, out
    assert act.ran == [d.decision_id]
    await asyncio.sleep(0.3)
    assert [(o.phase, o.status) for o in await svc.tick()] == [
        (OutcomePhase.verification, OutcomeStatus.failed)]


async def test_verdict_and_compensation_survive_a_crash_before_they_are_published(
        aredis, topic_prefix, store) -> None:
    act = Recorder()
    verifier = FakeSeries(aredis, topic_prefix)
    svc = make_service(aredis, topic_prefix, store, act, verifier)
    d = decision(Mode.auto, entity="svc-bad", verify_within_s="0.2", verify_below="200",
                 compensate="log", **{"compensate.op": "undo"})
    verifier.seen[(d.entity, "latency_ms")] = (10, 900)
    await svc.on_decision(d)
    await asyncio.sleep(0.3)
    lost = await svc.tick()  # ... and the actuator dies before publishing these
    assert [(o.phase, o.status) for o in lost] == [
        (OutcomePhase.verification, OutcomeStatus.failed),
        (OutcomePhase.compensation, OutcomeStatus.succeeded)]
    # another actuator process, once the first one's hold on the job has run out
    later = int(__import__("time").time() * 1000) + 3_600_000
    other_verifier = FakeSeries(aredis, topic_prefix)
    other_verifier.seen = verifier.seen
    other = make_service(aredis, topic_prefix, store, act, other_verifier)
    again = await other.tick(later)
    assert [(o.phase, o.status) for o in again] == [
        (OutcomePhase.verification, OutcomeStatus.failed),
        (OutcomePhase.compensation, OutcomeStatus.skipped_duplicate)]
    assert again[0].detail == lost[0].detail and again[0].finished_at == lost[0].finished_at
    assert "succeeded" in again[1].detail
    assert act.ran == [d.decision_id] * 2  # the action and one compensation, never two
    await other.published(again)
    assert await other.tick(later) == []


async def test_kill_switch_stops_approved_actions(aredis, topic_prefix, store) -> None:
    from ia.decisions.guards import ExecutionGuard, KillSwitch

    act = Recorder()
    ex = ActionExecutor(aredis, {"log": act}, prefix=topic_prefix, timeout_s=5,
                        guard=ExecutionGuard(aredis, topic_prefix))
    svc = ActuatorService(ex, store, TEST_KEYS, max_age_ms=ANY_AGE_MS)
    [req] = await svc.on_decision(decision())
    await KillSwitch(aredis, topic_prefix).pause("ops", "incident review")
    ok = await store.resolve(req.approval_id, ApprovalStatus.approved, by="ann", via="cli")
    [out] = await svc.on_approval(ok)
    assert out.status is OutcomeStatus.blocked and "paused by ops" in out.detail
    assert out.approval_id == req.approval_id and out.approved_by is None
    assert act.ran == []


def test_verification_spec_parsing() -> None:
    d = decision(Mode.auto, verify_within_s="5", verify_above="0.5", verify_metric="rps",
                 compensate="webhook", compensate_target="lb-1", **{"compensate.url": "u"})
    spec = spec_of(d)
    assert (spec.metric, spec.within_s, spec.above, spec.below) == ("rps", 5.0, 0.5, None)
    assert spec.compensate == Action(type="webhook", target="lb-1", params={"url": "u"})
    assert spec.recovered(0.6) and not spec.recovered(0.5)
    assert spec_of(decision(Mode.auto)) is None
    for bad in ({"verify_below": "1"}, {"verify_within_s": "5"},
                {"verify_within_s": "x", "verify_below": "1"},
                {"verify_within_s": "5", "verify_below": "nan"}):
        with pytest.raises(SpecError):
            spec_of(decision(Mode.auto, **bad))


# --------------------------------------------------------------------------- notify


def test_notify_payload_is_slack_compatible_and_escaped() -> None:
    d = decision(Mode.notify, entity="web-<!here>&<@U123>")
    body = NotifyActuator().payload(d.action, d)
    assert set(body) == {"text", "blocks"}
    assert "would run log on web-&lt;!here&gt;&amp;&lt;@U123&gt;" in body["text"]
    assert "<!here>" not in str(body) and "<@U123>" not in str(body)
    assert all(b["type"] in ("section", "context") for b in body["blocks"])
    asked = NotifyActuator().payload(decision().action, decision())
    assert "approval needed" in asked["text"] and "ia approvals approve ap-" in asked["text"]
    assert slack_escape("a<b>&") == "a&lt;b&gt;&amp;"


async def test_notify_never_shows_the_webhook_url() -> None:
    act = NotifyActuator(default_url="http://127.0.0.1:9/services/T000/B000/SECRET",
                         retries=0, timeout_s=1)
    d = decision(Mode.auto)
    with pytest.raises(ActionFailed) as err:
        await act.execute(Action(type="notify", target="x"), d)
    assert "SECRET" not in str(err.value) and "127.0.0.1" in str(err.value)
    await act.close()


# --------------------------------------------------------------------------- the API


def tokens(**named: str) -> Tokens:
    return Tokens({token_hash(t): name for name, t in named.items()})


def recorder() -> tuple[list[ApprovalEvent], Callable]:
    published: list[ApprovalEvent] = []

    async def publish(ev: ApprovalEvent) -> None:
        published.append(ev)

    return published, publish


async def test_api_authentication(store) -> None:
    published, publish = recorder()
    token = "t" * 32
    app = build_api(ApprovalDesk(store, publish), tokens(ops=token))
    ev, _ = await store.request(decision())
    url = f"/approvals/{ev.approval_id}/approve"
    async with TestClient(TestServer(app)) as client:
        assert (await client.get("/healthz")).status == 200
        for headers in ({}, {"Authorization": "Bearer " + "t" * 31},
                        {"Authorization": "Bearer " + "t" * 33},
                        {"Authorization": "Token " + token}, {"Authorization": token}):
            assert (await client.post(url, headers=headers)).status == 401
            assert (await client.get("/approvals", headers=headers)).status == 401
        assert published == [] and (await store.get(ev.approval_id))[0].status.value == \
            "requested"
        good = {"Authorization": f"Bearer {token}"}
        assert (await client.post(f"/approvals/{ev.approval_id}/reject", headers=good,
                                  json={})).status == 400  # a rejection needs a reason
        assert (await client.post(url, headers=good, data=b"{oops")).status == 400
        # the approver is the token's identity: a name in the body is refused
        r = await client.post(url, headers=good, json={"by": "alice", "reason": "fine"})
        assert r.status == 400 and "identity (ops)" in (await r.json())["error"]
        assert published == []
        r = await client.post(url, headers=good, json={"by": "ops", "reason": "fine"})
        assert r.status == 200
        body = (await r.json())["approval"]
        assert (body["status"], body["by"], body["via"]) == ("approved", "ops", "api:ops")
        assert body["approvals"] == ["ops"]
        assert [e.status.value for e in published] == ["approved"]
        assert (await client.post(url, headers=good)).status == 409
        shown = await (await client.get(f"/approvals/{ev.decision_id}", headers=good)).json()
        assert shown["decision"]["decision_id"] == ev.decision_id


async def test_api_without_tokens_refuses_everything(store) -> None:
    async def publish(ev: ApprovalEvent) -> None:  # pragma: no cover
        raise AssertionError

    async with TestClient(TestServer(build_api(ApprovalDesk(store, publish),
                                               Tokens({})))) as client:
        assert (await client.get("/approvals", headers={"Authorization": "Bearer "})).status \
            == 401


async def test_api_groups_and_the_two_person_rule(service, store) -> None:
    """Rule `guarded`: approvers oncall (ann, bo) and leads (cy), four eyes (2 of 3)."""
    svc, act = service
    published, publish = recorder()
    keys = {name: name * 20 for name in ("ann", "bo", "cy", "dee")}
    app = build_api(ApprovalDesk(store, publish), tokens(**keys))
    d = decision(rule="guarded")
    [req] = await svc.on_decision(d)
    url = f"/approvals/{req.approval_id}/approve"

    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {keys[name]}"}

    async with TestClient(TestServer(app)) as client:
        # dee has a valid token but is in neither group: 403, nothing recorded or sent
        r = await client.post(url, headers=auth("dee"), json={"reason": "me too"})
        assert r.status == 403 and "not an approver" in (await r.json())["error"]
        r = await client.post(f"/approvals/{req.approval_id}/reject", headers=auth("dee"),
                              json={"reason": "no"})
        assert r.status == 403
        assert published == [] and (await store.get(req.approval_id))[0] == req

        r = await client.post(url, headers=auth("ann"), json={"reason": "looks right"})
        assert r.status == 200
        first = (await r.json())["approval"]
        assert (first["status"], first["approvals"], first["by"]) == \
            ("requested", ["ann"], "ann")
        assert await svc.on_approval(published[-1]) == [] and act.ran == []
        # ann again: self-approval cannot be the second pair of eyes
        r = await client.post(url, headers=auth("ann"), json={"reason": "really"})
        assert r.status == 403 and "already approved" in (await r.json())["error"]
        assert len(published) == 1 and act.ran == []

        r = await client.post(url, headers=auth("cy"), json={"reason": "agreed"})
        assert r.status == 200
        done = (await r.json())["approval"]
        assert (done["status"], done["approvals"], done["by"]) == \
            ("approved", ["ann", "cy"], "cy")
    [out] = await svc.on_approval(published[-1])
    assert out.status is OutcomeStatus.succeeded and out.approved_by == "ann, cy"
    assert act.ran == [d.decision_id]


async def test_api_approving_while_paused_says_the_action_would_be_blocked(
        aredis, topic_prefix, store) -> None:
    from ia.decisions.guards import KillSwitch

    published, publish = recorder()
    switch = KillSwitch(aredis, topic_prefix, refresh_s=0)
    app = build_api(ApprovalDesk(store, publish), tokens(ann="a" * 20), paused=switch.info)
    ann = {"Authorization": f"Bearer {'a' * 20}"}
    first, _ = await store.request(decision())
    second, _ = await store.request(decision())
    await switch.pause("ops", "incident 42")
    async with TestClient(TestServer(app)) as client:
        r = await client.post(f"/approvals/{first.approval_id}/approve", headers=ann, json={})
        body = await r.json()
        assert r.status == 409 and body["paused"]["reason"] == "incident 42"
        assert "'blocked' outcome" in body["error"] and "while_paused" in body["error"]
        assert published == [] and (await store.get(first.approval_id))[0].status.value == \
            "requested"
        # said so, and asked for anyway: recorded, with the warning in the answer
        r = await client.post(f"/approvals/{first.approval_id}/approve", headers=ann,
                              json={"while_paused": True})
        body = await r.json()
        assert r.status == 200 and body["approval"]["status"] == "approved"
        assert "by ops at " in body["warning"] and "incident 42" in body["warning"]
        # a rejection while paused needs no such confirmation
        r = await client.post(f"/approvals/{second.approval_id}/reject", headers=ann,
                              json={"reason": "not now"})
        assert r.status == 200 and "warning" not in await r.json()
        await switch.resume()
    assert [ev.status.value for ev in published] == ["approved", "rejected"]


async def test_api_rate_limit_per_identity_and_address(store) -> None:
    now = [1000.0]
    limiter = RateLimiter(3, 60.0, clock=lambda: now[0])
    _, publish = recorder()
    app = build_api(ApprovalDesk(store, publish), tokens(ann="a" * 20, bo="b" * 20), limiter)
    ann, bo = ({"Authorization": f"Bearer {c * 20}"} for c in "ab")
    async with TestClient(TestServer(app)) as client:
        assert [(await client.get("/approvals", headers=ann)).status for _ in range(3)] == \
            [200] * 3
        r = await client.get("/approvals", headers=ann)
        assert r.status == 429 and r.headers["Retry-After"] == "60"
        assert (await client.get("/approvals", headers=bo)).status == 200  # per identity
        now[0] += 30
        assert (await client.get("/approvals", headers=ann)).headers["Retry-After"] == "30"
        now[0] += 30.5
        assert (await client.get("/approvals", headers=ann)).status == 200
        # guessing tokens is limited per client address
        wrong = {"Authorization": "Bearer " + "x" * 20}
        assert [(await client.get("/approvals", headers=wrong)).status
                for _ in range(4)] == [401, 401, 401, 429]
        assert (await client.get("/healthz")).status == 200  # never limited


def test_token_loading(tmp_path: Path) -> None:
    f = tmp_path / "tokens"
    f.write_text("# comment\n\nops " + "a" * 20 + "\n" + "b" * 20 + "\n"
                 f"bob {token_hash('B' * 32)}\nbob {token_hash('C' * 32).upper()[7:]}\n"
                 .replace(f"bob {token_hash('C' * 32).upper()[7:]}",
                          f"bob sha256:{token_hash('C' * 32)[7:].upper()}"))
    t = load_tokens("c" * 16, f)
    given = ["c" * 16, "a" * 20, "b" * 20, "B" * 32, "C" * 32, "nope" * 5, "a" * 19]
    assert [t.identify(g) for g in given] == ["api", "ops", "api", "bob", "bob", None, None]
    assert "a" * 20 not in repr(t) and token_hash("a" * 20) not in repr(t)
    assert not load_tokens(None, None)
    with pytest.raises(ConfigError, match="shorter"):
        load_tokens("short", None)
    for text, message in [("a b c\n", "expected"), (f"al@host {'a' * 20}\n", "not an identity"),
                          (f"a:b {'a' * 20}\n", "not an identity"),
                          ("al sha256:abc\n", "64 hex"),
                          (f"al {'a' * 20}\nbo {'a' * 20}\n", "same token")]:
        f.write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_tokens(None, f)


# --------------------------------------------------------------------------- plug-ins

BROKEN = "raise ImportError('missing dependency')\n"
IMPOSTOR = '''
class Log:
    name = "log"
    def __init__(self, ctx): pass
    async def execute(self, action, decision): return "hijacked"
'''
MISNAMED = '''
class Thing:
    name = "something-else"
    def __init__(self, ctx): pass
    async def execute(self, action, decision): return "?"
'''


@pytest.fixture
def plugin_path(tmp_path: Path, monkeypatch):
    root = tmp_path / "site"
    make_plugin(root)
    make_plugin(root, module="ia_broken_plugin", entry="broken", source=BROKEN)
    make_plugin(root, module="ia_impostor_plugin", entry="log", target="Log", source=IMPOSTOR)
    make_plugin(root, module="ia_misnamed_plugin", entry="misnamed", target="Thing",
                source=MISNAMED)
    monkeypatch.syspath_prepend(str(root))
    yield root
    for mod in ("ia_echo_plugin", "ia_broken_plugin", "ia_impostor_plugin",
                "ia_misnamed_plugin"):
        sys.modules.pop(mod, None)


async def test_plugins_are_discovered_and_checked(plugin_path, caplog) -> None:
    assert {ep.name for ep in discover()} >= {"echo", "broken", "log", "misnamed"}
    assert [ep.name for ep in discover("echo, nope")] == ["echo"]
    assert discover("none") == []
    loaded = load_plugins(ActuatorContext(timeout_s=3))
    assert set(loaded) == {"echo"}
    assert "failed to load" in caplog.text and "replace a built-in" in caplog.text
    assert "must have name" in caplog.text
    acts = build_actuators(plugins="all")
    assert acts["log"].__class__ is LogActuator  # a plug-in cannot replace a built-in
    d = decision(Mode.auto, greeting="hi")
    assert await acts["echo"].execute(d.action, d) == "echo says hi to svc-a"
    assert "echo" not in build_actuators()  # plug-ins are opt-in for the function
