"""Fault suite, the audit writer: the real ``ia audit-writer`` killed with SIGKILL at
random moments while the loop runs.  After each restart the writer repairs the
log's tail and resumes from its committed source offsets, so at the end the
hash chain verifies (``ia audit verify``) and every decision's story is complete.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fault_support import Loop, assert_promises, count, running_loop, trial

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

TRIALS = [pytest.param(count(2), marks=pytest.mark.faults_quick, id="quick"),
          pytest.param(count(8), marks=[pytest.mark.faults_long, pytest.mark.timeout(1200)],
                       id="full")]


def audit_log(loop: Loop) -> Path:
    return Path(loop.env["IA_AUDIT_DIR"]) / f"{loop.prefix}.audit.jsonl"


def lines(path: Path) -> int:
    try:
        with path.open("rb") as f:
            return sum(1 for _ in f)
    except FileNotFoundError:
        return 0


def wait_log_growth(path: Path, by: int, timeout_s: float) -> None:
    target = lines(path) + by
    deadline = time.monotonic() + timeout_s
    while lines(path) < target:
        assert time.monotonic() < deadline, f"the audit log did not grow within {timeout_s:g}s"
        time.sleep(0.1)


def verify(loop: Loop) -> dict:
    """``ia audit verify --json`` of the loop's log."""
    done = subprocess.run([sys.executable, "-m", "ia.cli", "audit", "verify", "--json"],
                          env={**loop.env_os(), "IA_LOG_LEVEL": "error"},
                          capture_output=True, text=True, timeout=120)
    assert done.stdout, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def wait_audited(loop: Loop, decisions: int, timeout_s: float = 240.0) -> dict:
    """The verify report once every decision's story is in the log (or the last one)."""
    deadline = time.monotonic() + timeout_s
    while True:
        report = verify(loop)
        stats = report["completeness"]
        if (stats["complete"] >= decisions and not stats["pending"]) or \
                time.monotonic() > deadline:
            return report
        time.sleep(2.0)


@pytest.mark.parametrize("n", TRIALS)
def test_kill9_audit_writer_mid_stream(infra, tmp_path, topic_prefix, n):
    with trial("kill9_audit_writer") as t, \
            running_loop(infra, tmp_path, topic_prefix, t) as loop:
        for role in ("worker", "actuator", "audit"):
            loop.start(role)
        loop.feeder.start()
        log = audit_log(loop)
        points = []
        for _ in range(n):
            wait_log_growth(log, 5, 120)
            pause = t.rng.uniform(0.0, 1.0)
            time.sleep(pause)
            assert loop.procs["audit"].alive(), loop.procs["audit"].tail()
            loop.procs["audit"].kill9()
            points.append(round(pause, 2))
            loop.start("audit")
        sent = loop.feeder.stop()
        res = loop.check(sent)
        report = wait_audited(loop, len(sent))
        stats = report["completeness"]
        t.report(**res.figures(), kills=n, kill_points_s=points, audit_records=report["records"],
                 audit_complete=stats["complete"], audit_pending=stats["pending"],
                 audit_overdue=stats["overdue"], completeness=stats["ratio"],
                 chain_ok=report["ok"])
        assert_promises(loop, res, interruptions_allowed=False)
        assert loop.procs["audit"].alive(), loop.procs["audit"].tail()
        assert report["ok"], f"the chain does not verify: {report['problems'][:5]}"
        assert stats["ratio"] == 1.0 and not stats["pending"], stats
        # Each event has one decision; a redelivered batch must not be counted again.
        assert stats["complete"] == len(sent), f"{stats['complete']} stories for {len(sent)}"
