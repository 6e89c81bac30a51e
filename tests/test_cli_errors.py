"""Every situation a newcomer hits first ends in one clear line and an exit code,
never in a traceback (issue: a newcomer's first hour)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from ia.core.signing import write_key_file

DOWN_KAFKA = "127.0.0.1:9"  # the discard port: nothing listens there
DOWN_REDIS = "redis://127.0.0.1:9/0"


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def run_ia(args: list[str], tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {k: v for k, v in os.environ.items()
                if not k.startswith("IA_") and k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")}
    full_env.update({"KAFKA_BOOTSTRAP_SERVERS": DOWN_KAFKA, "REDIS_URL": DOWN_REDIS, **env})
    return subprocess.run([sys.executable, "-m", "ia.cli", *args], capture_output=True,
                          text=True, env=full_env, cwd=tmp_path, timeout=120)


def assert_one_line_error(out: subprocess.CompletedProcess, code: int, *words: str) -> None:
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("Error: "), out.stderr[-2000:]
    assert out.returncode == code, (out.returncode, out.stderr[-500:])
    for word in words:
        assert word in lines[-1], lines[-1]


@pytest.mark.parametrize("args", [["pause"], ["resume"], ["approvals", "list"],
                                  ["features", "show", "svc-1"]])
def test_redis_stopped(args: list[str], tmp_path: Path) -> None:
    assert_one_line_error(run_ia(args, tmp_path), 3, "cannot reach Redis", "REDIS_URL")


def test_worker_with_the_broker_stopped(tmp_path: Path) -> None:
    out = run_ia(["worker"], tmp_path)
    assert_one_line_error(out, 3, "cannot reach Kafka at 127.0.0.1:9", "KAFKA_BOOTSTRAP_SERVERS")
    assert len(out.stderr.splitlines()) < 10, "librdkafka's connection noise is summarised"


@pytest.mark.parametrize("command", ["worker", "actuate"])
def test_metrics_port_in_use(command: str, busy_port: int, tmp_path: Path) -> None:
    out = run_ia([command, "--metrics-port", str(busy_port)], tmp_path)
    assert_one_line_error(out, 3, "address already in use")


def test_missing_token_file(tmp_path: Path) -> None:
    out = run_ia(["api"], tmp_path, IA_API_TOKEN_FILE=str(tmp_path / "nonexistent"))
    assert_one_line_error(out, 3, "no such file", "nonexistent")


def test_api_port_in_use(busy_port: int, tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("ops " + "t" * 40 + "\n")
    out = run_ia(["api", "--port", str(busy_port)], tmp_path, IA_API_TOKEN_FILE=str(tokens),
                 IA_APPROVAL_KEY_FILE=str(write_key_file(tmp_path / "approval.key")))
    assert_one_line_error(out, 3, "address already in use")


def test_bad_setting_names_its_variable(tmp_path: Path) -> None:
    out = run_ia(["worker"], tmp_path, IA_BATCH_SIZE="many")
    assert "Traceback" not in out.stderr
    assert out.returncode == 2
    assert "worker.batch_size (IA_BATCH_SIZE)" in out.stderr


def test_audit_verify_with_redis_stopped(tmp_path: Path) -> None:
    key = write_key_file(tmp_path / "audit.key")
    out = run_ia(["audit", "verify"], tmp_path, IA_AUDIT_KEY_FILE=str(key))
    assert_one_line_error(out, 3, "cannot reach Redis", "REDIS_URL")


def test_record_with_the_broker_stopped(tmp_path: Path) -> None:
    out = run_ia(["record", "--topic", "ia.telemetry", "--output", str(tmp_path / "r.jsonl")],
                 tmp_path)
    assert_one_line_error(out, 3, "Kafka", "KAFKA_BOOTSTRAP_SERVERS")
    assert len(out.stderr.splitlines()) < 10, "librdkafka's connection noise is summarised"
