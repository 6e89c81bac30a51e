"""Test support: run `ia` processes, wait for conditions, and (re-exported from
:mod:`ia.bench.webhook_sink`) the webhook sink that counts side effects."""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from ia.bench.webhook_sink import WebhookSink as WebhookSink  # re-exported for the tests
from ia.core.signing import FEEDBACK_FIELDS, load_keys, write_key_file
from ia.schemas.models import Decision

# The signing key of every worker and actuator the tests start (one per test session).
TEST_KEY_FILE = write_key_file(Path(tempfile.mkdtemp(prefix="ia-test-keys-")) / "signing.key")
TEST_KEYS = load_keys(TEST_KEY_FILE)
# ... and the key their labels are signed with (ia feedback, tests that produce labels).
TEST_FEEDBACK_KEY_FILE = write_key_file(TEST_KEY_FILE.parent / "feedback.key")
TEST_FEEDBACK_KEYS = load_keys(TEST_FEEDBACK_KEY_FILE)
# The approval key (requests, answers): a different one, as a least-privilege deployment has.
TEST_APPROVAL_KEY_FILE = write_key_file(TEST_KEY_FILE.parent / "approval.key", "a1")
TEST_APPROVAL_KEYS = load_keys(TEST_APPROVAL_KEY_FILE)

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


class IaProcess:
    """An `ia` subcommand in a child process that dies with the test run."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.args, self.env, self.log = args, env, log
        self.proc: subprocess.Popen | None = None

    def start(self) -> IaProcess:
        out = open(self.log, "ab")  # noqa: SIM115  # owned by the child
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "ia.cli", *self.args],
            env={**os.environ, **self.env},
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent,
        )
        out.close()
        return self

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 15.0) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()

    def alive(self) -> bool:
        return bool(self.proc) and self.proc.poll() is None

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""


def wait_until(pred: Callable[[], bool], timeout_s: float, what: str, every_s: float = 0.2) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(every_s)
    raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")


def signed(d: Decision) -> Decision:
    """``d`` signed as a worker of the tests signs it."""
    return d.model_copy(update={"signature": TEST_KEYS.sign(d.model_dump(mode="json"))})


def signed_label(fb: dict) -> dict:
    """A feedback record (its JSON form) signed as ``ia feedback`` signs it."""
    return {**fb, "signature": TEST_FEEDBACK_KEYS.sign(fb, FEEDBACK_FIELDS)}


def ia_env(infra, prefix: str, policy: Path, **extra: str) -> dict[str, str]:
    password_file = getattr(infra, "redis_password_file", None)
    return {
        "KAFKA_BOOTSTRAP_SERVERS": infra.kafka,
        "REDIS_URL": infra.redis_url,
        **({"IA_REDIS_PASSWORD_FILE": password_file} if password_file else {}),
        "IA_TOPIC_PREFIX": prefix,
        "IA_REDIS_PREFIX": prefix,
        "IA_POLICY_FILE": str(policy),
        "IA_APP_ID": f"{prefix}-pipeline",
        "IA_ACTUATOR_APP_ID": f"{prefix}-actuator",
        "IA_LOG_LEVEL": "warn",
        "IA_SIGNING_KEY_FILE": str(TEST_KEY_FILE),
        "IA_FEEDBACK_KEY_FILE": str(TEST_FEEDBACK_KEY_FILE),
        "IA_APPROVAL_KEY_FILE": str(TEST_APPROVAL_KEY_FILE),
        **extra,
    }


def series(
    entity: str,
    metric: str,
    values: list[float],
    start_ms: int = 1_700_000_000_000,
    step_ms: int = 10_000,
) -> list[dict]:
    return [
        {"entity": entity, "metric": metric, "value": v, "ts": start_ms + i * step_ms}
        for i, v in enumerate(values)
    ]
