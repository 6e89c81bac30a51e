"""The fault suite's machinery: trials with a replayable seed, a steady feed, a slow
and flaky webhook sink, the loop of processes under test, a Redis with the shipped
persistence options that can be taken away, the result checks, and the summary
``make faults`` prints.

Also a pytest plugin (``-p tests.fault_support``): it prints every trial of the
session (passed, failed or expected to fail, with its figures and seed) at the
end and writes them to ``.ia/faults-summary.json``.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import random
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition

from ia.core.kafka import end_offsets, ensure_topics
from ia.core.settings import Topics
from ia.runtime.embedded import _redis_argv, free_port, redis_binary
from tests.support import IaProcess, ia_env

REPO = Path(__file__).resolve().parent.parent

POLICY = """\
version: 1
defaults: {{cooldown_s: 0, circuit_breaker: false, max_event_age_s: false}}  # a day ago
rules:
  - name: act
    match: {{kind: event, metric: fault_act}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    mode: auto
"""

#: Every trial of this session (passed or not), for the summary.
RESULTS: list[dict[str, Any]] = []

#: One seed for the whole session, so ``IA_FAULT_SEED`` replays every trial of a run.
#: Exported, so pytest-xdist's workers (started after this import) share it.
SEED = int(os.environ.setdefault("IA_FAULT_SEED", str(time.time_ns() % 1_000_000)))

#: Where each process of a session (pytest-xdist runs several) leaves its trials for
#: the summary that the main process prints.
PARTS = Path(os.environ.get("IA_FAULT_SUMMARY_PARTS", REPO / ".ia" / "faults-summary.d"))

#: The figures every trial reports (None where a figure does not apply).
FIGURES = ("events", "undecided", "actions", "executed_once", "executed_twice", "interrupted")


#: Telemetry per second fed to a loop: the full trials' load, and the quick ones'
#: (``make test``): half, so less backlog to drain after each fault; what a trial
#: asserts is the same.
RATE = {"quick": 75.0, "full": 150.0}


def variant() -> str:
    """``quick`` if the running test is a quick variant (its id says so), else ``full``."""
    test = os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]
    return "quick" if "quick]" in test else "full"


def count(default: int) -> int:
    """Kills (or other faults) per trial: ``IA_FAULT_TRIALS`` if set, else ``default``.

    The variable sets the count of the quick and the full variants alike, so a
    quick run can be made as long as needed to chase a rare failure.
    """
    return int(os.environ.get("IA_FAULT_TRIALS", default))


def quick_and_full(quick: int, full: int, full_timeout_s: int) -> list:
    """The two variants of a fault trial, as pytest params of its fault count: the
    quick one runs in ``make test``, the full one only in ``make faults``."""
    return [pytest.param(count(quick), marks=pytest.mark.faults_quick, id="quick"),
            pytest.param(count(full), marks=[pytest.mark.faults_long,
                                             pytest.mark.timeout(full_timeout_s)], id="full")]


@dataclass
class Trial:
    """One fault trial: its random source and the figures it reports.

    Registered in :data:`RESULTS` when it starts, so a trial that fails still
    shows up in the summary with its seed.
    """

    name: str
    seed: int
    figures: dict[str, Any]
    rng: random.Random = field(init=False)

    def __post_init__(self) -> None:
        self.rng = random.Random(f"{self.seed}:{self.name}")

    def report(self, **figures: Any) -> None:
        self.figures.update(figures)


@contextlib.contextmanager
def trial(name: str) -> Iterator[Trial]:
    """Run one trial; when it fails, say (stderr, the exception's notes, the summary)
    which ``IA_FAULT_SEED`` replays it."""
    figures: dict[str, Any] = {"test": name, "result": "running", "seed": SEED,
                               **dict.fromkeys(FIGURES),
                               "nodeid": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0]}
    RESULTS.append(figures)
    t = Trial(name, SEED, figures)
    try:
        yield t
    except BaseException as exc:
        figures["result"] = "failed"
        replay = f"IA_FAULT_SEED={SEED} replays the fault trial {name}"
        print(replay, file=sys.stderr)
        exc.add_note(replay)
        raise
    figures["result"] = "passed"


def pytest_runtest_logreport(report: Any) -> None:  # pytest hook
    """Mark the trials of an expected failure as such (they still show their seed)."""
    if report.when == "call" and hasattr(report, "wasxfail"):
        for r in RESULTS:
            if r["nodeid"] == report.nodeid:
                r["result"] = "xfailed" if report.skipped else "xpassed"
                r["known_failure"] = report.wasxfail


def _worker_id(config: Any) -> str | None:
    return getattr(config, "workerinput", {}).get("workerid")


def pytest_sessionstart(session: Any) -> None:  # pytest hook
    if _worker_id(session.config) is None:  # the main process: a fresh summary
        PARTS.mkdir(parents=True, exist_ok=True)
        for part in PARTS.glob("*.json"):
            part.unlink()


def pytest_sessionfinish(session: Any) -> None:  # pytest hook
    if RESULTS:
        name = _worker_id(session.config) or "main"
        (PARTS / f"{name}.json").write_text(json.dumps(RESULTS) + "\n")


def _session_results() -> list[dict[str, Any]]:
    results = [r for part in sorted(PARTS.glob("*.json"))
               for r in json.loads(part.read_text())]
    return sorted(results, key=lambda r: r["nodeid"])


def pytest_terminal_summary(terminalreporter: Any) -> None:  # pytest hook
    results = _session_results()
    if not results:
        return
    tr = terminalreporter
    tr.section("fault suite summary")
    for r in results:
        figures = ", ".join(f"{k}={v}" for k, v in r.items()
                            if k not in ("test", "nodeid") and v is not None)
        tr.write_line(f"{r['test']}: {figures}")
    failed = [r for r in results if r["result"] != "passed"]
    if failed:
        tr.write_line(f"IA_FAULT_SEED={SEED} replays the {len(failed)} trial(s) not passed")
    out = Path(os.environ.get("IA_FAULT_SUMMARY", ".ia/faults-summary.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
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


class FaultSink:
    """A webhook endpoint that is slow and sometimes fails, and tells executions apart
    from attempts.

    Each POST takes ``delay_s`` (so a kill often lands while an action is in flight)
    and is answered 500 with probability ``fail_rate`` (so the webhook's retries run).
    A POST answered 2xx is an *execution*: the receiver did the work.  While a test
    holds :attr:`lock` no answer leaves the sink, so a process killed under the lock
    with a request :meth:`in_flight` provably died mid-action.
    """

    def __init__(self, rng: random.Random, delay_s: float = 0.05,
                 fail_rate: float = 0.1) -> None:
        self.attempts: Counter[str] = Counter()
        self.executions: Counter[str] = Counter()
        self.failures = 0
        self._open: Counter[str] = Counter()
        self.last_request = time.monotonic()
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server's naming
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                key = self.headers.get("Idempotency-Key", "")
                with sink.lock:
                    sink.attempts[key] += 1
                    sink._open[key] += 1
                    sink.last_request = time.monotonic()
                time.sleep(delay_s)
                with sink.lock:
                    sink._open[key] -= 1
                    failed = rng.random() < fail_rate
                    if failed:
                        sink.failures += 1
                    else:
                        sink.executions[key] += 1
                self.send_response(500 if failed else 200)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def in_flight(self) -> set[str]:
        """Idempotency keys of requests received and not yet answered (call under :attr:`lock`)."""
        return {k for k, n in self._open.items() if n > 0}

    def wait_in_flight(self, timeout_s: float) -> bool:
        """Wait until a request is in flight; True with :attr:`lock` held, False on timeout."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.lock.acquire()
            if self.in_flight():
                return True
            self.lock.release()
            time.sleep(0.002)
        return False

    def wait_quiet(self, quiet_s: float = 1.0, timeout_s: float = 60.0) -> None:
        """Wait until no request is in flight and none arrived for ``quiet_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with self.lock:
                if not self.in_flight() and time.monotonic() - self.last_request > quiet_s:
                    return
            time.sleep(0.05)
        raise AssertionError(f"the webhook sink was still busy after {timeout_s:g}s")

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


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


def read_to_end(bootstrap: str, topic: str, timeout_s: float = 120.0) -> list[dict]:
    """Every record of ``topic`` now (from the beginning to each partition's end)."""
    ends = {p: e for p, e in end_offsets(bootstrap, topic).items() if e > 0}
    reached: dict[int, int] = {}

    def done(new_offsets: list[tuple[int, int]]) -> bool:
        for p, offset in new_offsets:
            reached[p] = max(reached.get(p, 0), offset + 1)
        return all(reached.get(p, 0) >= e for p, e in ends.items())

    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "ia-fault-reader",
                  "enable.auto.commit": False, "log.connection.close": False})
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
    out: list[dict] = []
    deadline = time.monotonic() + timeout_s
    try:
        while ends and not done([]):
            assert time.monotonic() < deadline, f"could not read {topic} to its end"
            batch = [m for m in c.consume(2000, timeout=0.2) if not m.error()]
            out.extend(json.loads(m.value()) for m in batch)
            done([(m.partition(), m.offset()) for m in batch])
    finally:
        c.close()
    return out


def wait_committed(bootstrap: str, group: str, topic: str, timeout_s: float = 120.0) -> None:
    """Wait until ``group`` has committed every record of ``topic``: after that it
    will not be handed any of them again."""
    ends = end_offsets(bootstrap, topic)
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": group,
                  "enable.auto.commit": False})
    deadline = time.monotonic() + timeout_s
    try:
        while True:
            done = {tp.partition: tp.offset for tp in
                    c.committed([TopicPartition(topic, p) for p in ends], timeout=10)}
            behind = {p: (done.get(p), end) for p, end in ends.items()
                      if end > 0 and done.get(p, -1) < end}
            if not behind:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{group} did not commit {topic} to its end: {behind}")
            time.sleep(0.2)
    finally:
        c.close()


