"""The fault suite's machinery: a steady feed, a slow webhook, a Redis we can restart,
result checks, and the summary ``make faults`` prints.

Also a pytest plugin (``-p tests.fault_support``): it prints every recorded
fault result at the end of the session.
"""

from __future__ import annotations

import ctypes
import json
import os
import random
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import redis
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from ia.runtime.embedded import free_port, redis_binary
from tests.support import WebhookSink

POLICY = """\
version: 1
defaults: {{cooldown_s: 0, circuit_breaker: false, max_event_age_s: false}}  # a day ago
rules:
  - name: act
    match: {{kind: event, metric: fault_act}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    mode: auto
"""

#: Every result recorded by a fault test in this session, for the summary.
RESULTS: list[dict[str, Any]] = []


def trials(default: int) -> int:
    """Trials of the full kill tests: ``IA_FAULT_TRIALS`` or ``default``."""
    return int(os.environ.get("IA_FAULT_TRIALS", default))


def seeded_rng(name: str) -> tuple[random.Random, int]:
    seed = int(os.environ.get("IA_FAULT_SEED", time.time_ns() % 1_000_000))
    return random.Random(f"{seed}:{name}"), seed


def record(name: str, **figures: Any) -> None:
    RESULTS.append({"test": name, **figures})


def pytest_terminal_summary(terminalreporter: Any) -> None:  # pytest hook
    if not RESULTS:
        return
    tr = terminalreporter
    tr.section("fault suite summary")
    for r in RESULTS:
        figures = ", ".join(f"{k}={v}" for k, v in r.items() if k != "test")
        tr.write_line(f"{r['test']}: {figures}")
    out = Path(os.environ.get("IA_FAULT_SUMMARY", ".ia/faults-summary.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(RESULTS, indent=2) + "\n")
    tr.write_line(f"(also written to {out})")


# --------------------------------------------------------------------------- load


def event(prefix: str, i: int, entities: int, t0_ms: int, act_every: int) -> dict:
    entity = f"{prefix}-{i % entities:02d}"
    base = {"entity": entity, "ts": t0_ms + i, "event_id": f"{prefix}-{i}"}
    if act_every and i % act_every == act_every - 1:
        return {**base, "metric": "fault_act", "kind": "event", "value": 1.0}
    return {**base, "metric": "load", "value": 50.0 + (i * 7919 % 13)}


class Feeder(threading.Thread):
    """Produces telemetry at a steady rate until stopped; remembers every event id."""

    def __init__(self, bootstrap: str, topic: str, prefix: str, *, rate: float = 150.0,
                 entities: int = 16, act_every: int = 10) -> None:
        super().__init__(daemon=True)
        self.bootstrap, self.topic, self.prefix = bootstrap, topic, prefix
        self.rate, self.entities, self.act_every = rate, entities, act_every
        self.sent: list[str] = []
        self.t0_ms = int(time.time() * 1000) - 86_400_000
        self._halt = threading.Event()

    def run(self) -> None:
        p = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, "acks": "all"})
        started, i = time.perf_counter(), 0
        while not self._halt.is_set():
            for _ in range(max(1, round(self.rate / 20))):
                ev = event(self.prefix, i, self.entities, self.t0_ms, self.act_every)
                p.produce(self.topic, json.dumps(ev).encode(), key=ev["entity"].encode())
                self.sent.append(ev["event_id"])
                i += 1
            p.poll(0)
            time.sleep(max(0.0, started + i / self.rate - time.perf_counter()))
        assert p.flush(30) == 0, "the feeder could not deliver everything"

    def stop(self) -> list[str]:
        self._halt.set()
        self.join(60)
        return self.sent


class SlowSink(WebhookSink):
    """A webhook endpoint that takes ``delay_s`` per call and counts calls per Idempotency-Key,
    so a kill -9 often lands while an action is in flight."""

    def __init__(self, delay_s: float = 0.05) -> None:
        super().__init__(delay_s=delay_s)


# --------------------------------------------------------------------------- reading


