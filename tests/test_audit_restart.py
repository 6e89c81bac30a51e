"""The audit chain across restarts, as a user meets them (finding 11.9).

``ia down``/``ia up`` gives a fresh broker, whose offsets start at 0 again, and
the same Redis (kept in the run directory), while the log stays on disk; a Redis
that comes back empty under a running ``ia audit-writer`` takes the head, offsets
and lease away.  Both through real processes.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ia.core.kafka import ensure_topics
from ia.core.settings import Topics
from ia.runtime import embedded
from ia.schemas.models import Action, Decision, Mode, ModelInfo, RuleTrace
from ia.schemas.serde import encode
from tests.kafka_client import produce
from tests.support import IaProcess, wait_until

T0 = 1_732_700_000_000


def _decisions(first: int, n: int) -> list[bytes]:
    return [encode(Decision(
        decision_id=f"dc-{i}", correlation_id="c", event_id=f"ev-{i}", entity="svc-1",
        metric="latency_ms", value=float(i), ts=T0 + i, decided_at=T0 + i, anomaly_score=0.9,
        confidence=0.8, model=ModelInfo(id="m", version="1"),
        rule_trace=[RuleTrace(rule="r", matched=True, reason="why")],
        action=Action(type="log", target="svc-1"), mode=Mode.auto))
        for i in range(first, first + n)]


def _decided(log: Path) -> list[str]:
    if not log.exists():
        return []
    return [rec["id"] for rec in map(json.loads, log.read_text().splitlines())
            if rec["kind"] == "decision"]


def _verify(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ia.cli", "audit", "verify"],
                          env={**os.environ, **env}, capture_output=True, text=True, timeout=60)


def _env(tmp: Path, prefix: str, endpoints: dict[str, str]) -> dict[str, str]:
    """``endpoints``: the broker and Redis (with its password file) as ``ia up`` exports."""
    return {**endpoints, "IA_TOPIC_PREFIX": prefix, "IA_REDIS_PREFIX": prefix,
            "IA_AUDIT_DIR": str(tmp / "audit"), "IA_AUDIT_KEY_FILE": str(tmp / "audit.key"),
            "IA_LOG_LEVEL": "info"}


def _record(env: dict[str, str], kafka: str, prefix: str, first: int, n: int,
            log: Path, writer: IaProcess) -> None:
    produce(kafka, f"{prefix}.decisions", _decisions(first, n))
    want = {f"dc-{i}" for i in range(first, first + n)}
    wait_until(lambda: want <= set(_decided(log)) or not writer.alive(), 90,
               f"decisions {first}..{first + n - 1} in the audit log")
    assert writer.alive(), writer.tail()


@pytest.mark.integration
def test_the_audit_chain_survives_ia_down_and_ia_up(tmp_path: Path) -> None:
    prefix = "ia"
    log = tmp_path / "audit" / f"{prefix}.audit.jsonl"
    run_dir = tmp_path / "run"
    for round_, first in enumerate((0, 5)):
        # The second time: a fresh broker (offsets from 0 again: the writer must not
        # skip them as seen before) and the Redis of the first, head and all.
        info = embedded.up(run_dir)
        try:
            env = _env(tmp_path, prefix, info.env())
            if round_:
                run = _verify(env)
                assert run.returncode == 0, run.stdout + run.stderr
                assert "no audit head in Redis" not in run.stdout
            ensure_topics(info.kafka_bootstrap_servers, Topics(prefix).all(), 1)
            writer = IaProcess(["audit-writer"], env, tmp_path / f"writer{round_}.log").start()
            try:
                _record(env, info.kafka_bootstrap_servers, prefix, first, 5, log, writer)
            finally:
                writer.stop()
            run = _verify(env)
            assert run.returncode == 0, run.stdout + run.stderr
        finally:
            embedded.down(run_dir)
    assert _decided(log) == [f"dc-{i}" for i in range(10)]


@pytest.mark.integration
def test_the_audit_writer_waits_out_a_redis_restart(infra, tmp_path: Path,
                                                   topic_prefix: str) -> None:
    redis_dir = tmp_path / "redis"
    svc = embedded.start_redis(redis_dir, durable=False)  # one that loses everything
    env = _env(tmp_path, topic_prefix, {  # the password is kept across the restart
        "KAFKA_BOOTSTRAP_SERVERS": infra.kafka, "REDIS_URL": svc.address,
        "IA_REDIS_PASSWORD_FILE": str(svc.password_file)})
    log = tmp_path / "audit" / f"{topic_prefix}.audit.jsonl"
    ensure_topics(infra.kafka, Topics(topic_prefix).all(), 2)
    writer = IaProcess(["audit-writer"], env, tmp_path / "writer.log").start()
    try:
        _record(env, infra.kafka, topic_prefix, 0, 5, log, writer)
        svc.stop()
        produce(infra.kafka, f"{topic_prefix}.decisions", _decisions(5, 5))
        time.sleep(4)  # the writer's batch and lease renewals fail meanwhile
        assert writer.alive(), writer.tail()
        svc = embedded.start_redis(redis_dir, port=svc.port, durable=False)  # back, empty
        wait_until(lambda: len(_decided(log)) >= 10 or not writer.alive(), 60,
                   "the decisions sent during the outage in the audit log")
        _record(env, infra.kafka, topic_prefix, 10, 3, log, writer)
    finally:
        writer.stop()
    try:
        decided = _decided(log)
        assert sorted(decided) == sorted(f"dc-{i}" for i in range(13))  # each one once
        run = _verify(env)
        assert run.returncode == 0, run.stdout + run.stderr
        assert "retrying" in (tmp_path / "writer.log").read_text()
    finally:
        svc.stop()
