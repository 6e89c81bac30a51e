"""Hostile telemetry through the real worker and actuator, with the command actuator configured.

Entities, metrics and labels carrying shell metacharacters, path traversal,
format strings and oversized values must never reach a shell or the file
system and must never crash anything: valid-but-nasty events are decided and
acted on as plain data (the command runs its declared argv, untouched), and
invalid ones go to the dead-letter topic with a reason.  Decisions crafted onto the
decisions topic run nothing, signed or not.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ia.core.clock import now_ms
from ia.core.kafka import ensure_topics
from ia.core.settings import Topics
from ia.schemas.models import Action, Decision, Mode, ModelInfo, RuleTrace
from tests.kafka_client import produce, read_topic
from tests.support import IaProcess, WebhookSink, ia_env, signed, wait_until

pytestmark = pytest.mark.integration

T0 = 1_750_000_000_000


class IaProcessIn(IaProcess):
    """An `ia` process whose working directory is ``cwd`` (so stray files would show)."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path, cwd: Path) -> None:
        super().__init__(args, env, log)
        self.cwd = cwd

    def start(self) -> IaProcessIn:
        from tests.support import _die_with_parent

        out = open(self.log, "ab")  # noqa: SIM115  # owned by the child
        self.proc = subprocess.Popen([sys.executable, "-m", "ia.cli", *self.args],
                                     env={**__import__("os").environ, **self.env},
                                     stdout=out, stderr=subprocess.STDOUT, cwd=self.cwd,
                                     preexec_fn=_die_with_parent)
        out.close()
        return self


# Records the argv it was really exec'd with (/proc/self/cmdline) and its environment.
RECORDER = ("import json, os; argv = open('/proc/self/cmdline').read().split(chr(0))[:-1]; "
            "open({out!r}, 'a').write(json.dumps({{'argv': argv, 'env': dict(os.environ)}})"
            " + chr(10))")

POLICY = """\
version: 1
defaults: {{cooldown_s: 0, max_event_age_s: false}}  # historical timestamps
commands:
  record: {argv}
rules:
  - name: hook
    match: {{kind: event, metric: hook}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    max_targets: 1000  # hostile entities have spaces: read as several targets
  - name: run-command
    match: {{kind: event}}
    action: {{type: command, target: "{{entity}}/{{metric}}", params: {{command: record}}}}
    max_targets: 1000
    blast_radius: {{group_label: service, max_concurrent: 1000}}
    rate_limit: {{max: 1000, window_s: 60, per: target}}
"""


def hostile_strings(canary: Path) -> list[str]:
    c = str(canary)
    return [
        f"; touch {c}/semicolon",
        f"$(touch {c}/dollar)",
        f"`touch {c}/backtick`",
        f"| touch {c}/pipe",
        f"&& touch {c}/and #",
        f"'\"; touch {c}/quotes; echo \"'",
        f"../../../../../../../..{c}/traversal",
        "../../../../../../etc/passwd",
        "/etc/shadow",
        "-rf --no-preserve-root /",
        "{entity}{metric}{0}{__class__.__init__.__globals__}",
        "%s%s%s%n%x",
        "${IFS}cat${IFS}/etc/passwd",
        "svc-\u202ereversed\u2066-\U0001f4a3",
        "*?[a-z]{1,2}",
        ("$(touch " + c + "/long)" + "A" * 256)[:256],  # exactly at the length limit
    ]