#: Outcome statuses that say an action's fate is unknown: its process died or lost
#: its store while the action may have been running.
INTERRUPTED = "interrupted"


def reports_interruption(outcome: dict) -> bool:
    """The outcome says its action was claimed by a process that did not finish it."""
    return outcome["status"] == INTERRUPTED or (
        outcome["status"] == "skipped_duplicate" and "running" in outcome.get("detail", ""))


@dataclass
class LoopCheck:
    """What a fault run must show: every event decided, no action run twice, and an
    honest outcome for every action."""

    events: int
    undecided: list[str]
    acting: set[str]
    executions: Counter[str]
    attempts: Counter[str]
    outcomes: dict[str, list[dict]] = field(default_factory=dict)

    @property
    def executed_twice(self) -> dict[str, int]:
        return {d: n for d, n in self.executions.items() if n > 1}

    @property
    def executed_once(self) -> int:
        return sum(1 for n in self.executions.values() if n == 1)

    @property
    def interrupted(self) -> set[str]:
        return {d for d in self.acting if any(map(reports_interruption, self.outcome(d)))}

    def outcome(self, decision_id: str) -> list[dict]:
        """The action outcomes (not verification or compensation) of ``decision_id``."""
        return [o for o in self.outcomes.get(decision_id, [])
                if o.get("phase", "action") == "action"]

    def without_outcome(self) -> set[str]:
        return {d for d in self.acting if not self.outcome(d)}

    def dishonest(self, *, interruptions_allowed: bool) -> dict[str, str]:
        """Acting decisions whose outcome does not match what the receiver saw.

        ``succeeded`` needs an execution, ``failed`` and ``blocked`` deny one.  An
        action whose only outcome is "already handled" has no first outcome: that
        stands only where a process may have died between its claim and its outcome
        (``interruptions_allowed``); otherwise it hides what happened.
        """
        wrong: dict[str, str] = {}
        for d in sorted(self.acting):
            statuses = {o["status"] for o in self.outcome(d)}
            ran = self.executions[d]
            if "succeeded" in statuses and not ran:
                wrong[d] = "reported succeeded, never executed"
            elif statuses & {"failed", "blocked"} and ran:
                wrong[d] = f"reported {sorted(statuses)}, executed {ran} time(s)"
            elif statuses == {"skipped_duplicate"} and not interruptions_allowed:
                wrong[d] = (f"executed {ran} time(s), its only outcome: "
                            f"{self.outcome(d)[0].get('detail')!r} and no process died")
        return wrong

    def lost(self) -> dict[str, str]:
        """Acting decisions never executed for no reason of their own: no outcome but
        ``interrupted``, ``timeout`` (the trials' actions take 50 ms, so only a target
        lock nobody released times out) or "already handled".  Where no process died,
        each is an action lost."""
        unexplained = {"interrupted", "timeout", "skipped_duplicate"}
        out: dict[str, str] = {}
        for d in sorted(self.acting):
            statuses = {o["status"] for o in self.outcome(d)}
            if not self.executions[d] and statuses and statuses <= unexplained:
                out[d] = "/".join(sorted(statuses)) + ": " + str(self.outcome(d)[0].get("detail"))
        return out

    def not_executed(self) -> dict[str, int]:
        """The outcome statuses of the actions the receiver never executed."""
        return dict(Counter("/".join(sorted({o["status"] for o in self.outcome(d)}))
                            for d in self.acting if not self.executions[d]))

    def figures(self) -> dict[str, Any]:
        return {"events": self.events, "undecided": len(self.undecided),
                "actions": len(self.acting), "executed_once": self.executed_once,
                "executed_twice": len(self.executed_twice),
                "interrupted": len(self.interrupted), "not_executed": self.not_executed()}


