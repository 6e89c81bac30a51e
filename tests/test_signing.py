"""Signed action decisions: the worker signs, the actuator executes only what it can verify.

Unit tests of :mod:`ia.core.signing` and of the actuator's check, then forgeries put
on the real decisions topic next to a running worker and actuator.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from ia.actuators.service import ActuatorService
from ia.core import metrics
from ia.core.clock import now_ms
from ia.core.errors import ConfigError
from ia.core.kafka import ensure_topics
from ia.core.settings import Settings, Topics
from ia.core.signing import (
    KeyRing,
    Rejection,
    load_keys,
    parse_keys,
    signing_keys,
    write_key_file,
)
from ia.schemas.models import Action, Decision, Mode, ModelInfo, OutcomeStatus
from tests.kafka_client import produce, read_topic
from tests.support import IaProcess, WebhookSink, ia_env, wait_until

MAX_AGE_MS = 60_000


def _ring(key_id: str = "k1") -> KeyRing:
    return KeyRing({key_id: secrets.token_bytes(32)}, key_id)


def _decision(**changes: object) -> dict:
    d = Decision(decision_id="dc-1", correlation_id="c", event_id="e", entity="svc",
                 metric="latency_ms", value=900.0, ts=now_ms(), decided_at=now_ms(),
                 anomaly_score=0.9, confidence=0.8, model=ModelInfo(id="m", version="1"),
                 action=Action(type="webhook", target="svc", params={"url": "http://ok/"}),
                 mode=Mode.auto, policy_version="p1")
    return {**d.model_dump(mode="json"), **changes}


def _signed_by(keys: KeyRing, **changes: object) -> dict:
    d = _decision(**changes)
    return {**d, "signature": keys.sign(d)}


def _check(keys: KeyRing, d: dict) -> Rejection | None:
    return keys.check(d, now_ms(), MAX_AGE_MS)


# --------------------------------------------------------------------------- sign, verify


def test_a_signed_decision_verifies_and_names_its_key() -> None:
    keys = _ring("2026-12")
    d = _signed_by(keys)
    assert d["signature"].startswith("2026-12:") and len(d["signature"]) == 8 + 64
    assert _check(keys, d) is None


@pytest.mark.parametrize("field, value", [
    ("action", {"type": "webhook", "target": "svc", "params": {"url": "http://evil/"}}),
    ("action", {"type": "command", "target": "svc", "params": {"url": "http://ok/"}}),
    ("entity", "other"), ("mode", "needs_approval"), ("decision_id", "dc-2"),
    ("decided_at", 1), ("policy_version", "p2"),
    # the trace names the rule the actuator re-authorises against and whose guards apply
    ("rule_trace", [{"rule": "other-rule", "matched": True, "reason": "forged"}]),
])
def test_changing_what_the_decision_does_breaks_the_signature(field: str, value: object) -> None:
    keys = _ring()
    d = _signed_by(keys)
    assert _check(keys, {**d, field: value}) is Rejection.bad_signature


def test_what_humans_read_is_not_signed() -> None:
    keys = _ring()
    d = _signed_by(keys)
    assert _check(keys, {**d, "confidence": 0.1, "features": {"x": 1.0}}) is None


def test_every_refusal_has_its_reason() -> None:
    keys = _ring()
    other = _ring()
    stranger = _ring("k9")
    assert _check(keys, _decision()) is Rejection.unsigned
    assert _check(keys, {**_decision(), "signature": "no-colon"}) is Rejection.malformed
    assert _check(keys, _signed_by(other)) is Rejection.bad_signature
    assert _check(keys, _signed_by(stranger)) is Rejection.unknown_key
    old = now_ms() - MAX_AGE_MS - 1
    assert _check(keys, _signed_by(keys, decided_at=old)) is Rejection.too_old


def test_rotation_first_key_signs_every_key_verifies(tmp_path: Path) -> None:
    new, old = secrets.token_hex(32), secrets.token_hex(32)
    old_ring = parse_keys(f"old {old}\n", "old")
    ring = parse_keys(f"# rotated\nnew {new}\n\nold {old}\n", "keys")
    assert ring.signing_id == "new"
    assert _check(ring, _signed_by(old_ring)) is None
    assert _signed_by(ring)["signature"].startswith("new:")


@pytest.mark.parametrize("text, why", [
    ("", "no signing key"), ("k1\n", "expected"), ("k1 zz\n", "not hex"),
    ("k1 abcd\n", "shorter"), (f"a:b {'00' * 32}\n", "expected"),
])
def test_a_bad_key_file_is_a_config_error_without_the_secret(text: str, why: str) -> None:
    with pytest.raises(ConfigError, match=why) as err:
        parse_keys(text, "keys")
    assert "abcd" not in str(err.value)


def test_generated_key_file_is_private_and_kept(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "run" / "signing.key")
    assert path.stat().st_mode & 0o777 == 0o600
    first = path.read_text()
    assert write_key_file(path).read_text() == first
    ring = load_keys(path)
    assert ring.signing_id == "k1" and first.split()[1] not in repr(ring)


def test_keys_come_from_the_settings(tmp_path: Path) -> None:
    path = write_key_file(tmp_path / "signing.key")
    assert signing_keys(Settings(_env={}).signing) is None
    ring = signing_keys(Settings(_env={"IA_SIGNING_KEY_FILE": str(path)}).signing)
    assert ring is not None and ring.signing_id == "k1"
    with pytest.raises(ConfigError, match="signing key file"):
        load_keys(tmp_path / "missing")


# --------------------------------------------------------------------------- the actuator


class NeverRuns:
    timeout_s = 1.0
    verifier = None

    async def handle(self, d: Decision) -> None:
        raise AssertionError(f"{d.decision_id} was executed")


async def test_the_actuator_rejects_before_anything_runs() -> None:
    keys = _ring()
    svc = ActuatorService(NeverRuns(), None, keys, max_age_ms=MAX_AGE_MS)  # type: ignore[arg-type]
    before = metrics.DECISIONS_REJECTED.labels("bad_signature")._value.get()
    forged = Decision.model_validate(_signed_by(_ring()))
    [out] = await svc.on_decision(forged)
    assert out.status is OutcomeStatus.rejected and out.error == "rejected: bad_signature"
    assert (out.decision_id, out.action_type, out.target) == ("dc-1", "webhook", "svc")
    assert metrics.DECISIONS_REJECTED.labels("bad_signature")._value.get() == before + 1
    approval = Decision.model_validate({**_decision(), "mode": "needs_approval"})
    [out] = await svc.on_decision(approval)  # an unsigned approval request is not stored
    assert out.error == "rejected: unsigned"


# --------------------------------------------------------------------------- through the broker

POLICY = """\
version: 1
defaults: {{cooldown_s: 0, max_event_age_s: false}}
rules:
  - name: hook
    match: {{kind: event, metric: hook}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    rate_limit: {{max: 1000, window_s: 60, per: target}}
"""


@pytest.mark.integration
def test_forged_decisions_never_reach_the_webhook(infra, tmp_path: Path) -> None:
    prefix = f"s{uuid.uuid4().hex[:8]}"
    topics = Topics(prefix)
    ensure_topics(infra.kafka, topics.all(), 4)
    with WebhookSink() as sink, WebhookSink() as evil:
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(url=sink.url))
        env = ia_env(infra, prefix, policy)
        procs = [IaProcess([cmd], env, tmp_path / f"{cmd}.log").start()
                 for cmd in ("worker", "actuate")]
        try:
            _forge_and_check(infra.kafka, topics, sink, evil)
        finally:
            for p in procs:
                p.stop()


def _forge_and_check(kafka: str, topics: Topics, sink: WebhookSink,
                     evil: WebhookSink) -> None:
    entity = "svc-signed"
    produce(kafka, topics.telemetry, [{"entity": entity, "metric": "hook", "kind": "event",
                                       "value": 1.0, "ts": now_ms(), "event_id": "genuine"}],
            key=lambda r: r["entity"])
    [genuine] = [d for d in read_topic(kafka, topics.decisions, timeout_s=90, until=lambda rs: any(
        r.get("event_id") == "genuine" for r in rs)) if d.get("event_id") == "genuine"]
    wait_until(lambda: len(sink.bodies) == 1, 60, "the genuine webhook call")

    def fresh(**changes: object) -> dict:
        return {**genuine, "decision_id": f"dc-forged-{uuid.uuid4().hex}", **changes}

    stranger = _ring()
    unsigned = fresh(signature=None)
    wrong_key = fresh()
    wrong_key["signature"] = stranger.sign(wrong_key)
    unknown = fresh()
    unknown["signature"] = _ring("k9").sign(unknown)
    redirected = {**genuine, "action": {**genuine["action"], "params": {"url": evil.url}}}
    last = fresh(signature=None)  # after everything else in the partition
    forged = [unsigned, wrong_key, unknown, redirected, genuine, last]
    produce(kafka, topics.decisions, forged, key=lambda r: entity)

    def refused(rs: list[dict]) -> list[tuple[str, str]]:
        return [(r["decision_id"], r["error"]) for r in rs if r.get("status") == "rejected"]

    outs = read_topic(kafka, topics.outcomes, timeout_s=60,
                      until=lambda rs: last["decision_id"] in dict(refused(rs)))
    assert sorted(refused(outs)) == sorted([
        (unsigned["decision_id"], "rejected: unsigned"),
        (wrong_key["decision_id"], "rejected: bad_signature"),
        (unknown["decision_id"], "rejected: unknown_key"),
        (genuine["decision_id"], "rejected: bad_signature"),  # the redirected one
        (last["decision_id"], "rejected: unsigned")])
    # the replayed genuine record met its claim: run once, never again
    assert [r["status"] for r in outs if r["decision_id"] == genuine["decision_id"]
            and r["status"] != "rejected"] in (["succeeded"], ["succeeded", "skipped_duplicate"])
    assert len(sink.bodies) == 1 and evil.bodies == []
    assert json.dumps(genuine["action"]["params"]) == json.dumps({"url": sink.url})


def test_the_actuator_refuses_to_start_without_a_key(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "IA_SIGNING_KEY_FILE"}
    env |= {"KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "REDIS_URL": "redis://127.0.0.1:9/0"}
    out = subprocess.run([sys.executable, "-m", "ia.cli", "actuate"], capture_output=True,
                         text=True, env=env, timeout=120, cwd=tmp_path)
    assert out.returncode == 2
    assert out.stderr.strip().splitlines()[-1].startswith(
        "Error: no signing key: set IA_SIGNING_KEY_FILE")
