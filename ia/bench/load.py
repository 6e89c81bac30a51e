"""Building blocks of ``ia bench``: generated telemetry, producers, topic counters,
worker processes and their resource use.

Nothing here knows about the phases of the benchmark (see :mod:`ia.bench`).
"""

from __future__ import annotations

import base64
import contextlib
import ctypes
import json
import logging
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from confluent_kafka import Consumer, KafkaError, Producer, TopicPartition

from ia.core import kafka
from ia.core.clock import now_ms
from ia.core.gaps import GapGuard, guard_assigned

log = logging.getLogger("ia.bench")
CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
METRICS = ("cpu_pct", "latency_ms")
Record = tuple[bytes, bytes]  # (key, value)


# --------------------------------------------------------------------------- telemetry


def event_json(entity: str, metric: str, value: float, ts: int, event_id: str,
               kind: str = "metric") -> bytes:
    return (f'{{"entity":"{entity}","metric":"{metric}","value":{value:.3f},"ts":{ts},'
            f'"kind":"{kind}","event_id":"{event_id}"}}').encode()


def telemetry(n: int, entities: int, *, run: str, seed: int = 7,
              start_ms: int = 1_750_000_000_000, step_ms: int = 1000, first: int = 0,
              id_tag: str = "e") -> Iterator[Record]:
    """``n`` metric samples round-robin over ``entities`` entities (two metrics each).

    Values are noisy around a per-entity level with a rare spike, so the model
    scores, learns and now and then proposes an action, as in production.
    """
    rng = random.Random(seed)
    for i in range(first, first + n):
        e = i % entities
        entity = f"{run}-{e:06d}"
        metric = METRICS[(i // entities) % len(METRICS)]
        value = 50.0 + (e % 17) + rng.gauss(0.0, 2.0)
        if rng.random() < 0.001:
            value *= 6
        ts = start_ms + ((i - first) // entities) * step_ms
        yield entity.encode(), event_json(entity, metric, value, ts, f"{run}-{id_tag}{i}")


def action_events(n: int, *, run: str, start: int = 0) -> Iterator[Record]:
    """Discrete ``bench_act`` events: the bench policy turns each into a webhook action."""
    now = now_ms()
    for i in range(start, start + n):
        entity = f"{run}-act-{i % 50:02d}"
        yield entity.encode(), event_json(entity, "bench_act", 1.0, now + i, f"{run}-act-{i}",
                                          kind="event")


def producer(bootstrap: str, linger_ms: int = 20) -> Producer:
    return kafka.producer(bootstrap, {"linger.ms": linger_ms, "acks": "all",
                                      "queue.buffering.max.messages": 1_000_000,
                                      "batch.num.messages": 10_000,
                                      "log.connection.close": False})


def produce_all(bootstrap: str, topic: str, records: Iterable[Record]) -> int:
    """Produce as fast as the client allows; returns the count once all are acknowledged."""
    p = producer(bootstrap)
    n = 0
    for key, value in records:
        _produce(p, topic, key, value)
        n += 1
    if p.flush(120) != 0:
        raise RuntimeError(f"{topic}: not every record was acknowledged")
    return n


def _produce(p: Producer, topic: str, key: bytes, value: bytes) -> None:
    while True:
        try:
            p.produce(topic, value=value, key=key)
            return
        except BufferError:
            p.poll(0.01)


def event_id_of(value: bytes) -> str | None:
    m = re.search(rb'"event_id":"([^"]*)"', value)
    return m.group(1).decode() if m else None


def produce_paced(bootstrap: str, topic: str, records: Iterable[Record], rate: float,
                  sent_at: dict[str, float]) -> int:
    """Produce at ``rate`` records/s in 5 ms slices, noting each record's send time."""
    p = producer(bootstrap, linger_ms=1)
    per_tick = max(1, round(rate * 0.005))
    started = time.perf_counter()
    n = 0
    it = iter(records)
    while True:
        chunk = [r for _, r in zip(range(per_tick), it, strict=False)]
        if not chunk:
            break
        now = time.time()
        for key, value in chunk:
            _produce(p, topic, key, value)
            sent_at[event_id_of(value) or ""] = now
        p.poll(0)
        n += len(chunk)
        delay = started + n / rate - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
    p.flush(60)
    return n


# --------------------------------------------------------------------------- topics


def consume_ready(consumer: Consumer, timeout_s: float, max_records: int = 10_000) -> list:
    """The records available now, waiting at most ``timeout_s`` for the first one.

    (librdkafka's batch ``consume`` waits for its whole timeout unless the batch
    fills, which would add up to the timeout to every arrival time measured.)
    """
    first = consumer.poll(timeout_s)
    if first is None:
        return []
    return [first, *consumer.consume(max_records - 1, timeout=0)]


def admitted(batch: list, guard: GapGuard, errors: list[str]) -> list:
    """The records of ``batch`` the gap guard lets through, in order.

    Error events are noted in ``errors`` and logged: librdkafka recovers from them by
    itself, but a count that falls short should come with them.
    """
    out = []
    for m in batch:
        err = m.error()
        if err is not None:
            errors.append(str(err))
            log.warning("%s: %s", m.topic() or "consumer", err)
        elif guard.admit(m.topic(), m.partition(), m.offset()):
            out.append(m)
    guard.tick()
    return out


class TopicCounter:
    """Records in a set of topics, counted by reading them in a thread.

    (Not from high watermarks: tansu reports a partition's high watermark as
    the base offset of its last batch plus one, not the offset after it.)
    Each offset counts once: a :class:`~ia.core.gaps.GapGuard` fetches again the
    batches the broker skipped (see :mod:`ia.core.gaps`); ``gaps`` and ``errors``
    say what happened on the way.
    """

    def __init__(self, bootstrap: str, topics: list[str]) -> None:
        self._n = 0
        self._stop = threading.Event()
        self.errors: list[str] = []
        self.consumer = kafka.from_beginning(bootstrap, topics, "ia-bench-count",
                                             {"fetch.wait.max.ms": 10})
        self.gaps = guard_assigned(self.consumer)
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self._n += len(admitted(consume_ready(self.consumer, 0.05), self.gaps, self.errors))

    def count(self) -> int:
        return self._n

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self.consumer.close()


@dataclass
class Drain:
    records: int
    seconds: float  # between 10% and 90% of the records
    total_seconds: float

    @property
    def per_s(self) -> float:
        return 0.8 * self.records / self.seconds if self.seconds > 0 else 0.0


def wait_drained(counter: TopicCounter, base: int, n: int, timeout_s: float) -> Drain:
    """Wait until ``n`` records beyond ``base`` arrived; time the steady 10%..90% part."""
    started = time.perf_counter()
    t10 = t90 = None
    while True:
        got = counter.count() - base
        now = time.perf_counter()
        if t10 is None and got >= 0.1 * n:
            t10 = now
        if t90 is None and got >= 0.9 * n:
            t90 = now
        if got >= n:
            break
        if now - started > timeout_s:
            raise TimeoutError(f"only {got} of {n} records after {timeout_s:.0f}s")
        time.sleep(0.02)
    assert t10 is not None and t90 is not None
    return Drain(n, t90 - t10, now - started)


@dataclass
class Recount:
    """The records of some topics as a fresh reader finds them, read to their end."""

    records: int
    distinct_ids: int
    found: int  # of the ids looked for
    wanted: int
    ends: dict[str, dict[int, int]]  # topic -> partition -> offset after its last record


def record_id(value: bytes) -> str | None:
    """The event id a decision or a dead letter (by its original record) answers."""
    eid = event_id_of(value)
    if eid is not None:
        return eid
    with contextlib.suppress(ValueError, TypeError, KeyError):
        dead = json.loads(value)
        original = base64.b64decode(dead["original_b64"])
        return event_id_of(original) or (f"{dead['source_topic']}[{dead['source_partition']}]"
                                         f"@{dead['source_offset']}")
    return None


def recount(bootstrap: str, topics: list[str], wanted: set[str],
            timeout_s: float = 120.0) -> Recount:
    """Read ``topics`` from the beginning to their end (partition EOF) with a new consumer:
    how many records, how many distinct ids, how many of ``wanted`` are there."""
    c = kafka.from_beginning(bootstrap, topics, "ia-bench-recount",
                             {"enable.partition.eof": True})
    pending = {(tp.topic, tp.partition) for tp in c.assignment()}
    ends: dict[str, dict[int, int]] = {t: {} for t in topics}
    ids: set[str] = set()
    records = 0
    deadline = time.monotonic() + timeout_s
    try:
        while pending and time.monotonic() < deadline:
            for m in c.consume(10_000, timeout=0.2):
                err = m.error()
                if err is None:
                    records += 1
                    ends[m.topic()][m.partition()] = m.offset() + 1
                    if (rid := record_id(m.value())) is not None:
                        ids.add(rid)
                elif err.code() == KafkaError._PARTITION_EOF:
                    pending.discard((m.topic(), m.partition()))
    finally:
        c.close()
    if pending:
        raise TimeoutError(f"recount: {sorted(pending)} not read to their end in {timeout_s:g}s")
    return Recount(records, len(ids), len(wanted & ids), len(wanted), ends)


def group_progress(bootstrap: str, group: str, topic: str) -> dict[int, tuple[int, int]]:
    """Per partition of ``topic``: the offset ``group`` committed (-1: none) and the offset
    after the partition's last record. Reads the offsets only; does not join the group."""
    ends = kafka.end_offsets(bootstrap, topic)
    c = kafka.consumer(bootstrap, group, {"enable.auto.commit": False,
                                          "log.connection.close": False})
    try:
        committed = c.committed([TopicPartition(topic, p) for p in ends], timeout=10)
    finally:
        c.close()
    return {tp.partition: (max(tp.offset, -1), ends[tp.partition]) for tp in committed}


class Tap:
    """Reads topics in a thread, noting when each record with a marker arrives.

    Starts at the beginning (watermarks cannot be trusted, see
    :class:`TopicCounter`) and keeps only records whose value contains the
    topic's marker (``None``: keep all); :meth:`caught_up` waits until the
    records that were there before are read.
    """

    def __init__(self, bootstrap: str, markers: dict[str, bytes | None]) -> None:
        self.received: list[tuple[str, bytes, float]] = []
        self.markers = markers
        self._idle = threading.Event()
        self._stop = threading.Event()
        self._consumer = kafka.from_beginning(bootstrap, list(markers), "ia-bench-tap",
                                              {"fetch.wait.max.ms": 5})
        self.gaps = guard_assigned(self._consumer)
        self.errors: list[str] = []
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            batch = consume_ready(self._consumer, 0.3 if not self._idle.is_set() else 0.05)
            now = time.time()
            if not batch:
                self._idle.set()
            for m in admitted(batch, self.gaps, self.errors):
                marker = self.markers.get(m.topic())
                if marker is None or marker in m.value():
                    self.received.append((m.topic(), m.value(), now))

    def caught_up(self, timeout_s: float = 120.0) -> None:
        if not self._idle.wait(timeout_s):
            raise TimeoutError("the tap did not catch up")
        self.received.clear()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


# --------------------------------------------------------------------------- processes


def _die_with_parent() -> None:
    with contextlib.suppress(OSError):
        ctypes.CDLL(None, use_errno=True).prctl(1, int(signal.SIGKILL), 0, 0, 0)


@dataclass
class Proc:
    """An ``ia`` subcommand in a child process that dies with this one."""

    args: list[str]
    env: dict[str, str]
    log: Path
    metrics_port: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)

    def start(self) -> Proc:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ia.cli", *self.args], env={**os.environ, **self.env},
                stdout=out, stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.alive():
            assert self.proc is not None
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def events_in(self) -> float:
        """``ia_events_in_total`` summed over topics, from the metrics endpoint (0 if down)."""
        if not self.metrics_port:
            return 0.0
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics",
                                        timeout=2) as r:
                text = r.read().decode()
        except OSError:
            return 0.0
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("ia_events_in_total{"))


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    """Resident memory of ``pid`` in MiB (``VmHWM`` for the peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024.0
    return 0.0


def cpu_seconds(pid: int | None) -> float | None:
    """User + system CPU time of ``pid`` so far (None if unknown)."""
    if not pid:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


class CpuMeter:
    """CPU use (in cores) of named processes over an interval."""

    def __init__(self, pids: dict[str, int | None]) -> None:
        self.pids = pids
        self.start = {n: cpu_seconds(p) for n, p in pids.items()}
        self.t0 = time.perf_counter()

    def cores(self) -> dict[str, float | None]:
        dt = time.perf_counter() - self.t0
        out: dict[str, float | None] = {}
        for name, pid in self.pids.items():
            now, then = cpu_seconds(pid), self.start[name]
            out[name] = round((now - then) / dt, 3) if now is not None and then is not None \
                and dt > 0 else None
        return out


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100.0 * (len(s) - 1))))]


def decoded(values: Iterable[bytes]) -> Iterator[dict]:
    for v in values:
        with contextlib.suppress(ValueError):
            yield json.loads(v)