def check_loop(bootstrap: str, topics: Any, sent: list[str], sink: FaultSink,
               actuator_group: str) -> LoopCheck:
    """Read back what a loop did: decisions, outcomes and, once the actuator has
    committed every decision and the sink is quiet, the executions."""
    decisions = wait_all_decided(bootstrap, topics.decisions, sent)
    decided = {d["event_id"] for d in decisions}
    acting = {d["decision_id"] for d in decisions if d["action"] and d["mode"] == "auto"}
    wait_outcomes(bootstrap, topics.outcomes, acting)
    wait_committed(bootstrap, actuator_group, topics.decisions)
    sink.wait_quiet()
    by_decision: dict[str, list[dict]] = {}
    for o in read_to_end(bootstrap, topics.outcomes):
        by_decision.setdefault(o["decision_id"], []).append(o)
    with sink.lock:
        executions, attempts = Counter(sink.executions), Counter(sink.attempts)
    return LoopCheck(events=len(sent), undecided=sorted(set(sent) - decided), acting=acting,
                     executions=executions, attempts=attempts, outcomes=by_decision)


# --------------------------------------------------------------------------- the loop


@dataclass(frozen=True)
class Endpoints:
    """A broker and a Redis, like the session's ``infra`` (for a stack of a trial's own)."""

    kafka: str
    redis_url: str
    redis_password_file: str | None = None


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
        rate = RATE[variant()]
        t.report(rate=rate)
        self.feeder = Feeder(infra.kafka, self.topics.telemetry, prefix, rate=rate)
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

    def env_os(self) -> dict[str, str]:
        """The environment an ``ia`` command of this loop runs with."""
        return {**os.environ, **self.env}

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


