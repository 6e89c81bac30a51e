"""Actuators and the executor, against the real Redis and a real HTTP sink.

The executor's guarantees (at most once per decision id, one action per
target at a time, a timeout on every action) are checked with real Redis
claims and locks; the webhook actuator talks HTTP to a local server; the
command actuator runs real processes.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import sys
import time
import uuid
from pathlib import Path

import pytest

from ia.actuators.base import ActionFailed
from ia.actuators.builtin import (
    CommandActuator,
    LogActuator,
    WebhookActuator,
    redact_url,
    resolve_secret,
)
from ia.actuators.executor import ActionExecutor
from ia.actuators.registry import build_actuators
from ia.core.clock import now_ms
from ia.decisions.guards import ExecutionGuard, KillSwitch
from ia.schemas.models import Action, Decision, Mode, ModelInfo, OutcomePhase, OutcomeStatus
from tests.redis_faults import (
    FailOnce,
    Loss,
    RedisConnectionError,
    RedisTimeoutError,
    lossy_client,
)
from tests.support import WebhookSink

pytestmark = pytest.mark.integration

T0 = 1_732_700_000_000


def decision(action_type: str = "webhook", target: str = "svc-a", mode: Mode = Mode.auto,
             entity: str | None = None, **params: str) -> Decision:
    return Decision(
        decision_id=f"dc-{uuid.uuid4().hex}", correlation_id="corr-1", event_id="ev-1",
        entity=entity or target, metric="latency", value=900.0, ts=T0, decided_at=T0,
        anomaly_score=0.99, confidence=0.9, model=ModelInfo(id="zscore-hst", version="1.0.0"),
        action=Action(type=action_type, target=target, params=params), mode=mode)


@pytest.fixture(scope="module")
def sink_server():
    with WebhookSink() as s:  # shutting one down takes half a second: share it
        yield s


@pytest.fixture
def sink(sink_server):
    sink_server.calls.clear()
    sink_server.bodies.clear()
    sink_server.status = 200
    return sink_server


@pytest.fixture
async def webhook():
    act = WebhookActuator(retries=2, timeout_s=2.0, backoff_s=0.01)
    try:
        yield act
    finally:
        await act.close()


# --- the executor ---------------------------------------------------------------------------


async def test_decision_executes_once(aredis, topic_prefix, sink, webhook) -> None:
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    d = decision(url=sink.url)
    first = await ex.handle(d)
    assert first.status is OutcomeStatus.succeeded, first
    assert (first.decision_id, first.entity, first.target) == (d.decision_id, "svc-a", "svc-a")
    assert first.attempts == 1 and first.actuator == "webhook"
    assert "200" in first.detail and first.finished_at >= first.started_at
    # redelivered: not executed again
    second = await ex.handle(d)
    assert second.status is OutcomeStatus.skipped_duplicate
    assert "done" in second.detail
    assert sink.calls == {d.decision_id: 1}
    body = sink.bodies[0]
    assert body["decision_id"] == d.decision_id and body["entity"] == "svc-a"
    assert body["action"]["type"] == "webhook" and body["mode"] == "auto"
    assert await aredis.get(f"{topic_prefix}:act:{d.decision_id}") == b"done:succeeded"
    assert await aredis.ttl(f"{topic_prefix}:act:{d.decision_id}") > 0


async def test_concurrent_redelivery_executes_once(aredis, topic_prefix, sink, webhook) -> None:
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    other = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    d = decision(url=sink.url)
    outcomes = await asyncio.gather(*(e.handle(d) for e in (ex, other, ex, other)))
    statuses = sorted(o.status.value for o in outcomes)
    assert statuses == ["skipped_duplicate"] * 3 + ["succeeded"]
    assert sink.calls == {d.decision_id: 1}


@pytest.mark.parametrize("mode", [Mode.needs_approval, Mode.shadow, Mode.blocked])
async def test_non_auto_modes_are_not_executed(mode, aredis, topic_prefix, sink,
                                               webhook) -> None:
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    d = decision(mode=mode, url=sink.url)
    out = await ex.handle(d)
    assert out.status is OutcomeStatus.blocked
    assert mode.value in out.detail and out.attempts == 0
    assert sink.calls == {}
    # no claim was taken, so an approved copy of the decision could still run
    assert await aredis.exists(f"{topic_prefix}:act:{d.decision_id}") == 0


async def test_decision_without_action(aredis, topic_prefix) -> None:
    ex = ActionExecutor(aredis, {}, prefix=topic_prefix)
    d = decision().model_copy(update={"action": None, "mode": Mode.none})
    assert await ex.handle(d) is None


async def test_unknown_action_type_fails(aredis, topic_prefix) -> None:
    ex = ActionExecutor(aredis, {"log": LogActuator()}, prefix=topic_prefix, timeout_s=5)
    d = decision(action_type="teleport")
    out = await ex.handle(d)
    assert out.status is OutcomeStatus.failed
    assert out.error == "unknown action type 'teleport'"
    assert (await ex.handle(d)).status is OutcomeStatus.skipped_duplicate


class Recorder:
    """An actuator that takes a while and records when it ran."""

    name = "slow"

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.spans: list[tuple[str, float, float]] = []
        self.cancelled = 0

    async def execute(self, action: Action, d: Decision) -> str:
        entered = time.monotonic()
        try:
            await asyncio.sleep(self.seconds)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        self.spans.append((action.target, entered, time.monotonic()))
        return f"slept on {action.target}"


async def test_same_target_never_overlaps(aredis, topic_prefix) -> None:
    act = Recorder(0.25)
    ex = ActionExecutor(aredis, {"slow": act}, prefix=topic_prefix, timeout_s=5)
    same = [decision("slow", target="db-1") for _ in range(3)]
    other = decision("slow", target="db-2")
    started = time.monotonic()
    outcomes = await asyncio.gather(*(ex.handle(d) for d in [*same, other]))
    assert [o.status for o in outcomes] == [OutcomeStatus.succeeded] * 4
    spans = sorted((s, e) for t, s, e in act.spans if t == "db-1")
    assert len(spans) == 3
    for (_, end), (start, _) in itertools.pairwise(spans):
        assert start >= end, "two actions on db-1 overlapped"
    # a different target is not serialised behind db-1
    (db2,) = [(s, e) for t, s, e in act.spans if t == "db-2"]
    assert db2[0] - started < 0.2


async def test_slow_actuator_times_out_and_releases_lock(aredis, topic_prefix) -> None:
    act = Recorder(10.0)
    ex = ActionExecutor(aredis, {"slow": act}, prefix=topic_prefix, timeout_s=0.3)
    started = time.monotonic()
    out = await ex.handle(decision("slow", target="db-9"))
    assert out.status is OutcomeStatus.timeout
    assert out.error == "timeout" and time.monotonic() - started < 2.0
    assert act.cancelled == 1 and act.spans == []
    assert await aredis.exists(f"{topic_prefix}:lock:db-9") == 0
    act.seconds = 0.01
    assert (await ex.handle(decision("slow", target="db-9"))).status is OutcomeStatus.succeeded


async def test_actuator_bug_is_a_failed_outcome(aredis, topic_prefix) -> None:
    class Broken:
        name = "broken"

        async def execute(self, action, d):
            raise KeyError("oops")

    ex = ActionExecutor(aredis, {"broken": Broken()}, prefix=topic_prefix, timeout_s=5)
    out = await ex.handle(decision("broken"))
    assert out.status is OutcomeStatus.failed
    assert out.error == "KeyError: 'oops'"


# --- failures around the claim -------------------------------------------------------------


@pytest.mark.parametrize("where", ["lock", "admit"])
async def test_blip_before_the_action_starts_lets_the_retry_run_it(where, aredis, topic_prefix,
                                                                   sink, webhook) -> None:
    # "admit": the guard's first Redis read (the kill switch) fails; "lock": taking the
    # lock (the executor's first script call)
    flaky = FailOnce(aredis, "eval" if where == "lock" else "get")
    ex = ActionExecutor(flaky if where == "lock" else aredis, {"webhook": webhook},
                        prefix=topic_prefix, timeout_s=5,
                        guard=ExecutionGuard(flaky if where == "admit" else aredis,
                                             topic_prefix))
    d = decision(url=sink.url)
    with pytest.raises(RedisConnectionError):
        await ex.handle(d)
    assert flaky.fired and sink.calls == {}
    retried = await ex.handle(d)  # what with_retry does next
    assert retried.status is OutcomeStatus.succeeded, retried
    assert sink.calls == {d.decision_id: 1}


class FinishFailsOnce(ExecutionGuard):
    """An execution guard whose first outcome accounting hits a Redis blip."""

    failed = False

    async def finished(self, decision, status, at=None) -> None:
        if not self.failed:
            self.failed = True
            raise RedisConnectionError("injected: finished failed")
        await super().finished(decision, status, at)


async def test_blip_after_the_action_ran_reports_its_real_outcome(aredis, topic_prefix, sink,
                                                                  webhook) -> None:
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5,
                        guard=FinishFailsOnce(aredis, topic_prefix))
    d = decision(url=sink.url)
    with pytest.raises(RedisConnectionError):
        await ex.handle(d)
    retried = await ex.handle(d)
    assert retried.status is OutcomeStatus.succeeded, retried
    assert "200" in retried.detail
    assert sink.calls == {d.decision_id: 1}
    assert await aredis.get(f"{topic_prefix}:act:{d.decision_id}") == b"done:succeeded"


async def test_claim_of_an_actuator_that_died_before_starting_is_run(aredis, topic_prefix, sink,
                                                                    webhook) -> None:
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    d = decision(url=sink.url)
    # what a process killed while waiting for the target lock leaves behind
    await aredis.set(f"{topic_prefix}:act:{d.decision_id}", f"claimed:dead-1:{now_ms() - 60_000}")
    out = await ex.handle(d)
    assert out.status is OutcomeStatus.succeeded, out
    assert sink.calls == {d.decision_id: 1}


async def test_claim_of_an_actuator_that_died_mid_action_is_reported_interrupted(
        aredis, topic_prefix, sink, webhook) -> None:
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    d = decision(url=sink.url)
    started = now_ms() - 60_000
    await aredis.set(f"{topic_prefix}:act:{d.decision_id}", f"running:dead-1:{started}")
    out = await ex.handle(d)
    assert out.status is OutcomeStatus.interrupted, out
    assert out.error == "interrupted" and out.phase is OutcomePhase.action
    assert "dead-1" in out.detail and "result is unknown" in out.detail
    # every later delivery says so too: never hidden behind skipped_duplicate, never run
    again = await ex.handle(d)
    assert again.status is OutcomeStatus.interrupted and "dead-1" in again.detail
    assert sink.calls == {}


async def test_redelivery_waits_for_a_live_claim_and_reports_its_result(aredis,
                                                                       topic_prefix) -> None:
    act = Recorder(0.3)
    ex = ActionExecutor(aredis, {"slow": act}, prefix=topic_prefix, timeout_s=5)
    other = ActionExecutor(aredis, {"slow": act}, prefix=topic_prefix, timeout_s=5)
    d = decision("slow", target="db-3")
    first = asyncio.create_task(ex.handle(d))
    await asyncio.sleep(0.1)  # the first actuator is running the action
    second = await other.handle(d)
    assert second.status is OutcomeStatus.skipped_duplicate
    assert "succeeded" in second.detail, second.detail
    assert (await first).status is OutcomeStatus.succeeded
    assert len(act.spans) == 1


# --- replies lost: a command ran and the client never heard (a paused Redis) ---------------

#: The executor's steps, by what their command carries on the wire.
RAN_UNSEEN = {
    "lock": lambda packed: b":lock:" in packed and b"PX" in packed,  # taking the target lock
    "start": lambda packed: b"running:" in packed,  # the claim moving to running
    "done": lambda packed: b"done:succeeded" in packed,  # the outcome recorded
}


@pytest.mark.parametrize("retries", [0, 1], ids=["step-retried", "command-resent"])
@pytest.mark.parametrize("step", sorted(RAN_UNSEEN))
async def test_a_step_that_ran_unseen_neither_loses_nor_repeats_the_action(
        step, retries, infra, topic_prefix, sink, webhook) -> None:
    # A paused Redis runs the commands it was sent once it resumes, after the client
    # gave up on them; redis-py may have sent one again (retries=1, as ia's clients do).
    # Before: a lock nobody held until it expired (the action timed out behind it), a
    # claim stuck at running (reported interrupted, never run), "taken over" by itself
    # (skipped_duplicate, never run), or only "already handled" for an action that ran.
    loss = Loss(RAN_UNSEEN[step], ran=True)
    client = lossy_client(infra.redis_url, loss, retries=retries,
                          password_file=infra.redis_password_file)
    try:
        ex = ActionExecutor(client, {"webhook": webhook}, prefix=topic_prefix, timeout_s=2)
        d = decision(url=sink.url)
        try:
            out = await ex.handle(d)
        except RedisTimeoutError:
            out = await ex.handle(d)  # what with_retry does next
        assert loss.fired
        assert out.status is OutcomeStatus.succeeded and "200" in out.detail, out
        assert sink.calls == {d.decision_id: 1}
        again = await ex.handle(d)  # a later redelivery
        assert again.status is OutcomeStatus.skipped_duplicate and "succeeded" in again.detail
        assert sink.calls == {d.decision_id: 1}
    finally:
        await client.aclose()


async def test_a_lost_lock_release_does_not_hold_up_the_target(infra, topic_prefix, sink,
                                                               webhook) -> None:
    # Before: the lock stayed until it expired (action timeout + 5 s), and the next
    # action on the target timed out waiting for it.
    loss = Loss(lambda packed: b":lock:" in packed and b"PX" not in packed, ran=False)
    client = lossy_client(infra.redis_url, loss, retries=0,
                          password_file=infra.redis_password_file)
    try:
        ex = ActionExecutor(client, {"webhook": webhook}, prefix=topic_prefix, timeout_s=1)
        first, second = decision(url=sink.url), decision(url=sink.url)  # one target
        assert (await ex.handle(first)).status is OutcomeStatus.succeeded
        assert loss.fired
        out = await ex.handle(second)
        assert out.status is OutcomeStatus.succeeded, out
        assert sink.calls == {first.decision_id: 1, second.decision_id: 1}
        assert await client.exists(f"{topic_prefix}:lock:svc-a") == 0
    finally:
        await client.aclose()


# --- execution-time guards ------------------------------------------------------------------


async def test_pause_while_queued_behind_the_target_stops_the_action(aredis,
                                                                    topic_prefix) -> None:
    act = Recorder(0.4)
    ex = ActionExecutor(aredis, {"slow": act}, prefix=topic_prefix, timeout_s=5,
                        guard=ExecutionGuard(aredis, topic_prefix))
    running, queued = decision("slow", target="db-5"), decision("slow", target="db-5")
    first = asyncio.create_task(ex.handle(running))
    await asyncio.sleep(0.05)
    second = asyncio.create_task(ex.handle(queued))  # waits for the target lock
    await asyncio.sleep(0.05)
    await KillSwitch(aredis, topic_prefix).pause("ops", "incident review")
    done, stopped = await asyncio.gather(first, second)
    assert done.status is OutcomeStatus.succeeded
    assert stopped.status is OutcomeStatus.blocked and "paused by ops" in stopped.detail
    assert len(act.spans) == 1


# --- compensation ---------------------------------------------------------------------------


async def test_compensation_has_its_own_idempotency_key_and_says_so(aredis, topic_prefix, sink,
                                                                    webhook) -> None:
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    d = decision(url=sink.url)
    assert (await ex.handle(d)).status is OutcomeStatus.succeeded
    # the same action type, target and URL: only the key and the body tell them apart
    comp = await ex.compensate(d, Action(type="webhook", target="svc-a",
                                         params={"url": sink.url}))
    assert comp.status is OutcomeStatus.succeeded and comp.phase is OutcomePhase.compensation
    assert sink.calls == {d.decision_id: 1, f"{d.decision_id}:compensation": 1}
    action_body, comp_body = sink.bodies
    assert "phase" not in action_body
    assert comp_body["phase"] == "compensation" and comp_body["decision_id"] == d.decision_id
    assert comp_body["compensates"] == action_body["action"]


# --- webhook --------------------------------------------------------------------------------


async def test_webhook_5xx_is_retried_then_fails(aredis, topic_prefix, sink, webhook) -> None:
    sink.status = 500
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    d = decision(url=sink.url)
    out = await ex.handle(d)
    assert out.status is OutcomeStatus.failed
    assert out.attempts == webhook.retries + 1 == 3
    assert sink.calls == {d.decision_id: 3}  # every retry carries the same key
    assert "after 3 attempts" in out.error and "500" in out.error


async def test_webhook_429_is_retried_and_can_recover(aredis, topic_prefix, sink) -> None:
    sink.status = 429
    webhook = WebhookActuator(retries=2, timeout_s=2.0, backoff_s=0.3)
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    d = decision(url=sink.url)
    try:
        task = asyncio.create_task(ex.handle(d))
        deadline = time.monotonic() + 2.0
        while not sink.calls and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        sink.status = 200  # the receiver recovers during the first backoff
        out = await task
    finally:
        await webhook.close()
    assert out.status is OutcomeStatus.succeeded
    assert out.attempts == 1  # the executor counts a success as one attempt
    assert sink.calls == {d.decision_id: 2}


async def test_webhook_4xx_is_final(aredis, topic_prefix, sink, webhook) -> None:
    sink.status = 400
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    d = decision(url=sink.url)
    out = await ex.handle(d)
    assert out.status is OutcomeStatus.failed
    assert out.attempts == 1
    assert sink.calls == {d.decision_id: 1}
    assert "400" in out.error


async def test_webhook_unreachable_and_missing_url(aredis, topic_prefix, webhook) -> None:
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    out = await ex.handle(decision(url="http://127.0.0.1:9/nothing-listens"))
    assert out.status is OutcomeStatus.failed and out.attempts == 3
    out = await ex.handle(decision())
    assert out.status is OutcomeStatus.failed and out.attempts == 0
    assert "no url" in out.error


async def test_registry_offers_builtin_actuators(sink) -> None:
    acts = build_actuators(commands={"hi": ["true"]}, webhook_url=sink.url,
                           simulator_url="http://127.0.0.1:1/", retries=1, timeout_s=3)
    assert set(acts) == {"log", "webhook", "notify", "simulator", "command"}
    assert all(a.name == n for n, a in acts.items())
    assert acts["simulator"].url_for(Action(type="simulator", target="x")) \
        == "http://127.0.0.1:1/actions"
    d = decision()
    detail = await acts["webhook"].execute(d.action, d)
    # the path of a webhook URL is where its token lives: outcomes show only the host
    assert detail == f"POST {sink.url.removesuffix('/hook')}/... -> 200 after 1 attempt(s)"
    await acts["webhook"].close()
    with pytest.raises(ActionFailed, match="IA_SIMULATOR_URL"):
        await build_actuators()["simulator"].execute(d.action, d)


SECRET = "tok-" + uuid.uuid4().hex


@pytest.mark.parametrize("status", [200, 404, 503])
async def test_webhook_outcomes_never_show_the_secret_in_its_url(status, aredis, topic_prefix,
                                                                 sink, webhook) -> None:
    sink.status = status
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    base = sink.url.removesuffix("/hook")
    url = f"http://user:{SECRET}@{base.removeprefix('http://')}/hook/{SECRET}?token={SECRET}"
    out = await ex.handle(decision(url=url))
    assert sink.calls and SECRET not in out.model_dump_json()
    assert f"POST {base}/..." in (out.detail if status == 200 else out.error or "")


async def test_unreachable_webhook_failure_does_not_show_the_secret(aredis, topic_prefix,
                                                                    webhook) -> None:
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    out = await ex.handle(decision(url=f"http://127.0.0.1:9/hooks/{SECRET}"))
    assert out.status is OutcomeStatus.failed and "ConnectError" in (out.error or "")
    assert SECRET not in out.model_dump_json()


async def test_secret_references_are_resolved_only_by_the_actuator(aredis, topic_prefix, sink,
                                                                   webhook, tmp_path,
                                                                   monkeypatch) -> None:
    secret_file = tmp_path / "hook"
    secret_file.write_text(f"{sink.url}?token={SECRET}\n")
    monkeypatch.setenv("IA_TEST_HOOK", f"{sink.url}/{SECRET}")
    ex = ActionExecutor(aredis, {"webhook": webhook}, prefix=topic_prefix, timeout_s=5)
    for ref in (f"file:{secret_file}", "env:IA_TEST_HOOK"):
        d = decision(url=ref)
        out = await ex.handle(d)
        assert out.status is OutcomeStatus.succeeded, out
        assert sink.calls[d.decision_id] == 1 and SECRET not in out.model_dump_json()
    missing = await ex.handle(decision(url="env:IA_TEST_NOT_SET"))
    assert missing.status is OutcomeStatus.failed and "env:IA_TEST_NOT_SET" in (missing.error or "")


def test_redaction_and_resolution_rules(monkeypatch) -> None:
    assert redact_url("https://hooks.slack.com/services/T/B/x") == "https://hooks.slack.com/..."
    assert redact_url("https://u:p@h.example:8443") == "https://h.example:8443/..."
    assert redact_url("https://h.example/") == "https://h.example"
    assert redact_url("not a url") == "<invalid url>"
    monkeypatch.setenv("IA_TEST_EMPTY", "")
    assert resolve_secret("https://h.example/x") == "https://h.example/x"
    with pytest.raises(ActionFailed, match="not set"):
        resolve_secret("env:IA_TEST_EMPTY")
    with pytest.raises(ActionFailed, match="cannot be read"):
        resolve_secret("file:/nonexistent/ia-secret")


# --- command --------------------------------------------------------------------------------


PY = "python3"


async def test_command_runs_argv_with_decision_id(aredis, topic_prefix) -> None:
    cmd = CommandActuator({"whoami": [PY, "-c",
                                      "import os; print(os.environ.get('IA_DECISION_ID'))"]})
    ex = ActionExecutor(aredis, {"command": cmd}, prefix=topic_prefix, timeout_s=10)
    d = decision("command", command="whoami")
    out = await ex.handle(d)
    assert out.status is OutcomeStatus.succeeded, out.error
    assert out.detail == f"{PY} exited 0: {d.decision_id}"


@pytest.mark.parametrize("payload", [
    "; touch {f}", "$(touch {f})", "`touch {f}`", "x && touch {f} #", "| touch {f}",
    "'; touch {f}; echo '", "\"; touch {f}; echo \""])
async def test_command_never_goes_through_a_shell(payload, aredis, topic_prefix,
                                                  tmp_path: Path) -> None:
    pwned = [Path(f"/tmp/pwned-{uuid.uuid4().hex[:8]}"), tmp_path / "pwned"]
    argv = [PY, "-c", "import os, sys; print(sorted(os.environ)); print(sys.argv[1:])",
            "{entity}", "{target}"]
    cmd = CommandActuator({"probe": argv})
    ex = ActionExecutor(aredis, {"command": cmd}, prefix=topic_prefix, timeout_s=10)
    try:
        for f in pwned:
            evil = "svc-a" + payload.format(f=f)
            out = await ex.handle(decision("command", target=evil, entity=evil,
                                           command="probe"))
            assert out.status is OutcomeStatus.succeeded, out.error
            # the argv is the policy's, verbatim; no telemetry string reaches the process
            assert out.detail.endswith("['{entity}', '{target}']")
            assert "IA_DECISION_ID" in out.detail
            assert evil not in out.detail and "touch" not in out.detail
            assert not f.exists()
    finally:
        for f in pwned:
            f.unlink(missing_ok=True)


async def test_undeclared_command_fails(aredis, topic_prefix) -> None:
    cmd = CommandActuator({"ok": ["true"]})
    ex = ActionExecutor(aredis, {"command": cmd}, prefix=topic_prefix, timeout_s=5)
    for params in ({"command": "rm-rf"}, {}):
        out = await ex.handle(decision("command", **params))
        assert out.status is OutcomeStatus.failed and out.attempts == 0
        assert "not declared in the policy" in out.error


async def test_command_non_zero_exit_reports_tail(aredis, topic_prefix) -> None:
    script = "import sys; print('HEAD' + 'x' * 3000); print('boom: disk full'); sys.exit(3)"
    cmd = CommandActuator({"fail": [PY, "-c", script]})
    ex = ActionExecutor(aredis, {"command": cmd}, prefix=topic_prefix, timeout_s=10)
    out = await ex.handle(decision("command", command="fail"))
    assert out.status is OutcomeStatus.failed
    assert out.error.startswith(f"{PY} exited with 3: ")
    assert out.error.endswith("boom: disk full")
    assert "HEAD" not in out.error and len(out.error) < 600


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def sleeper(pidfile: Path) -> list[str]:
    return [PY, "-c", f"import os, time; open({str(pidfile)!r}, 'w').write(str(os.getpid()));"
                      " time.sleep(60)"]


async def wait_for_pid(pidfile: Path) -> int:
    for _ in range(1000):  # a loaded machine can take seconds to start Python
        if pidfile.exists() and pidfile.read_text():
            return int(pidfile.read_text())
        await asyncio.sleep(0.01)
    raise AssertionError("the command never started")


@pytest.mark.parametrize("who", ["command", "executor"])
async def test_timeout_kills_the_process(who, aredis, topic_prefix, tmp_path: Path) -> None:
    """Whichever timeout fires first, the command's or the executor's, the process dies."""
    pidfile = tmp_path / "pid"
    cmd_timeout, ex_timeout = (3.0, 30.0) if who == "command" else (30.0, 3.0)
    cmd = CommandActuator({"hang": sleeper(pidfile)}, timeout_s=cmd_timeout)
    ex = ActionExecutor(aredis, {"command": cmd}, prefix=topic_prefix, timeout_s=ex_timeout)
    started = time.monotonic()
    task = asyncio.create_task(ex.handle(decision("command", command="hang")))
    pid = await wait_for_pid(pidfile)
    assert pid_alive(pid)
    out = await task
    assert time.monotonic() - started < 20.0
    try:
        if who == "command":
            assert out.status is OutcomeStatus.failed
            assert out.error == f"{PY} timed out after 3s"
        else:
            assert out.status is OutcomeStatus.timeout
        assert not pid_alive(pid), "the timed-out command is still running"
    finally:
        if pid_alive(pid):
            os.kill(pid, 9)


def test_python3_is_available() -> None:
    # the command tests run "python3" from PATH, as a policy would
    assert any(Path(p, PY).exists() for p in os.environ.get("PATH", "").split(os.pathsep)), \
        sys.executable
