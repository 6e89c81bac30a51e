"""The fault suite: kill -9 of workers and actuators at random points under load,
and graceful SIGTERM.

Every trial checks the promises: no input event without a decision, no action
executed twice, an honest outcome for every action.  ``make faults`` runs the
full trials (20 kills per role) and prints a summary; ``make test`` runs the
``faults_quick`` variants (3 kills).  ``IA_FAULT_TRIALS`` sets the kills of
both variants, ``IA_FAULT_SEED`` replays a run's random points.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.fault_support import (
    Loop,
    Progress,
    Trial,
    assert_promises,
    quick_and_full,
    running_loop,
    trial,
    wait_all_decided,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

TRIALS = quick_and_full(3, 20, 1200)

def kill_at_random_points(loop: Loop, role: str, n: int, progress: Progress, t: Trial) -> int:
    """Kill ``role`` with SIGKILL ``n`` times at random moments while it works, and
    restart it each time; returns how many kills landed while an action was in flight.

    For the actuator, the first kill and about half of the others wait for an action
    in flight, so the mid-action path is exercised in every run; the rest land
    wherever the random pause ends.
    """
    mid_action, points = 0, []
    for k in range(n):
        progress.wait_growth(2, 180, f"{role} at work before kill {k + 1}")
        pause = t.rng.uniform(0.0, 2.0)
        time.sleep(pause)
        assert loop.feeder.is_alive(), "the load stopped before the kill"
        aimed = role == "actuator" and (k == 0 or t.rng.random() < 0.5)
        if not (aimed and loop.sink.wait_in_flight(10.0)):
            loop.sink.lock.acquire()
        try:  # no answer leaves the sink while the lock is held
            mid_action += bool(loop.sink.in_flight()) and role == "actuator"
            loop.procs[role].kill9()
        finally:
            loop.sink.lock.release()
        points.append(round(pause, 2))
        loop.start(role)
    t.report(kills=n, kill_points_s=points, mid_action_kills=mid_action)
    return mid_action


def _kill_trial(infra, tmp_path: Path, prefix: str, role: str, n: int) -> None:
    with trial(f"kill9_{role}") as t, running_loop(infra, tmp_path, prefix, t) as loop:
        loop.start("worker")
        loop.start("actuator")
        loop.feeder.start()
        progress = loop.outcomes if role == "actuator" else loop.decisions
        mid_action = kill_at_random_points(loop, role, n, progress, t)
        res = loop.check(loop.feeder.stop())
        t.report(**res.figures(), webhook_attempts=res.attempts.total(),
                 webhook_500s=loop.sink.failures)
        assert_promises(loop, res, interruptions_allowed=role == "actuator")
        assert loop.sink.failures > 0, "the webhook never failed: its retries went untested"
        if role == "actuator":
            assert mid_action > 0, "no kill landed while an action was in flight"
            assert res.interrupted, "no interrupted action was reported"


@pytest.mark.parametrize("n", TRIALS)
def test_kill9_worker_at_random_points(infra, tmp_path, topic_prefix, n):
    _kill_trial(infra, tmp_path, topic_prefix, "worker", n)


@pytest.mark.parametrize("n", TRIALS)
def test_kill9_actuator_at_random_points(infra, tmp_path, topic_prefix, n):
    _kill_trial(infra, tmp_path, topic_prefix, "actuator", n)


def test_graceful_sigterm_commits_and_loses_nothing(infra, tmp_path, topic_prefix):
    with trial("sigterm_worker") as t, running_loop(infra, tmp_path, topic_prefix, t) as loop:
        loop.start("worker")
        loop.feeder.start()
        exits = []
        for _ in range(2):
            loop.decisions.wait_growth(200, 180, "the worker at work")
            worker = loop.procs["worker"]
            assert worker.proc is not None
            worker.proc.terminate()
            exits.append(worker.proc.wait(30))
            loop.start("worker")
        sent = loop.feeder.stop()
        decisions = wait_all_decided(loop.infra.kafka, loop.topics.decisions, sent)
        ids = [d["decision_id"] for d in decisions]
        duplicates = len(ids) - len(set(ids))
        t.report(events=len(sent), undecided=len(set(sent) - {d["event_id"] for d in decisions}),
                 stops=2, exit_status=exits, republished=duplicates)
        assert exits == [0, 0], f"exit statuses after SIGTERM: {exits}"
        # Committed on the way out: nothing is decided a second time after the restart.
        assert duplicates == 0, f"{duplicates} decisions published twice after a graceful stop"
