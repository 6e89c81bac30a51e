"""Human in the loop, verification and rollback, notify, plug-ins and the audit log,
through the real broker and Redis.

One worker, actuator, audit writer and approval API serve the whole module;
each test uses its own entities.  The audit tests come last: they read the
story the earlier tests left in the log, then stop the writer and tamper
with the log.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from ia.core.kafka import ensure_topics
from ia.core.operator import default_by
from ia.core.redis import sync_client
from ia.core.settings import Topics
from ia.governance.api import token_hash
from ia.runtime.embedded import free_port
from tests.kafka_client import produce, read_topic
from tests.support import IaProcess, WebhookSink, ia_env, series, wait_until

pytestmark = pytest.mark.integration

START_MS = 1_700_000_000_000
RATE_LIMIT = 12  # requests per identity and minute of the module's API
ME = default_by()  # the CLI's identity: who runs it, user@host

POLICY = """
version: 1
defaults: {{cooldown_s: 600, max_event_age_s: false}}  # historical timestamps
approvers:
  oncall: [alice, bob]
rules:
  - name: two-keys
    match: {{entity: "gov-4eyes-*", metric: latency_ms}}
    when: {{min_score: 0.8, min_confidence: 0.5, direction: up}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    mode: needs_approval
    approval: {{approvers: [oncall], four_eyes: true}}
  - name: ask-first
    match: {{entity: "gov-appr-*", metric: latency_ms}}
    when: {{min_score: 0.8, min_confidence: 0.5, direction: up}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    mode: needs_approval
  - name: ask-briefly
    match: {{entity: "gov-exp-*", metric: latency_ms}}
    when: {{min_score: 0.8, min_confidence: 0.5, direction: up}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    mode: needs_approval
    approval: {{ttl_s: 2}}
  - name: fix-and-verify
    match: {{entity: "gov-ver-*", metric: latency_ms}}
    when: {{min_score: 0.8, min_confidence: 0.5, direction: up}}
    action:
      type: webhook
      target: "{{entity}}"
      params:
        url: "{url}"
        op: scale_out
        verify_within_s: 4
        verify_below: 150
        compensate: webhook
        compensate.url: "{url}"
        compensate.op: scale_in
    mode: auto
  - name: tell-chat
    match: {{entity: "gov-note-*", metric: latency_ms}}
    when: {{min_score: 0.8, min_confidence: 0.5, direction: up}}
    action: {{type: notify, target: "{{entity}}", params: {{url: "{url}", message: "latency"}}}}
    mode: auto
  - name: only-tell
    match: {{entity: "gov-nmode-*", metric: latency_ms}}
    when: {{min_score: 0.8, min_confidence: 0.5, direction: up}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    mode: notify
  - name: secret-hook
    match: {{entity: "gov-secret-*", metric: latency_ms}}
    when: {{min_score: 0.8, min_confidence: 0.5, direction: up}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "env:GOV_HOOK_URL"}}}}
    mode: auto
  - name: plugged-in
    match: {{entity: "gov-plug-*", metric: latency_ms}}
    when: {{min_score: 0.8, min_confidence: 0.5, direction: up}}
    action: {{type: echo, target: "{{entity}}", params: {{greeting: hello}}}}
    mode: auto
"""

HOOK_SECRET = "tok-" + uuid.uuid4().hex  # planted in a webhook URL: must appear nowhere

PLUGIN = '''
class EchoActuator:
    """A plug-in actuator, found through the ia.actuators entry point group."""

    name = "echo"

    def __init__(self, ctx):
        self.timeout_s = ctx.timeout_s

    async def execute(self, action, decision):
        return f"echo says {action.params.get('greeting')} to {action.target}"
'''


def make_plugin(root: Path, module: str = "ia_echo_plugin", entry: str = "echo",
                target: str = "EchoActuator", source: str = PLUGIN) -> Path:
    """A minimal installed distribution: a module and a dist-info with an entry point."""
    root.mkdir(parents=True, exist_ok=True)
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-0.1.dist-info"
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {module}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[ia.actuators]\n{entry} = {module}:{target}\n")
    return root


@pytest.fixture(scope="module")
def gov(infra, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gov")
    prefix = "gv" + uuid.uuid4().hex[:8]
    token = uuid.uuid4().hex + uuid.uuid4().hex
    tokens = {name: uuid.uuid4().hex for name in ("alice", "bob", "mallory", "noisy")}
    token_file = tmp / "tokens"
    token_file.write_text(f"# name token\nops {token}\n" + "".join(
        f"{name} {token_hash(t)}\n" for name, t in tokens.items()))  # hashes only
    api_port, metrics_port = free_port(), free_port()
    plugins = make_plugin(tmp / "plugins")
    # One sink per URL: the action endpoint must not see what is meant for humans.
    with WebhookSink() as sink, WebhookSink() as notify_sink:
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY.format(url=sink.url))
        env = ia_env(infra, prefix, policy, IA_AUDIT_DIR=str(tmp / "audit"),
                     IA_AUDIT_KEY_FILE=str(tmp / "audit.key"),
                     IA_API_TOKEN_FILE=str(token_file), IA_NOTIFY_URL=notify_sink.url,
                     IA_API_RATE_LIMIT=str(RATE_LIMIT),
                     IA_LOG_LEVEL="info", GOV_HOOK_URL=f"{sink.url}?token={HOOK_SECRET}")
        ensure_topics(infra.kafka, Topics(prefix).all(), 4)
        procs = {
            "worker": IaProcess(["worker"], env, tmp / "worker.log"),
            "actuator": IaProcess(["actuate"], {**env, "PYTHONPATH": str(plugins)},
                                  tmp / "actuator.log"),
            "audit": IaProcess(["audit-writer", "--metrics-port", str(metrics_port),
                                "--grace", "60"], env, tmp / "audit.log"),
            "api": IaProcess(["api", "--port", str(api_port)], env, tmp / "api.log"),
        }
        for p in procs.values():
            p.start()
        try:
            yield {"prefix": prefix, "sink": sink, "notify_sink": notify_sink, "infra": infra,
                   "env": env, "tmp": tmp,
                   "token": token, "tokens": tokens, "api": f"http://127.0.0.1:{api_port}",
                   "metrics": f"http://127.0.0.1:{metrics_port}/metrics", "procs": procs,
                   "log": tmp / "audit" / f"{prefix}.audit.jsonl", "ids": {}}
        finally:
            for p in procs.values():
                p.stop()


def normal(n: int, seed: int) -> list[float]:
    rng = random.Random(seed)
    return [100.0 + rng.gauss(0, 2.0) for _ in range(n)]


def spike(gov, entity: str, seed: int) -> dict:
    """60 calm samples then one at 400: returns the decision that carries an action."""
    values = [*normal(60, seed), 400.0]
    produce(gov["infra"].kafka, f"{gov['prefix']}.telemetry",
            series(entity, "latency_ms", values, start_ms=START_MS), key=lambda r: r["entity"])
    recs = read_topic(gov["infra"].kafka, f"{gov['prefix']}.decisions", timeout_s=120,
                      until=lambda rs: any(r["entity"] == entity and r["action"] for r in rs))
    found = [r for r in recs if r["entity"] == entity and r["action"]]
    assert found, f"no action decision for {entity}\n{gov['procs']['worker'].tail()}"
    return found[0]


def after_spike(gov, entity: str, value: float) -> None:
    """One more sample, later in event time than the spike."""
    produce(gov["infra"].kafka, f"{gov['prefix']}.telemetry",
            [{"entity": entity, "metric": "latency_ms", "value": value,
              "ts": START_MS + 61 * 10_000}], key=lambda r: r["entity"])


def records(gov, topic: str, pred, n: int = 1, timeout_s: float = 60) -> list[dict]:
    recs = read_topic(gov["infra"].kafka, f"{gov['prefix']}.{topic}", timeout_s=timeout_s,
                      until=lambda rs: sum(1 for r in rs if pred(r)) >= n)
    mine = [r for r in recs if pred(r)]
    assert len(mine) >= n, (f"expected {n} on {topic}, got {mine}\n"
                            f"actuator:\n{gov['procs']['actuator'].tail()}")
    return mine


def outcomes_of(gov, decision_id: str, n: int = 1, timeout_s: float = 60) -> list[dict]:
    return records(gov, "outcomes", lambda o: o["decision_id"] == decision_id, n, timeout_s)


def approval(gov, decision_id: str, status: str, timeout_s: float = 60) -> dict:
    """The approval event of ``decision_id`` with ``status``.  A redelivered decision
    re-announces its request (byte-identical), so ``requested`` may appear twice."""
    found = records(gov, "approvals", lambda a: a["decision_id"] == decision_id and
                    a["status"] == status, 1, timeout_s)
    assert all(a == found[0] for a in found)
    return found[0]


def ia(gov, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ia.cli", *args],
                          env={**os.environ, **gov["env"]}, capture_output=True, text=True,
                          timeout=120)


def calls(gov, decision_id: str) -> list[dict]:
    return [b for b in gov["sink"].bodies if b.get("decision_id") == decision_id]


# --------------------------------------------------------------------------- approvals


def test_approved_request_runs_once_and_records_who(gov):
    d = spike(gov, "gov-appr-1", seed=1)
    assert d["mode"] == "needs_approval"
    req = approval(gov, d["decision_id"], "requested")
    assert req["rule"] == "ask-first"
    assert req["action"] == d["action"] and req["expires_at"] > req["requested_at"]
    # the request was announced to humans (IA_NOTIFY_URL), with how to answer it
    wait_until(lambda: any(req["approval_id"] in b.get("text", "")
                           for b in gov["notify_sink"].bodies), 10, "approval request announced")
    assert gov["notify_sink"].calls[f"{d['decision_id']}:announce"] >= 1
    assert gov["sink"].calls[d["decision_id"]] == 0  # nothing runs before a human says so

    listed = ia(gov, "approvals", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    assert req["approval_id"] in listed.stdout

    # the CLI records who runs it; a name of the caller's choosing is refused
    chosen = ia(gov, "approvals", "approve", req["approval_id"], "--by", "alice")
    assert chosen.returncode != 0 and "--by is not accepted" in chosen.stderr
    run = ia(gov, "approvals", "approve", req["approval_id"],
             "--reason", "checked the dashboard")
    assert run.returncode == 0, run.stderr
    assert f"approved by {ME}" in run.stdout
    [out] = outcomes_of(gov, d["decision_id"])
    assert out["status"] == "succeeded" and out["phase"] == "action"
    assert out["approved_by"] == ME and out["approval_id"] == req["approval_id"]
    wait_until(lambda: len(calls(gov, d["decision_id"])) == 1, 10, "one webhook call")
    assert gov["sink"].calls[d["decision_id"]] == 1  # under the decision's own key
    resolved = approval(gov, d["decision_id"], "approved")
    assert (resolved["by"], resolved["via"], resolved["reason"]) == \
        (ME, "cli", "checked the dashboard")
    assert resolved["at"] >= req["requested_at"]

    again = ia(gov, "approvals", "reject", req["approval_id"], "--reason", "too late")
    assert again.returncode != 0 and "already approved" in again.stderr
    gov["ids"]["approved"] = d["decision_id"]


def test_rejected_request_never_runs(gov):
    d = spike(gov, "gov-appr-2", seed=2)
    req = approval(gov, d["decision_id"], "requested")
    no_reason = ia(gov, "approvals", "reject", req["approval_id"])
    assert no_reason.returncode != 0  # a rejection needs a reason
    run = ia(gov, "approvals", "reject", d["decision_id"], "--reason", "planned load test")
    assert run.returncode == 0, run.stderr
    [out] = outcomes_of(gov, d["decision_id"])
    assert out["status"] == "blocked" and out["approved_by"] is None
    assert f"rejected by {ME} via cli: planned load test" in out["detail"]
    assert calls(gov, d["decision_id"]) == []


def test_unanswered_request_expires_as_rejected(gov):
    d = spike(gov, "gov-exp-1", seed=3)
    expired = approval(gov, d["decision_id"], "expired", timeout_s=30)
    assert expired["by"] == "expiry" and "rejected by default" in expired["reason"]
    assert expired["at"] >= expired["expires_at"]
    [out] = outcomes_of(gov, d["decision_id"])
    assert out["status"] == "blocked" and "expired" in out["detail"]
    assert calls(gov, d["decision_id"]) == []
    late = ia(gov, "approvals", "approve", d["decision_id"])
    assert late.returncode != 0 and "already expired" in late.stderr


def test_api_refuses_bad_tokens_and_changes_nothing(gov):
    d = spike(gov, "gov-appr-3", seed=4)
    req = approval(gov, d["decision_id"], "requested")
    api, aid = gov["api"], req["approval_id"]
    wait_until(lambda: _up(api), 30, "approval API")
    url = f"{api}/approvals/{aid}/approve"
    token = gov["token"]
    for headers in ({}, {"Authorization": "Bearer wrong-token-0123456789"},
                    {"Authorization": f"Bearer {token}x"}, {"Authorization": f"Basic {token}"},
                    {"Authorization": f"Bearer {token[:-1]}"}, {"Authorization": "Bearer"}):
        r = httpx.post(url, headers=headers, json={"by": "mallory"})
        assert r.status_code == 401, (headers, r.text)
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    assert httpx.get(f"{api}/approvals").status_code == 401
    assert httpx.post(f"{api}/approvals/{aid}/reject", json={"reason": "x"}).status_code == 401

    # nothing changed: still requested, no answer on the topic, nothing ran
    shown = json.loads(ia(gov, "approvals", "show", aid).stdout)
    assert shown["approval"]["status"] == "requested"
    everything = read_topic(gov["infra"].kafka, f"{gov['prefix']}.approvals", timeout_s=5,
                            until=lambda rs: False)
    assert {e["status"] for e in everything if e["approval_id"] == aid} == {"requested"}
    assert calls(gov, d["decision_id"]) == []

    good = {"Authorization": f"Bearer {token}"}
    listed = httpx.get(f"{api}/approvals", headers=good).json()["approvals"]
    assert aid in [a["approval_id"] for a in listed]
    # a name in the body cannot stand in for the token's identity
    assert httpx.post(url, headers=good, json={"by": "carol"}).status_code == 400
    r = httpx.post(url, headers=good, json={"reason": "go"})
    assert r.status_code == 200, r.text
    assert r.json()["approval"]["status"] == "approved"
    assert (r.json()["approval"]["by"], r.json()["approval"]["via"]) == ("ops", "api:ops")
    assert httpx.post(url, headers=good, json={}).status_code == 409
    assert httpx.post(f"{api}/approvals/ap-nope/approve", headers=good).status_code == 404
    [out] = outcomes_of(gov, d["decision_id"])
    assert out["status"] == "succeeded" and out["approved_by"] == "ops"


def _bearer(gov, name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {gov['tokens'][name]}"}


def test_two_person_rule_through_the_api(gov):
    """Rule two-keys: approvers oncall (alice, bob), four eyes."""
    d = spike(gov, "gov-4eyes-1", seed=11)
    req = approval(gov, d["decision_id"], "requested")
    assert (req["approvers"], req["required"]) == (["alice", "bob"], 2)
    api, aid = gov["api"], req["approval_id"]
    wait_until(lambda: _up(api), 30, "approval API")
    url = f"{api}/approvals/{aid}/approve"
    # a valid token outside the rule's group: 403, and the CLI's user is no approver either
    r = httpx.post(url, headers=_bearer(gov, "mallory"), json={"reason": "me"})
    assert r.status_code == 403 and "not an approver" in r.json()["error"]
    cli = ia(gov, "approvals", "approve", aid)
    assert cli.returncode != 0 and "not an approver" in cli.stderr
    r = httpx.post(url, headers=_bearer(gov, "alice"), json={"reason": "looks right"})
    assert r.status_code == 200 and r.json()["approval"]["approvals"] == ["alice"]
    assert r.json()["approval"]["status"] == "requested"
    # alice cannot be the second pair of eyes
    r = httpx.post(url, headers=_bearer(gov, "alice"), json={"reason": "still right"})
    assert r.status_code == 403 and "already approved" in r.json()["error"]
    partial = records(gov, "approvals", lambda a: a["approval_id"] == aid and a["approvals"])
    assert partial[0]["by"] == "alice" and partial[0]["status"] == "requested"
    assert calls(gov, d["decision_id"]) == []  # one approval of two: nothing runs
    r = httpx.post(url, headers=_bearer(gov, "bob"), json={"reason": "agreed"})
    assert r.status_code == 200 and r.json()["approval"]["status"] == "approved"
    [out] = outcomes_of(gov, d["decision_id"])
    assert out["status"] == "succeeded" and out["approved_by"] == "alice, bob"
    wait_until(lambda: len(calls(gov, d["decision_id"])) == 1, 10, "one webhook call")
    resolved = approval(gov, d["decision_id"], "approved")
    assert (resolved["by"], resolved["approvals"]) == ("bob", ["alice", "bob"])
    gov["ids"]["four_eyes"] = d["decision_id"]


def test_forged_approvals_are_not_taken(gov):
    """Someone who can write Redis and the approvals topic, but holds no approval key."""
    d = spike(gov, "gov-appr-4", seed=12)
    req = approval(gov, d["decision_id"], "requested")
    aid, topic = req["approval_id"], f"{gov['prefix']}.approvals"
    forged = {**req, "status": "approved", "by": "mallory", "via": "cli", "at": START_MS,
              "reason": "trust me", "approvals": ["mallory"]}
    produce(gov["infra"].kafka, topic, [forged], key=lambda r: r["entity"])  # topic only
    r = sync_client(gov["infra"].redis)  # someone who holds the Redis password
    key = f"{gov['prefix']}:appr:{aid}"
    wait_until(lambda: r.hget(key, "status") == b"requested", 5, "the request")
    r.hset(key, mapping={"status": "approved", "by": "mallory", "via": "cli",
                         "at": START_MS, "reason": "trust me", "voters": "mallory"})
    r.zadd(f"{gov['prefix']}:appr:unfinished", {aid: 0})  # ... and the periodic pass
    produce(gov["infra"].kafka, topic, [forged], key=lambda r: r["entity"])
    # each forged answer the actuator sees is refused (the event, or the periodic pass)
    for out in outcomes_of(gov, d["decision_id"]):
        assert out["status"] == "rejected" and out["error"] == "rejected: unverified approval"
        assert out["approved_by"] is None and "0 valid approval(s)" in out["detail"]
    assert calls(gov, d["decision_id"]) == [] and gov["sink"].calls[d["decision_id"]] == 0


def test_api_rate_limit_answers_429(gov):
    wait_until(lambda: _up(gov["api"]), 30, "approval API")
    noisy, url = _bearer(gov, "noisy"), f"{gov['api']}/approvals/ap-none"  # a cheap 404
    with httpx.Client(headers=noisy) as client:
        codes = [client.get(url).status_code for _ in range(RATE_LIMIT + 1)]
        assert codes == [404] * RATE_LIMIT + [429]
        r = client.get(url)
        assert r.status_code == 429 and 1 <= int(r.headers["Retry-After"]) <= 60
    # per identity: the others are unaffected
    assert httpx.get(url, headers=_bearer(gov, "bob")).status_code == 404


def _up(api: str) -> bool:
    try:
        return httpx.get(f"{api}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


# --------------------------------------------------------------------------- verification


def test_failed_verification_runs_the_compensation(gov):
    d = spike(gov, "gov-ver-1", seed=5)
    [first] = outcomes_of(gov, d["decision_id"])
    assert first["status"] == "succeeded" and first["phase"] == "action"
    after_spike(gov, "gov-ver-1", 390.0)  # still bad
    outs = outcomes_of(gov, d["decision_id"], n=3, timeout_s=30)
    by_phase = {o["phase"]: o for o in outs}
    assert by_phase["verification"]["status"] == "failed"
    assert "did not recover: last value 390" in by_phase["verification"]["detail"]
    comp = by_phase["compensation"]
    assert comp["status"] == "succeeded" and comp["action_type"] == "webhook"
    bodies = calls(gov, d["decision_id"])
    assert [b["action"]["params"].get("op") for b in bodies] == ["scale_out", "scale_in"]
    gov["ids"]["compensated"] = d["decision_id"]


def test_recovered_metric_passes_verification(gov):
    d = spike(gov, "gov-ver-2", seed=6)
    outcomes_of(gov, d["decision_id"])
    after_spike(gov, "gov-ver-2", 101.0)
    outs = outcomes_of(gov, d["decision_id"], n=2, timeout_s=30)
    assert [(o["phase"], o["status"]) for o in outs] == \
        [("action", "succeeded"), ("verification", "succeeded")]
    assert "recovered to 101" in outs[1]["detail"]
    assert len(calls(gov, d["decision_id"])) == 1  # no compensation


# --------------------------------------------------------------------------- notify, plug-ins


def test_notify_action_posts_a_slack_payload(gov):
    entity = "gov-note-<!channel>&"
    d = spike(gov, entity, seed=7)
    [out] = outcomes_of(gov, d["decision_id"])
    assert out["status"] == "succeeded" and out["action_type"] == "notify"
    assert gov["sink"].url not in out["detail"]  # webhook URLs are credentials
    [body] = [b for b in gov["sink"].bodies if "blocks" in b and "&amp;" in b["text"]]
    assert body["text"].startswith("latency [ia] gov-note-&lt;!channel&gt;&amp;")
    assert "<!channel>" not in json.dumps(body)
    assert [b["type"] for b in body["blocks"]] == ["section", "section", "context"]
    assert d["decision_id"] in body["blocks"][2]["elements"][0]["text"]


def test_notify_mode_tells_humans_instead_of_acting(gov):
    d = spike(gov, "gov-nmode-1", seed=8)
    assert d["mode"] == "notify"
    [out] = outcomes_of(gov, d["decision_id"])
    assert out["status"] == "blocked" and "humans notified" in out["detail"]
    assert gov["sink"].calls[d["decision_id"]] == 0  # the webhook action itself never ran
    told = [b for b in gov["notify_sink"].bodies if "blocks" in b and "gov-nmode-1" in b["text"]]
    assert told and "would run webhook on gov-nmode-1" in told[0]["text"]
    assert gov["notify_sink"].calls[f"{d['decision_id']}:notify"] >= 1
    assert not [b for b in gov["sink"].bodies if "gov-nmode-1" in json.dumps(b)]


def test_secret_destination_is_resolved_only_at_execution(gov):
    d = spike(gov, "gov-secret-1", seed=10)
    assert d["action"]["params"]["url"] == "env:GOV_HOOK_URL"  # the reference, not the secret
    [out] = outcomes_of(gov, d["decision_id"])
    assert out["status"] == "succeeded", out
    assert gov["sink"].calls[d["decision_id"]] == 1
    secret = HOOK_SECRET.encode()
    for topic in Topics(gov["prefix"]).all():
        raw = read_topic(gov["infra"].kafka, topic, until=lambda rs: False, timeout_s=2, raw=True)
        assert not [r for r in raw if secret in r], topic
    wait_until(lambda: d["decision_id"] in gov["log"].read_text(), 30, "audited")
    assert HOOK_SECRET not in gov["log"].read_text()
    assert all(HOOK_SECRET not in p.log.read_text() for p in gov["procs"].values())


def test_plugin_actuator_is_discovered_through_its_entry_point(gov):
    d = spike(gov, "gov-plug-1", seed=9)
    [out] = outcomes_of(gov, d["decision_id"])
    assert out["status"] == "succeeded", out
    assert out["detail"] == "echo says hello to gov-plug-1"


# --------------------------------------------------------------------------- audit


def test_audit_show_tells_the_full_story(gov):
    approved = gov["ids"]["approved"]
    wait_until(lambda: "[action] succeeded" in ia(gov, "audit", "show", approved).stdout, 30,
               "the approved decision's outcome in the audit log")
    text = ia(gov, "audit", "show", approved).stdout
    for part in ("event", "gov-appr-1 latency_ms = 400", "model", "score", "features",
                 "zscore", "rule trace", "ask-first", "guards", "approval", "requested at",
                 f"approved by {ME} via cli", "checked the dashboard", "[action] succeeded",
                 f"approved by {ME}"):
        assert part in text, (part, text)
    wait_until(lambda: "[action] succeeded" in ia(gov, "audit", "show",
                                                   gov["ids"]["four_eyes"]).stdout, 30,
               "the two-person approval in the audit log")
    text = ia(gov, "audit", "show", gov["ids"]["four_eyes"]).stdout
    for part in ("approvers alice, bob, 2 required", "approval 1 of 2 by alice via api:alice",
                 "approved by bob via api:bob", "approved by alice, bob"):
        assert part in text, (part, text)
    comp = ia(gov, "audit", "show", gov["ids"]["compensated"], "--json")
    kinds = [(r["kind"], r["data"].get("phase")) for r in json.loads(comp.stdout)["records"]]
    assert ("outcome", "verification") in kinds and ("outcome", "compensation") in kinds
    assert ia(gov, "audit", "show", "dc-never-decided").returncode != 0


def test_audit_completeness_is_exported_and_complete(gov):
    def scraped() -> dict[str, float]:
        try:
            text = httpx.get(gov["metrics"], timeout=2).text
        except httpx.HTTPError:
            return {}
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line.startswith("ia_audit_")}

    def settled() -> bool:
        m = scraped()
        return m.get('ia_audit_decisions{state="pending"}') == 0 and \
            m.get('ia_audit_decisions{state="complete"}', 0) > 0

    wait_until(settled, 60, "every audited decision complete")
    m = scraped()
    assert m["ia_audit_completeness_ratio"] == 1.0
    assert m['ia_audit_decisions{state="overdue"}'] == 0
    assert m['ia_audit_records_total{kind="approval"}'] >= 6
    assert m['ia_audit_records_total{kind="observations"}'] >= 1


def test_audit_verify_detects_changed_removed_and_truncated_records(gov):
    gov["procs"]["audit"].stop()  # a quiet log: nothing is appended while we tamper
    path: Path = gov["log"]
    ok = ia(gov, "audit", "verify")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "chain intact" in ok.stdout and "completeness 100.00%" in ok.stdout
    original = path.read_bytes()
    lines = original.splitlines(keepends=True)
    assert len(lines) > 10
    middle = len(lines) // 2
    tampered = {
        "one byte changed": original.replace(b'"status":"blocked"', b'"status":"blockeD"', 1),
        "one record removed": b"".join(lines[:middle] + lines[middle + 1:]),
        "tail truncated": b"".join(lines[:-1]),
        "tail cut mid-record": original[:-30],
    }
    try:
        for what, data in tampered.items():
            assert data != original
            path.write_bytes(data)
            run = ia(gov, "audit", "verify")
            assert run.returncode == 1, (what, run.stdout)
            assert "FAILED" in run.stderr, what
    finally:
        path.write_bytes(original)
    assert ia(gov, "audit", "verify").returncode == 0


def test_audit_verify_fails_when_log_and_redis_head_are_rewritten_consistently(gov):
    """S4: whoever can write the log and Redis, without the key, recomputes every hash
    (as SHA-256, all the chain had) and sets the Redis head to match: the anchor disagrees."""
    from ia.governance import hashchain

    gov["procs"]["audit"].stop()
    path: Path = gov["log"]
    original = path.read_bytes()
    anchor = path.with_name(path.name + ".head")
    kept_anchor = anchor.read_bytes()
    r = sync_client(gov["infra"].redis)  # someone who controls Redis, password and all
    head_key = f"{gov['prefix']}:audit:head"
    kept_head = r.get(head_key)
    forged, prev = [], hashchain.GENESIS
    for line in original.splitlines():
        fields = json.loads(line)
        fields.pop("v"), fields.pop("hash")
        fields["prev"] = prev
        if fields["kind"] == "outcome" and fields["data"].get("status") == "succeeded":
            fields["data"]["status"] = "failed"
        sealed, prev = hashchain.seal(fields, None)
        forged.append(sealed)
    try:
        path.write_bytes(b"".join(forged))
        r.set(head_key, f"{len(forged)}:{prev}")
        run = ia(gov, "audit", "verify")
        assert run.returncode == 1 and "FAILED" in run.stderr, run.stdout
        anchor.unlink()  # ... and with the anchor removed too, it is still not accepted
        run = ia(gov, "audit", "verify")
        assert run.returncode == 1 and "no anchor" in run.stderr, run.stdout
    finally:
        path.write_bytes(original)
        anchor.write_bytes(kept_anchor)
        r.set(head_key, kept_head)
        r.close()
    assert ia(gov, "audit", "verify").returncode == 0
