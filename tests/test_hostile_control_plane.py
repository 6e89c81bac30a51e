"""A hostile control plane, through the real broker and Redis: someone who can write the
decisions and feedback topics, and who even holds a leaked decision-signing key.

One worker and one actuator serve the module.  Every forgery must run nothing (no
webhook call, no command), leave confidence where it was, and be visible: an outcome
``rejected`` with its reason, and the actuator's or the worker's refusal metric.
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from ia.core.clock import now_ms
from ia.core.kafka import ensure_topics
from ia.core.keys import Keys
from ia.core.redis import sync_client
from ia.core.settings import Topics
from ia.core.signing import FEEDBACK_FIELDS
from ia.decisions.learning import MODEL_NAME
from ia.runtime.embedded import free_port
from tests.kafka_client import produce, read_topic
from tests.support import (
    TEST_KEYS,
    IaProcess,
    WebhookSink,
    ia_env,
    signed_label,
    wait_until,
)

pytestmark = pytest.mark.integration

# Appends a line to a file each time it runs: the count of commands run.
RECORDER = "import sys; open(sys.argv[1], 'a').write('ran' + chr(10))"

POLICY = """\
version: 1
defaults: {{cooldown_s: 0, max_event_age_s: false}}
commands:
  record: {argv}
rules:
  - name: hook
    match: {{kind: event, metric: hook}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    rate_limit: {{max: 1000, window_s: 60, per: target}}
  - name: careful
    match: {{kind: event, metric: careful}}
    action: {{type: command, target: "{{entity}}", params: {{command: record}}}}
    mode: needs_approval
  - name: offlist
    match: {{kind: event, metric: offlist}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{evil}"}}}}
"""
LABEL_CAP = 2


@pytest.fixture(scope="module")
def plane(infra, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-plane")
    prefix = f"hp{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    ensure_topics(infra.kafka, topics.all(), 4)
    ran = tmp / "commands.txt"
    with WebhookSink() as sink, WebhookSink() as evil:
        policy = tmp / "policy.yaml"
        argv = json.dumps([sys.executable, "-c", RECORDER, str(ran)])
        policy.write_text(POLICY.format(argv=argv, url=sink.url, evil=evil.url))
        # Only the real receiver is allowed: the offlist rule's own URL is not.
        env = ia_env(infra, prefix, policy, IA_WEBHOOK_ALLOW=sink.url.rsplit("/", 1)[0],
                     IA_FEEDBACK_MAX_PER_ENTITY=str(LABEL_CAP))
        ports = {"worker": free_port(), "actuate": free_port()}
        procs = {cmd: IaProcess([cmd], {**env, "IA_METRICS_PORT": str(port)},
                                tmp / f"{cmd}.log").start() for cmd, port in ports.items()}
        try:
            for cmd, port in ports.items():  # up, and serving its metrics
                wait_until(lambda port=port: _serving(port), 60, f"{cmd} metrics")
            yield {"kafka": infra.kafka, "redis": infra.redis, "prefix": prefix,
                   "topics": topics, "sink": sink, "evil": evil, "ran": ran,
                   "procs": procs, "ports": ports}
        finally:
            for p in procs.values():
                p.stop()


def _serving(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


def _genuine(plane, events: list[tuple[str, str]]) -> list[dict]:
    """The worker's decisions for events (entity, metric), in that order."""
    ids = [f"ev-{uuid.uuid4().hex[:12]}" for _ in events]
    produce(plane["kafka"], plane["topics"].telemetry,
            [{"entity": e, "metric": m, "kind": "event", "value": 1.0, "ts": now_ms(),
              "event_id": i} for (e, m), i in zip(events, ids, strict=True)],
            key=lambda r: r["entity"])
    found = read_topic(plane["kafka"], plane["topics"].decisions, timeout_s=90,
                       until=lambda rs: set(ids) <= {r.get("event_id") for r in rs})
    by_event = {r["event_id"]: r for r in found if r.get("event_id") in ids}
    assert set(by_event) == set(ids), plane["procs"]["worker"].tail()
    return [by_event[i] for i in ids]


def _resigned(d: dict, **changes: object) -> dict:
    """``d`` changed, with a fresh id, signed with the (leaked) decisions key."""
    out = {**d, "decision_id": f"dc-forged-{uuid.uuid4().hex}", **changes}
    return {**out, "signature": TEST_KEYS.sign(out)}


def _metric(plane, process: str, name: str) -> dict[str, float]:
    """``name``'s samples of a process's /metrics, by their ``reason`` label."""
    text = httpx.get(f"http://127.0.0.1:{plane['ports'][process]}/metrics", timeout=5).text
    return {s.labels.get("reason", ""): s.value for fam in text_string_to_metric_families(text)
            for s in fam.samples if s.name == name}


def _rise(plane, process: str, name: str, before: dict[str, float],
          reasons: dict[str, int]) -> dict[str, float]:
    """How much ``name`` rose by ``reason`` since ``before`` (a :func:`_metric` reading)."""
    now = _metric(plane, process, name)
    return {r: now.get(r, 0) - before.get(r, 0) for r in reasons}


def _commands_run(plane) -> int:
    ran: Path = plane["ran"]
    return len(ran.read_text().splitlines()) if ran.exists() else 0


def test_forged_decisions_run_nothing(plane) -> None:
    sink, evil = plane["sink"], plane["evil"]
    before = _metric(plane, "actuate", "ia_decisions_rejected_total")
    hook, careful, offlist = _genuine(plane, [("hp-a", "hook"), ("hp-b", "careful"),
                                               ("hp-c", "offlist")])
    wait_until(lambda: sink.calls[hook["decision_id"]] == 1, 60, "the genuine webhook call")
    assert careful["mode"] == "needs_approval" and offlist["mode"] == "auto"

    evil_url = {**hook["action"], "params": {"url": evil.url}}
    forged = {
        "url_changed": (_resigned(hook, action=evil_url), "params"),
        "url_changed_not_resigned": ({**hook, "decision_id": f"dc-x-{uuid.uuid4().hex}",
                                      "action": evil_url}, "bad_signature"),
        "param_added": (_resigned(hook, action={**hook["action"], "params": {
            **hook["action"]["params"], "notify_url": evil.url}}), "params"),
        "command_params": (_resigned(careful, action={**careful["action"], "params": {
            "command": "record", "argv": "rm -rf /"}}), "params"),
        "auto_without_approval": (_resigned(careful, mode="auto"), "mode"),
        "other_target": (_resigned(hook, action={**hook["action"], "target": "hp-z"}),
                         "target"),
        "rule_swapped": (_resigned(offlist, rule_trace=hook["rule_trace"]), "params"),
    }
    produce(plane["kafka"], plane["topics"].decisions,
            [d for d, _ in forged.values()] + [hook], key=lambda r: r["entity"])  # + a replay

    ids = {d["decision_id"] for d, _ in forged.values()} | {offlist["decision_id"]}

    def settled(rs: list[dict]) -> bool:
        seen = {r["decision_id"] for r in rs}
        return ids <= seen and [r["status"] for r in rs if r["decision_id"] ==
                                hook["decision_id"]] == ["succeeded", "skipped_duplicate"]

    outs = read_topic(plane["kafka"], plane["topics"].outcomes, timeout_s=60, until=settled)
    by_id = {r["decision_id"]: r for r in outs}
    for name, (d, reason) in forged.items():
        got = by_id[d["decision_id"]]
        assert (got["status"], got["error"]) == ("rejected", f"rejected: {reason}"), name
    # the worker's own decision for a rule whose URL is not on the allow-list
    refused = by_id[offlist["decision_id"]]
    assert (refused["status"], refused["actuator"], refused["error"]) == (
        "rejected", "policy", "rejected: destination")
    # the replayed genuine decision met its claim: it did not run twice
    assert [r["status"] for r in outs if r["decision_id"] == hook["decision_id"]] == [
        "succeeded", "skipped_duplicate"]
    assert sink.count == 1 and evil.count == 0
    # the approval request is the only record of the careful decision: nothing ran
    assert careful["decision_id"] not in by_id and _commands_run(plane) == 0

    after = _metric(plane, "actuate", "ia_decisions_rejected_total")
    for reason, n in {"params": 4, "mode": 1, "target": 1, "destination": 1,
                      "bad_signature": 1}.items():
        assert after.get(reason, 0) - before.get(reason, 0) == n, reason


def _counters(plane, entity: str) -> dict[str, str]:
    client = sync_client(plane["redis"], decode_responses=True)
    try:
        ctx = client.hgetall(Keys(plane["prefix"]).entity(entity))
        version = client.hget(Keys(plane["prefix"]).model(MODEL_NAME), "version")
    finally:
        client.close()
    return {k: v for k, v in ctx.items() if k.startswith("c:")} | {"model": version or "0"}


def _label(d: dict, label: str = "false_positive", **changes: object) -> dict:
    return {"decision_id": d["decision_id"], "label": label, "by": "pytest", "at": now_ms(),
            "entity": d["entity"], **changes}


def test_forged_feedback_changes_nothing(plane) -> None:
    d1, d2, d3 = _genuine(plane, [("hp-f", "careful")] * 3)
    start = _counters(plane, "hp-f")
    assert start == {"model": "0"}
    before = _metric(plane, "worker", "ia_feedback_refused_total")
    wrong_key = _label(d1)
    forged = [
        signed_label(_label(d1, decision_id=f"dc-{uuid.uuid4().hex}")),  # no such decision
        signed_label(_label(d1, entity="hp-other")),  # another entity's decision
        _label(d1),  # unsigned
        {**wrong_key, "signature": TEST_KEYS.sign(wrong_key, FEEDBACK_FIELDS)},  # wrong key
    ]
    produce(plane["kafka"], plane["topics"].feedback, forged, key=lambda r: "hp-f")
    want = {"unmatched": 1, "wrong_entity": 1, "unauthenticated": 2}

    def refused() -> dict[str, float]:
        return _rise(plane, "worker", "ia_feedback_refused_total", before, want)

    wait_until(lambda: refused() == want, 30, "the forged labels refused")
    assert _counters(plane, "hp-f") == start and _counters(plane, "hp-other") == {"model": "0"}

    # Genuine labels count up to the cap per entity and window; the next is refused.
    produce(plane["kafka"], plane["topics"].feedback,
            [signed_label(_label(d)) for d in (d1, d2, d3)], key=lambda r: "hp-f")
    want["over_cap"] = 1
    wait_until(lambda: refused() == want, 30, "the label over the cap refused")
    assert _counters(plane, "hp-f")["c:fp"] == str(LABEL_CAP)
    assert _commands_run(plane) == 0 and plane["evil"].count == 0


def test_redis_writes_without_the_password_change_nothing(plane, infra) -> None:
    """S3: someone who reaches Redis but lacks its password can neither plant a model,
    approve the careful action, pause automation nor touch an entity's confidence."""
    if not infra.redis_password_file:
        pytest.skip("an external Redis without IA_REDIS_PASSWORD_FILE")
    (careful,) = _genuine(plane, [("hp-r", "careful")])
    keys = Keys(plane["prefix"])
    start = _counters(plane, "hp-r")
    aid = "ap-" + careful["decision_id"].removeprefix("dc-")
    intruder = redis.Redis.from_url(infra.redis_url)
    try:
        for write in (lambda: intruder.hset(keys.model(MODEL_NAME), "blob", "{}"),
                      lambda: intruder.hset(keys.approval(aid), "status", "approved"),
                      lambda: intruder.zadd(keys.approvals_unfinished, {aid: 0}),
                      lambda: intruder.set(keys.kill_switch, "1"),
                      lambda: intruder.hincrby(keys.entity("hp-r"), "c:fp", 100)):
            with pytest.raises((redis.exceptions.AuthenticationError,
                                redis.exceptions.ResponseError), match=r"NOAUTH|authenticated"):
                write()
    finally:
        intruder.close()
    owner = sync_client(plane["redis"])
    try:
        assert owner.exists(keys.kill_switch) == 0
        status = owner.hget(keys.approval(aid), "status")
        assert status in (None, b"requested")  # the request, if it is open yet, still waits
    finally:
        owner.close()
    assert _counters(plane, "hp-r") == start
    assert _commands_run(plane) == 0


def test_forged_approvals_take_nothing(plane) -> None:
    """Answers written to ``ia.approvals`` by someone else (an ``approved`` for a request
    that waits, one for a request that never existed) run nothing: only Redis, written
    by the API and the CLI after they authenticate the approver, says what was approved."""
    (careful,) = _genuine(plane, [("hp-ap", "careful")])
    aid = "ap-" + careful["decision_id"].removeprefix("dc-")
    [request] = [r for r in read_topic(
        plane["kafka"], plane["topics"].approvals, timeout_s=60,
        until=lambda rs: any(r.get("approval_id") == aid for r in rs))
        if r.get("approval_id") == aid]
    assert request["status"] == "requested"
    before = _metric(plane, "actuate", "ia_approval_events_ignored_total")
    approved = {**request, "status": "approved", "by": "mallory", "via": "api", "at": now_ms()}
    unknown = {**approved, "approval_id": f"ap-{uuid.uuid4().hex}",
               "decision_id": f"dc-{uuid.uuid4().hex}"}
    produce(plane["kafka"], plane["topics"].approvals, [approved, unknown],
            key=lambda r: r["entity"])
    want = {"still_requested": 1, "unknown": 1}

    def ignored() -> dict[str, float]:
        return _rise(plane, "actuate", "ia_approval_events_ignored_total", before, want)

    wait_until(lambda: ignored() == want, 30, "the forged answers ignored")
    owner = sync_client(plane["redis"])
    try:
        assert owner.hget(Keys(plane["prefix"]).approval(aid), "status") == b"requested"
    finally:
        owner.close()
    assert _commands_run(plane) == 0 and plane["evil"].count == 0


def test_forged_outcomes_write_no_history(plane) -> None:
    """Outcomes on ``ia.outcomes`` for a decision nobody made, or naming another entity
    than the decision's, give no entity an action history or a failure."""
    (careful,) = _genuine(plane, [("hp-o", "careful")])
    start = _counters(plane, "hp-o")
    before = _metric(plane, "worker", "ia_outcomes_refused_total")
    now = now_ms()
    base = {"decision_id": careful["decision_id"], "entity": "hp-victim",
            "action_type": "command", "target": "hp-victim", "status": "failed",
            "actuator": "command", "started_at": now, "finished_at": now, "duration_ms": 1.0}
    forged = [{**base, "decision_id": f"dc-{uuid.uuid4().hex}"}, base]
    produce(plane["kafka"], plane["topics"].outcomes, forged, key=lambda r: r["entity"])
    want = {"unmatched": 1, "wrong_entity": 1}

    def refused() -> dict[str, float]:
        return _rise(plane, "worker", "ia_outcomes_refused_total", before, want)

    wait_until(lambda: refused() == want, 30, "the forged outcomes refused")
    client = sync_client(plane["redis"], decode_responses=True)
    try:
        victim = client.hgetall(Keys(plane["prefix"]).entity("hp-victim"))
    finally:
        client.close()
    assert not any(k.startswith("c:") or k == "last_action" for k in victim), victim
    assert _counters(plane, "hp-o") == start
