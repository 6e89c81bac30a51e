"""Fault suite, the broker unavailable: the embedded broker is paused with SIGSTOP
mid-stream (30 s; 5 s in the quick variant) and resumed.  The worker, the actuator
and the audit writer must ride it out: nothing lost, nothing run twice, and the
audit chain whole.

The broker runs on a stack of the trial's own, so the pause touches nothing else.
(A broker *restart* is a different matter: the embedded broker keeps topics in
memory only; the README says what that costs.)
"""

from __future__ import annotations

import os
import signal
import time

import pytest

from ia.runtime.embedded import EmbeddedStack
from tests.fault_support import (
    Endpoints,
    assert_promises,
    running_loop,
    trial,
    wait_audited,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

PAUSES = [pytest.param(5.0, marks=pytest.mark.faults_quick, id="quick"),
          pytest.param(30.0, marks=[pytest.mark.faults_long, pytest.mark.timeout(900)],
                       id="full")]


@pytest.mark.parametrize("pause_s", PAUSES)
def test_broker_paused_mid_stream(tmp_path, topic_prefix, pause_s):
    with EmbeddedStack(tmp_path / "stack") as stack, trial("broker_pause") as t:
        infra = Endpoints(stack.kafka_bootstrap_servers, stack.redis_url,
                          stack.redis_password_file)
        with running_loop(infra, tmp_path, topic_prefix, t) as loop:
            for role in ("worker", "actuator", "audit"):
                loop.start(role)
            loop.feeder.start()
            loop.outcomes.wait_growth(30, 120, "outcomes before the pause")
            time.sleep(t.rng.uniform(0.0, 1.0))
            os.kill(stack.broker_pid, signal.SIGSTOP)
            try:
                time.sleep(pause_s)
            finally:
                os.kill(stack.broker_pid, signal.SIGCONT)
            resumed = time.monotonic()
            loop.outcomes.wait_growth(30, 180, "outcomes after the broker came back")
            recovery_s = time.monotonic() - resumed
            sent = loop.feeder.stop()
            res = loop.check(sent)
            report = wait_audited(loop, len(sent))
            stats = report["completeness"]
            dead = [name for name, p in loop.procs.items() if not p.alive()]
            t.report(**res.figures(), broker_paused_s=pause_s, recovery_s=round(recovery_s, 2),
                     died=dead, audit_complete=stats["complete"], completeness=stats["ratio"],
                     chain_ok=report["ok"])
            assert not dead, f"{dead} died while the broker was paused\n{loop.tails()}"
            assert_promises(loop, res, interruptions_allowed=False)
            assert report["ok"], f"the chain does not verify: {report['problems'][:5]}"
            assert stats["ratio"] == 1.0 and not stats["pending"], stats
            assert stats["complete"] == len(sent), f"{stats['complete']} stories"
