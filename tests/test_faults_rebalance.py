"""Fault suite, rebalance liveness: under steady load, workers are started, stopped
with SIGTERM and killed with SIGKILL at random moments (the group moving between 1
and 3 members) for 20 membership changes (4 in the quick variant).

Afterwards every event has exactly one decision id (a batch decided again after a
kill republishes the same id, which the actuator's claim absorbs), no action ran
twice, every action has an honest outcome, and the time from the last change to
a drained backlog is reported.
"""

from __future__ import annotations

import signal
import time
from collections import defaultdict

import pytest

from tests.fault_support import (
    Loop,
    Trial,
    assert_promises,
    quick_and_full,
    running_loop,
    trial,
    wait_all_decided,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

CHANGES = quick_and_full(4, 20, 1500)
MAX_GROUP = 3


class Membership:
    """The live workers of a loop and the random changes made to them."""

    def __init__(self, loop: Loop, t: Trial) -> None:
        self.loop, self.rng = loop, t.rng
        self.live: list[str] = []
        self.started = 0
        self.changes: list[str] = []

    def start(self) -> None:
        self.started += 1
        name = f"worker{self.started}"
        self.loop.start("worker", name)
        self.live.append(name)
        self.changes.append(f"start {name}")

    def change(self) -> None:
        """One random change that keeps the group between 1 and MAX_GROUP members."""
        ops = (["start"] if len(self.live) < MAX_GROUP else []) + \
              (["sigterm", "sigkill"] if len(self.live) > 1 else [])
        op = self.rng.choice(ops)
        if op == "start":
            self.start()
            return
        name = self.live.pop(self.rng.randrange(len(self.live)))
        proc = self.loop.procs[name]
        assert proc.proc is not None and proc.alive(), f"{name} died by itself\n{proc.tail()}"
        # A stopped worker is not waited for: the next change may overlap its exit.
        proc.proc.send_signal(signal.SIGKILL if op == "sigkill" else signal.SIGTERM)
        self.changes.append(f"{op} {name}")


def decision_ids_per_event(decisions: list[dict]) -> dict[str, set[str]]:
    ids: dict[str, set[str]] = defaultdict(set)
    for d in decisions:
        ids[d["event_id"]].add(d["decision_id"])
    return ids


@pytest.mark.parametrize("n", CHANGES)
def test_rebalance_liveness(infra, tmp_path, topic_prefix, n):
    with trial("rebalance") as t, running_loop(infra, tmp_path, topic_prefix, t) as loop:
        members = Membership(loop, t)
        members.start()
        loop.start("actuator")
        loop.feeder.start()
        loop.decisions.wait_growth(200, 120, "the first worker at work")
        for _ in range(n):
            time.sleep(t.rng.uniform(0.5, 4.0))
            assert loop.feeder.is_alive(), "the load stopped"
            members.change()
        last_change = time.monotonic()
        sent = loop.feeder.stop()
        decisions = wait_all_decided(infra.kafka, loop.topics.decisions, sent, timeout_s=300)
        drain_s = time.monotonic() - last_change
        ids = decision_ids_per_event(decisions)
        several = {e: sorted(i) for e, i in ids.items() if len(i) > 1}
        res = loop.check(sent)
        t.report(**res.figures(), membership_changes=len(members.changes) - 1,
                 changes=members.changes[1:], final_group=len(members.live),
                 republished=len(decisions) - len(ids), several_decision_ids=len(several),
                 drain_after_last_change_s=round(drain_s, 2))
        assert not several, f"events with more than one decision id: {list(several.items())[:3]}"
        assert_promises(loop, res, interruptions_allowed=False)
