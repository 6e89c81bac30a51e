"""The fault suite: kill -9 of workers and actuators at random points under load,
a Redis crash and restart mid-stream, graceful SIGTERM, and hostile input.

Every test checks the two promises: no input event without a decision, no
action executed twice.  ``make faults`` runs the full suite (20 trials per
kill test) and prints a summary; ``make test`` runs the same tests with 3
trials per kill test (the ``faults_quick`` variants) instead of 20.
"""

from __future__ import annotations

import time

import pytest

from ia.core.kafka import ensure_topics
from ia.core.settings import Topics
from tests.fault_support import (
    POLICY,
    Feeder,
    PersistentRedis,
    Progress,
    SlowSink,
    check_loop,
    record,
    seeded_rng,
    trials,
    wait_all_decided,
)
from tests.support import IaProcess, ia_env

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

QUICK, FULL = 3, trials(20)
TRIALS = [pytest.param(QUICK, marks=pytest.mark.faults_quick, id="quick"),
          pytest.param(FULL, marks=[pytest.mark.faults_long, pytest.mark.timeout(1200)],
                       id="full")]


class Loop:
    """A worker, an actuator, a slow webhook and a feeder on topics of their own."""

    def __init__(self, infra, tmp_path, prefix: str, **env: str) -> None:
        self.infra, self.tmp, self.prefix = infra, tmp_path, prefix
        self.topics = Topics(prefix)
        ensure_topics(infra.kafka, self.topics.all(), 4)
        self.sink = SlowSink().__enter__()
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(url=self.sink.url))
        self.env = ia_env(infra, prefix, policy, IA_BATCH_SIZE="100", **env)
        self.procs: dict[str, IaProcess] = {}
        self.feeder = Feeder(infra.kafka, self.topics.telemetry, prefix)
        self.decisions = Progress(infra.kafka, self.topics.decisions)
        self.outcomes = Progress(infra.kafka, self.topics.outcomes)

    def start(self, role: str) -> IaProcess:
        command = "worker" if role == "worker" else "actuate"
        self.procs[role] = IaProcess([command], self.env, self.tmp / f"{role}.log").start()
        return self.procs[role]

    def close(self) -> None:
        for p in self.procs.values():
            p.stop()
        try:
            if self.feeder.is_alive():
                self.feeder.stop()
        finally:
            self.decisions.close()
            self.outcomes.close()
            self.sink.__exit__()


@pytest.fixture
def loop(infra, tmp_path, topic_prefix):
    lp = Loop(infra, tmp_path, topic_prefix)
    try:
        yield lp
    finally:
        lp.close()


def _kill_trials(loop: Loop, role: str, n: int, progress: Progress,
                 name: str) -> tuple[list[float], int]:
    """Kill ``role`` with SIGKILL ``n`` times, each at a random moment while it works.

    Returns the pauses (seconds into each working stretch) and the random seed."""
    rng, seed = seeded_rng(name)
    points = []
    for trial in range(n):
        progress.wait_growth(2, 180, f"{role} at work before kill {trial + 1}")
        pause = rng.uniform(0.0, 2.0)
        time.sleep(pause)
        assert loop.feeder.is_alive(), "the load stopped before the kill"
        loop.procs[role].kill9()
        points.append(round(pause, 2))
        loop.start(role)
    return points, seed


def _assert_promises(loop: Loop, name: str, n: int, points: tuple[list[float], int]) -> None:
    sent = loop.feeder.stop()
    res = check_loop(loop.infra.kafka, loop.topics, sent, loop.sink)
    tail = {r: p.tail() for r, p in loop.procs.items()}
    assert not res.undecided, f"{len(res.undecided)} events without a decision\n{tail}"
    assert not res.executed_twice, f"actions executed more than once: {res.executed_twice}"
    unexplained = res.never_called - res.interrupted_and_reported()
    no_outcome = res.acting - set(res.outcomes)
    assert not no_outcome, f"{len(no_outcome)} of {len(res.acting)} actions got no outcome"
    assert not unexplained, f"actions neither run nor reported as interrupted: " \
                            f"{[res.outcomes.get(d) for d in sorted(unexplained)[:5]]}"
    assert len(res.acting) >= n, "too few actions to have exercised the actuator"
    record(name, trials=n, seed=points[1], kill_points_s=points[0], events=res.events,
           undecided=0,
           actions=len(res.acting), executed_once=len(res.calls), executed_twice=0,
           interrupted_by_kill=len(res.never_called))


@pytest.mark.parametrize("n", TRIALS)
def test_kill9_worker_at_random_points(loop, n):
    loop.start("worker")
    loop.start("actuator")
    loop.feeder.start()
    points = _kill_trials(loop, "worker", n, loop.decisions, "kill9_worker")
    _assert_promises(loop, "kill9_worker", n, points)


@pytest.mark.parametrize("n", TRIALS)
def test_kill9_actuator_at_random_points(loop, n):
    loop.start("worker")
    loop.start("actuator")
    loop.feeder.start()
    points = _kill_trials(loop, "actuator", n, loop.outcomes, "kill9_actuator")
    _assert_promises(loop, "kill9_actuator", n, points)


def test_graceful_sigterm_commits_and_loses_nothing(loop):
    loop.start("worker")
    loop.feeder.start()
    duplicates, exits = 0, []
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
    assert exits == [0, 0], f"exit statuses after SIGTERM: {exits}"
    # Committed on the way out: nothing is decided a second time after the restart.
    assert duplicates == 0, f"{duplicates} decisions published twice after a graceful stop"
    record("sigterm_worker", trials=2, events=len(sent), undecided=0, exit_status=exits,
           republished=duplicates)


def test_redis_crash_and_restart_mid_stream(infra, tmp_path, topic_prefix):
    store = PersistentRedis(tmp_path / "redis").start()
    lp = Loop(infra, tmp_path, topic_prefix, REDIS_URL=store.url)
    try:
        worker = lp.start("worker")
        lp.feeder.start()
        lp.decisions.wait_growth(300, 180, "decisions before the Redis crash")
        before_crash = lp.decisions.count()
        store.kill9()
        time.sleep(3.0)
        down_count = lp.decisions.count()
        store.start()
        back = time.monotonic()
        lp.decisions.wait_growth(1, 60, "decisions after Redis came back")
        recovery_s = time.monotonic() - back
        lp.decisions.wait_growth(300, 120, "decisions well after the restart")
        sent = lp.feeder.stop()
        decisions = wait_all_decided(infra.kafka, lp.topics.decisions, sent)
        assert worker.alive(), f"the worker died:\n{worker.tail()}"
        assert {d["event_id"] for d in decisions} >= set(sent)
        assert recovery_s < 30.0, f"recovery took {recovery_s:.1f}s"
        record("redis_restart", events=len(sent), undecided=0, worker_restarts=0,
               redis_down_s=3.0, recovery_s=round(recovery_s, 2),
               decided_while_down=down_count - before_crash)
    finally:
        lp.close()
        store.stop()
