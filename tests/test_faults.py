"""The fault suite: kill -9 of workers and actuators at random points under load,
and graceful SIGTERM.

Every trial checks the promises: no input event without a decision, no action
executed twice, an honest outcome for every action.  ``make faults`` runs the
full trials (20 kills per role) and prints a summary; ``make test`` runs the
``faults_quick`` variants (3 kills).  ``IA_FAULT_TRIALS`` sets the kills of
both variants, ``IA_FAULT_SEED`` replays a run's random points.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ia.core.kafka import ensure_topics
from ia.core.settings import Topics
from tests.fault_support import (
    POLICY,
    FaultSink,
    Feeder,
    LoopCheck,
    Progress,
    Trial,
    check_loop,
    count,
    trial,
    wait_all_decided,
)
from tests.support import IaProcess, ia_env

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

TRIALS = [pytest.param(count(3), marks=pytest.mark.faults_quick, id="quick"),
          pytest.param(count(20), marks=[pytest.mark.faults_long, pytest.mark.timeout(1200)],
                       id="full")]

ROLES = {"worker": "worker", "actuator": "actuate", "audit": "audit-writer"}


class Loop:
    """Workers, an actuator, a slow and flaky webhook and a feeder on topics of their own."""

    def __init__(self, infra, tmp_path: Path, prefix: str, t: Trial, **env: str) -> None:
        self.infra, self.tmp, self.prefix = infra, tmp_path, prefix
        self.topics = Topics(prefix)
        ensure_topics(infra.kafka, self.topics.all(), 4)
        self.sink = FaultSink(t.rng)
        policy = tmp_path / "policy.yaml"
        policy.write_text(POLICY.format(url=self.sink.url))
        self.env = ia_env(infra, prefix, policy, IA_BATCH_SIZE="100",
                          IA_AUDIT_DIR=str(tmp_path / "audit"), **env)
        self.procs: dict[str, IaProcess] = {}
        self.feeder = Feeder(infra.kafka, self.topics.telemetry, prefix)
        self.decisions = Progress(infra.kafka, self.topics.decisions)
        self.outcomes = Progress(infra.kafka, self.topics.outcomes)

    @property
    def actuator_group(self) -> str:
        return self.env["IA_ACTUATOR_APP_ID"]

    def start(self, role: str, name: str | None = None) -> IaProcess:
        """Start ``role`` (worker, actuator, audit) as the process called ``name``."""
        name = name or role
        self.procs[name] = IaProcess([ROLES[role]], self.env, self.tmp / f"{name}.log").start()
        return self.procs[name]

    def check(self, sent: list[str]) -> LoopCheck:
        return check_loop(self.infra.kafka, self.topics, sent, self.sink, self.actuator_group)

    def tails(self) -> str:
        return "\n".join(f"--- {n}\n{p.tail()}" for n, p in self.procs.items())

    def close(self) -> None:
        for p in self.procs.values():
            p.stop()
        try:
            if self.feeder.is_alive():
                self.feeder.stop()
        finally:
            self.decisions.close()
            self.outcomes.close()
            self.sink.close()


@contextlib.contextmanager
def running_loop(infra, tmp_path: Path, prefix: str, t: Trial, **env: str) -> Iterator[Loop]:
    lp = Loop(infra, tmp_path, prefix, t, **env)
    try:
        yield lp
    finally:
        lp.close()


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


def assert_promises(loop: Loop, res: LoopCheck, *, interruptions_allowed: bool) -> None:
    """No event undecided, no action twice, an outcome for each action and an honest one."""
    assert not res.undecided, f"{len(res.undecided)} events without a decision\n{loop.tails()}"
    assert not res.executed_twice, f"actions executed more than once: {res.executed_twice}"
    no_outcome = res.without_outcome()
    assert not no_outcome, f"{len(no_outcome)} of {len(res.acting)} actions got no outcome"
    wrong = res.dishonest(interruptions_allowed=interruptions_allowed)
    assert not wrong, f"outcomes that misreport what ran: {dict(list(wrong.items())[:5])}"
    assert res.executed_once > 0, "no action ran: the actuator was not exercised"


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
