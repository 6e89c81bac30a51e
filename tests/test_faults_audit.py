"""Fault suite, the audit writer: the real ``ia audit-writer`` killed with SIGKILL at
random moments while the loop runs.  After each restart the writer repairs the
log's tail and resumes from its committed source offsets, so at the end the
hash chain verifies (``ia audit verify``) and every decision's story is complete.
"""

from __future__ import annotations

import time

import pytest

from tests.fault_support import (
    assert_promises,
    audit_log,
    quick_and_full,
    running_loop,
    trial,
    wait_audited,
    wait_log_growth,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

TRIALS = quick_and_full(1, 8, 1200)


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
