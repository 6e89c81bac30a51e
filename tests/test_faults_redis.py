"""Fault suite, Redis away under a running loop: Redis crashed (SIGKILL), stopped
(SIGTERM) or paused (SIGSTOP) while the actuator has an action in flight, then
restarted or resumed on the same port and data directory.

The trials run Redis with the persistence options the shipped stacks use, read
from where they ship (:func:`tests.fault_support.shipped_redis_options`):
``embedded`` (``ia up`` and the test stack) and ``compose``, both an append-only
file fsynced before every reply (compose adds snapshots).  The promises: every
event decided, no action lost or run twice, every action's own outcome honest,
the worker and the actuator alive.
"""

from __future__ import annotations

import shlex
import time

import pytest

from tests.fault_support import (
    RestartableRedis,
    assert_promises,
    running_loop,
    trial,
    variant,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

AWAY_S = {"quick": 3.0, "full": 20.0}
#: Outcomes to wait for before Redis goes away and after it is back (the quick variant
#: needs only an action in flight, and the loop moving again).
BEFORE, AFTER = {"quick": 15, "full": 50}, {"quick": 15, "full": 30}


def _case(config: str, fault: str, variant: str, *marks: pytest.MarkDecorator):
    long = [pytest.mark.faults_long, pytest.mark.timeout(900)]
    return pytest.param(config, fault, AWAY_S[variant],
                        marks=[*marks, *(long if variant == "full" else
                                         [pytest.mark.faults_quick])],
                        id=f"{config}-{fault}-{variant}")


CASES = [
    _case("embedded", "crash", "quick"),
    _case("compose", "crash", "full"),
    _case("compose", "stop", "full"),
    _case("compose", "pause", "full"),
    _case("embedded", "crash", "full"),
    _case("embedded", "stop", "full"),
    _case("embedded", "pause", "full"),
]


def go_away(store: RestartableRedis, fault: str) -> None:
    {"pause": store.pause, "crash": store.kill9, "stop": store.stop}[fault]()


def come_back(store: RestartableRedis, fault: str) -> None:
    if fault == "pause":
        store.resume()
    else:
        store.start()


@pytest.mark.parametrize(("config", "fault", "away_s"), CASES)
def test_redis_away_under_the_actuator(infra, tmp_path, topic_prefix, config, fault, away_s):
    store = RestartableRedis(tmp_path / "redis", config).start()
    with trial(f"redis_{fault}_{config}") as t, \
            running_loop(infra, tmp_path, topic_prefix, t, REDIS_URL=store.url,
                         IA_REDIS_PASSWORD_FILE=store.password_file) as loop:
        try:
            loop.start("worker")
            loop.start("actuator")
            loop.feeder.start()
            v = variant()
            loop.outcomes.wait_growth(BEFORE[v], 120, "outcomes before Redis goes away")
            assert loop.sink.wait_in_flight(10.0), "no action in flight to take Redis from"
            try:  # the action cannot finish before Redis is gone
                in_flight = len(loop.sink.in_flight())
                go_away(store, fault)
            finally:
                loop.sink.lock.release()
            time.sleep(away_s)
            come_back(store, fault)
            back = time.monotonic()
            loop.outcomes.wait_growth(AFTER[v], 120, "outcomes after Redis came back")
            recovery_s = time.monotonic() - back
            sent = loop.feeder.stop()
            res = loop.check(sent)
            dead = [name for name, p in loop.procs.items() if not p.alive()]
            t.report(**res.figures(), redis=config, redis_options=shlex.join(store.options),
                     fault=fault, away_s=away_s, actions_in_flight=in_flight,
                     recovery_s=round(recovery_s, 2), died=dead)
            assert not dead, f"{dead} died while Redis was away\n{loop.tails()}"
            assert_promises(loop, res, interruptions_allowed=False)
        finally:
            store.stop()