@pytest.fixture(scope="module")
def hostile(infra, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile")
    canary = tmp / "canary"
    canary.mkdir()
    cwd = tmp / "cwd"
    cwd.mkdir()
    out = tmp / "commands.jsonl"
    prefix = f"h{uuid.uuid4().hex[:8]}"
    with WebhookSink() as sink:
        argv = json.dumps([sys.executable, "-c", RECORDER.format(out=str(out))])
        policy = tmp / "policy.yaml"
        policy.write_text(POLICY.format(argv=argv, url=sink.url))
        env = ia_env(infra, prefix, policy)
        ensure_topics(infra.kafka, Topics(prefix).all(), 4)
        worker = IaProcessIn(["worker"], env, tmp / "worker.log", cwd).start()
        actuator = IaProcessIn(["actuate"], env, tmp / "actuator.log", cwd).start()
        try:
            yield {"prefix": prefix, "kafka": infra.kafka, "canary": canary, "cwd": cwd,
                   "out": out, "sink": sink, "worker": worker, "actuator": actuator,
                   "argv": json.loads(argv)}
        finally:
            worker.stop()
            actuator.stop()


def _records(raw: list[bytes]) -> list[dict]:
    """JSON objects among ``raw`` (the test itself puts garbage on these topics)."""
    out = []
    for value in raw:
        try:
            rec = json.loads(value)
        except ValueError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def _read(h, topic: str, pred, timeout_s: float = 90) -> list[dict]:
    raw = read_topic(h["kafka"], f"{h['prefix']}.{topic}", timeout_s=timeout_s, raw=True,
                     until=lambda rs: pred(_records(rs)))
    return _records(raw)


def test_hostile_telemetry_is_only_ever_data(hostile):
    h = hostile
    nasty = hostile_strings(h["canary"])
    events = []
    for i, s in enumerate(nasty):
        labels = {"service": s, "path": f"../../../..{h['canary']}/label-{i}", s[:128]: s}
        events.append({"entity": s, "metric": "deploy", "kind": "event", "value": 1.0,
                       "ts": T0 + i, "labels": labels, "event_id": f"hostile-{i}"})
        events.append({"entity": f"svc-{i}", "metric": s, "kind": "event", "value": 1.0,
                       "ts": T0 + i, "labels": {}, "event_id": f"hostile-metric-{i}"})
    hook = {"entity": nasty[1], "metric": "hook", "kind": "event", "value": 1.0, "ts": T0,
            "event_id": "hostile-hook"}
    oversized = [
        {"entity": "x" * 5000, "metric": "m", "value": 1, "ts": T0},
        {"entity": "e", "metric": "m" * 300, "value": 1, "ts": T0},
        {"entity": "e", "metric": "m", "value": 1, "ts": T0, "labels": {"k": "v" * 200_000}},
        {"entity": "e", "metric": "m", "value": 1, "ts": T0,
         "labels": {f"k{i}": "v" for i in range(100)}},
        {"entity": "e", "metric": "m", "value": 1, "ts": T0, "event_id": "i" * 10_000},
        {"entity": "e\x00; rm -rf /", "metric": "m", "value": 1, "ts": T0},
        {"entity": "line\nbreak", "metric": "m", "value": 1, "ts": T0},
        {"entity": "e", "metric": "m", "value": 1, "ts": T0, "labels": {"": "empty key"}},
        {"entity": "e", "metric": "m", "value": 1e400, "ts": T0},
        {"entity": "e", "metric": "m", "value": 1, "ts": -1},
        {"entity": "e", "metric": "m", "value": 1, "ts": T0, "shell": "$(reboot)"},
    ]
    bad_bytes = [json.dumps(o).encode().replace(b"1e+400", b"1e400") for o in oversized]
    bad_bytes += [b"\x00" * 1000, b"{" * 100_000, b"[" * 50_000 + b"]" * 50_000]
    produce(h["kafka"], f"{h['prefix']}.telemetry", [*events, hook], key=lambda r: r["entity"])
    produce(h["kafka"], f"{h['prefix']}.telemetry", bad_bytes)
    # garbage on the other topics the processes consume
    for topic in ("decisions", "outcomes", "feedback"):
        produce(h["kafka"], f"{h['prefix']}.{topic}", [b"\xff\xfe", b"{\"decision_id\": 1}",
                                                      b"$(touch " + str(h["canary"]).encode()
                                                      + b"/topic)"])

    want = {e["event_id"] for e in [*events, hook]}
    decided = _read(h, "decisions", lambda rs: want <= {r.get("event_id") for r in rs})
    mine = {r["event_id"]: r for r in decided if r.get("event_id") in want}
    assert set(mine) == want, h["worker"].tail()
    # a target with wildcard characters reads as "everything" to the tools that get it:
    # the target-sanity guard refuses it; every other hostile string runs, as data
    wild = {e["event_id"] for e in events if set(e["entity"] + e["metric"]) & set("*?[]")}
    assert wild  # the hostile strings include one
    ran = [e for e in events if e["event_id"] not in wild]
    for e in events:
        d = mine[e["event_id"]]
        assert d["entity"] == e["entity"] and d["metric"] == e["metric"]  # data, untouched
        assert d["action"]["type"] == "command" and len(d["action"]["target"]) <= 256
        assert d["action"]["params"] == {"command": "record"}
        if e["event_id"] in wild:
            assert d["mode"] == "blocked", d["rule_trace"]
            assert "wildcard" in json.dumps(d["rule_trace"]), d["rule_trace"]
        else:
            assert d["mode"] == "auto", d["rule_trace"]
    dead = _read(h, "telemetry.dlq", lambda rs: len(rs) >= len(bad_bytes))
    assert len(dead) == len(bad_bytes)
    assert all(d["reason"] and d["error"] for d in dead)

    ids = {mine[e["event_id"]]["decision_id"] for e in [*ran, hook]}
    outs = _read(h, "outcomes", lambda rs: ids <= {r.get("decision_id") for r in rs})
    by_id = {o["decision_id"]: o for o in outs if o.get("decision_id") in ids}
    assert set(by_id) == ids, h["actuator"].tail()
    assert {o["status"] for o in by_id.values()} == {"succeeded"}, [
        (o["target"], o["error"]) for o in by_id.values() if o["status"] != "succeeded"]

    # the command ran its declared argv, and nothing from the telemetry reached it
    runs = [json.loads(line) for line in h["out"].read_text().splitlines()]
    assert len(runs) == len(ran)
    for run in runs:
        assert run["argv"] == h["argv"], run["argv"]
        assert set(run["env"]) <= {"PATH", "IA_DECISION_ID", "LC_CTYPE"}, run["env"]
        assert re.fullmatch(r"dc-[0-9a-f]{32}", run["env"]["IA_DECISION_ID"])
        assert not any(s in json.dumps(run) for s in nasty)
    # the webhook carried the hostile entity as JSON data
    wait_until(lambda: len(h["sink"].bodies) >= 1, 30, "webhook call")
    assert h["sink"].bodies[0]["entity"] == nasty[1]

    # nothing was created on the file system, and nothing crashed
    assert list(h["canary"].iterdir()) == []
    # Faust's data directories, named after the consumer groups, are all the processes made
    assert sorted(p.name for p in h["cwd"].iterdir()) == [
        f"{h['prefix']}-actuator-data", f"{h['prefix']}-pipeline-data"]
    for path in h["cwd"].rglob("*"):
        assert not re.search(r"[;$`|&'\"{}%*?]|passwd|shadow|touch|\.\.", path.name), path
    assert h["worker"].alive() and h["actuator"].alive()
    after = {"entity": "svc-after", "metric": "deploy", "kind": "event", "value": 1.0,
             "ts": T0 + 10_000, "event_id": "after-hostile"}
    produce(h["kafka"], f"{h['prefix']}.telemetry", [after], key=lambda r: r["entity"])
    _read(h, "decisions", lambda rs: any(r.get("event_id") == "after-hostile" for r in rs))


def _crafted(n: int, action: Action, *, sign: bool) -> dict:
    d = Decision(decision_id=f"dc-evil-{n}-{uuid.uuid4().hex[:8]}", correlation_id="x",
                 event_id=f"evil-{n}", entity="evil", metric="m", value=1.0, ts=T0,
                 decided_at=now_ms(), anomaly_score=1.0, confidence=1.0,
                 model=ModelInfo(id="x", version="1"),
                 rule_trace=[RuleTrace(rule="run-command", matched=True, reason="crafted")],
                 action=action, mode=Mode.auto)
    return json.loads((signed(d) if sign else d).model_dump_json())


def _evil_actions(canary: str) -> list[Action]:
    return [
        Action(type="command", target="evil",
               params={"command": f"sh -c 'touch {canary}/argv'"}),
        Action(type="command", target="evil",
               params={"command": "record", "argv": f"touch {canary}/extra"}),
        Action(type="../../../bin/sh", target=f"$(touch {canary}/type)"),
        Action(type="webhook", target="evil", params={"url": f"file://{canary}/webhook"}),
    ]


def _outcomes_of(h, evil: list[dict]) -> list[dict]:
    produce(h["kafka"], f"{h['prefix']}.decisions", evil, key=lambda r: "evil")
    ids = {d["decision_id"] for d in evil}
    outs = _read(h, "outcomes", lambda rs: ids <= {r.get("decision_id") for r in rs})
    by_id = {o["decision_id"]: o for o in outs if o.get("decision_id") in ids}
    return [by_id[d["decision_id"]] for d in evil]


def test_unsigned_decisions_are_rejected_not_run(hostile):
    """Someone who can write to the decisions topic but has no signing key runs nothing."""
    h = hostile
    evil = [_crafted(n, a, sign=False) for n, a in enumerate(_evil_actions(str(h["canary"])))]
    outs = _outcomes_of(h, evil)
    assert [(o["status"], o["error"]) for o in outs] == [("rejected", "rejected: unsigned")] * 4
    assert list(h["canary"].iterdir()) == []
    assert h["worker"].alive() and h["actuator"].alive()


def test_signed_decisions_still_cannot_choose_what_runs(hostile):
    """Even a decision with a valid signature (a leaked key) runs nothing the actuator's
    policy does not decide: each is rejected with its reason, and no command runs."""
    h = hostile
    ran_before = _runs(h)
    actions = [*_evil_actions(str(h["canary"])),
               # the rule's own action on a target its template does not render
               Action(type="command", target="evil", params={"command": "record"})]
    evil = [_crafted(n, a, sign=True) for n, a in enumerate(actions)]
    outs = _outcomes_of(h, evil)
    assert [(o["status"], o["actuator"], o["error"]) for o in outs] == [
        ("rejected", "policy", f"rejected: {why}")
        for why in ("params", "params", "action_type", "action_type", "target")]
    assert _runs(h) == ran_before
    assert list(h["canary"].iterdir()) == []
    assert h["worker"].alive() and h["actuator"].alive()


def _runs(h) -> int:
    """How many times the declared command has run so far."""
    return len(h["out"].read_text().splitlines()) if h["out"].exists() else 0