def read_json(bootstrap: str, topic: str, *, until: Any, timeout_s: float = 180.0) -> list[dict]:
    """Records of ``topic`` from the beginning until ``until(new_records)`` says done.

    ``until`` sees each new slice only (so it can keep its own running state).
    """
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "ia-fault-reader",
                  "enable.auto.commit": False, "log.connection.close": False})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            new = [json.loads(m.value()) for m in c.consume(2000, timeout=0.2) if not m.error()]
            out.extend(new)
            if until(new):
                break
    finally:
        c.close()
    return out


def wait_for_ids(bootstrap: str, topic: str, field: str, ids: Iterable[str],
                 timeout_s: float = 240.0) -> list[dict]:
    """Records of ``topic`` from the beginning until every id in ``ids`` appeared in ``field``."""
    pending = set(ids)

    def done(new: list[dict]) -> bool:
        pending.difference_update(r[field] for r in new)
        return not pending

    return read_json(bootstrap, topic, until=done, timeout_s=timeout_s)


def wait_all_decided(bootstrap: str, topic: str, event_ids: list[str],
                     timeout_s: float = 240.0) -> list[dict]:
    return wait_for_ids(bootstrap, topic, "event_id", event_ids, timeout_s)


def wait_outcomes(bootstrap: str, topic: str, decision_ids: set[str],
                  timeout_s: float = 300.0) -> list[dict]:
    return wait_for_ids(bootstrap, topic, "decision_id", decision_ids, timeout_s)


@dataclass
class LoopCheck:
    """What a fault run must show: every event decided, no action run twice."""

    events: int
    undecided: list[str]
    acting: set[str]
    calls: Counter[str]
    outcomes: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def executed_twice(self) -> dict[str, int]:
        return {d: n for d, n in self.calls.items() if n > 1}

    @property
    def never_called(self) -> set[str]:
        return self.acting - set(self.calls)

    def interrupted_and_reported(self) -> set[str]:
        """Acting decisions never called, reported interrupted (a dead actuator started them)."""
        return {d for d in self.never_called
                if any(o["status"] == "interrupted" for o in self.outcomes.get(d, []))}


def check_loop(bootstrap: str, topics: Any, sent: list[str], sink: SlowSink) -> LoopCheck:
    decisions = wait_all_decided(bootstrap, topics.decisions, sent)
    decided = {d["event_id"] for d in decisions}
    acting = {d["decision_id"] for d in decisions if d["action"] and d["mode"] == "auto"}
    outcomes = wait_outcomes(bootstrap, topics.outcomes, acting)
    by_decision: dict[str, list[dict]] = {}
    for o in outcomes:
        by_decision.setdefault(o["decision_id"], []).append(o)
    time.sleep(0.5)  # the last webhook calls may still be in the sink's handler
    with sink.lock:
        calls = Counter(sink.calls)
    return LoopCheck(events=len(sent), undecided=sorted(set(sent) - decided), acting=acting,
                     calls=calls, outcomes=by_decision)


# --------------------------------------------------------------------------- progress


class Progress:
    """Counts records of a topic as they arrive (a reader thread), to time the faults."""

    def __init__(self, bootstrap: str, topic: str) -> None:
        from ia.bench.load import TopicCounter

        self._counter = TopicCounter(bootstrap, [topic])

    def count(self) -> int:
        return self._counter.count()

    def wait_growth(self, by: int, timeout_s: float, what: str) -> None:
        target = self.count() + by
        deadline = time.monotonic() + timeout_s
        while self.count() < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout_s:g}s waiting for {what}")
            time.sleep(0.05)

    def close(self) -> None:
        self._counter.close()


# --------------------------------------------------------------------------- redis


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)


class PersistentRedis:
    """A valkey with an append-only file fsynced on every write, restartable on one port."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = data_dir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> PersistentRedis:
        argv = [redis_binary(), "--port", str(self.port), "--bind", "127.0.0.1",
                "--appendonly", "yes", "--appendfsync", "always", "--save", "",
                "--daemonize", "no", "--dir", str(self.dir), "--logfile", "redis.log"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        client = redis.Redis(port=self.port, socket_connect_timeout=0.5)
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                if client.ping():
                    break
            except redis.exceptions.RedisError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("restarted Redis did not answer PING")
            time.sleep(0.05)
        client.close()
        return self

    def kill9(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()