def assert_promises(loop: Loop, res: LoopCheck, *, interruptions_allowed: bool) -> None:
    """No event undecided, no action twice, an outcome for each action and an honest one;
    and, unless a process was killed (``interruptions_allowed``), no action lost."""
    assert not res.undecided, f"{len(res.undecided)} events without a decision\n{loop.tails()}"
    assert not res.executed_twice, f"actions executed more than once: {res.executed_twice}"
    no_outcome = res.without_outcome()
    assert not no_outcome, f"{len(no_outcome)} of {len(res.acting)} actions got no outcome"
    wrong = res.dishonest(interruptions_allowed=interruptions_allowed)
    assert not wrong, f"outcomes that misreport what ran: {dict(list(wrong.items())[:5])}"
    if not interruptions_allowed:  # every process lived: each action ran or was refused
        lost = res.lost()
        assert not lost, f"{len(lost)} actions lost: {dict(list(lost.items())[:5])}"
    assert res.executed_once > 0, "no action ran: the actuator was not exercised"


# --------------------------------------------------------------------------- audit


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


def shipped_redis_options(config: str, data_dir: Path) -> list[str]:
    """The persistence options a shipped stack runs Redis with, read from where it ships.

    ``embedded``: ``ia up`` and the test stack (:mod:`ia.runtime.embedded`);
    ``compose``: ``compose/docker-compose.yml``.
    """
    if config == "embedded":
        argv = _redis_argv(redis_binary(), 0, data_dir)[1:]
    elif config == "compose":
        doc = yaml.safe_load((REPO / "compose" / "docker-compose.yml").read_text())
        argv = doc["services"]["redis"]["command"][1:]
    else:
        raise ValueError(config)
    return _persistence_only(argv)


def _persistence_only(argv: list[str]) -> list[str]:
    """The ``--save``/``--appendonly``/``--appendfsync`` options of a Redis command line."""
    keep, out, i = {"--save", "--appendonly", "--appendfsync"}, [], 0
    while i < len(argv):
        if argv[i] in keep:
            out += [argv[i], argv[i + 1]]
            i += 2
        else:
            i += 1
    return out


class RestartableRedis:
    """A valkey on one port with a shipped stack's persistence options, which a test
    can kill, stop, pause and start again on the same data directory.  Like every
    shipped Redis it requires a password, in ``password_file`` (pass it on as
    ``IA_REDIS_PASSWORD_FILE``)."""

    def __init__(self, data_dir: Path, config: str) -> None:
        self.dir, self.config = data_dir, config
        self.dir.mkdir(parents=True, exist_ok=True)
        self.options = shipped_redis_options(config, self.dir)
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.password = secrets.token_urlsafe(32)
        self.password_file = str(self.dir / "redis.password")
        Path(self.password_file).write_text(self.password + "\n")
        (self.dir / "redis.conf").write_text(f"requirepass {self.password}\n")
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 20.0) -> RestartableRedis:
        argv = [redis_binary(), str(self.dir / "redis.conf"), "--port", str(self.port),
                "--bind", "127.0.0.1", *self.options, "--daemonize", "no",
                "--dir", str(self.dir), "--logfile", "redis.log"]
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     preexec_fn=_die_with_parent)
        client = redis.Redis(port=self.port, password=self.password,
                             socket_connect_timeout=0.5)
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

    def pause(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)

    def stop(self) -> None:
        """Shut down as ``docker stop`` or ``ia down`` would (SIGTERM: Redis saves first)."""
        if self.proc and self.proc.poll() is None:
            self.resume()
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill9()
