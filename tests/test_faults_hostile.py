"""Fault suite, hostile input: malformed records generated with hypothesis go through the
real broker to a real worker (JSON and Confluent wire formats).  Every one must end
in the dead-letter topic with a reason, none may become a decision, the valid
events around them must all be decided, and the worker keeps its throughput.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ia.core.kafka import ensure_topics
from ia.core.settings import Topics
from ia.schemas.models import DeadLetter, TelemetryEvent
from ia.schemas.serde import DECODE_REASONS, encode
from ia.schemas.validation import validate_record
from tests.fault_support import Progress, record
from tests.support import IaProcess, ia_env

pytestmark = [pytest.mark.integration, pytest.mark.slow, pytest.mark.faults]

EXAMPLES = 120
VALID = 1500
NOW_MS = int(time.time() * 1000) - 3_600_000
BASE = {"entity": "h-1", "metric": "load", "value": 1.0, "ts": NOW_MS}

# --------------------------------------------------------------------------- strategies

not_a_float = st.one_of(st.text(alphabet="abcxyz", min_size=1, max_size=8),
                        st.lists(st.integers()),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                        st.none())
not_a_string = st.one_of(st.integers(), st.floats(allow_nan=False), st.lists(st.text()),
                         st.dictionaries(st.text(max_size=3), st.text(max_size=3), max_size=2),
                         st.booleans(), st.none())


def _json(doc: dict) -> bytes:
    return json.dumps(doc).encode()


wrong_types = st.one_of(
    st.builds(lambda v: _json({**BASE, "value": v}), not_a_float),
    st.builds(lambda v: _json({**BASE, "entity": v}), not_a_string),
    st.builds(lambda v: _json({**BASE, "metric": v}), not_a_string),
    st.builds(lambda v: _json({**BASE, "ts": v}),
              st.one_of(st.text(alphabet="abc", min_size=1), st.integers(max_value=-1),
                        st.lists(st.integers()))),
    st.builds(lambda v: _json({**BASE, "labels": v}),
              st.one_of(st.lists(st.text()), st.text(min_size=1),
                        st.dictionaries(st.text(min_size=1, max_size=4), st.integers(),
                                        min_size=1, max_size=3))),
    st.builds(lambda v: _json({**BASE, "kind": v}), st.text(alphabet="qwz", min_size=1)),
    st.builds(lambda doc: _json(doc), st.just({"value": 1.0})),  # required fields missing
    st.builds(lambda k: _json({**BASE, k: 1}), st.text(alphabet="uvw", min_size=1, max_size=9)),
)

huge_strings = st.builds(
    lambda field, n: _json({**BASE, **({"labels": {"k": "x" * n}} if field == "labels"
                                       else {field: "x" * n})}),
    st.sampled_from(["entity", "metric", "event_id", "labels"]),
    st.integers(min_value=300, max_value=400_000))


def _nested(depth: int, leaf: object) -> object:
    for _ in range(depth):
        leaf = {"a": leaf}
    return leaf


deep_nesting = st.builds(
    lambda where, depth: (b'{"entity":"h-1","metric":"m","ts":1,"' + where.encode() + b'":'
                          + b"[" * depth + b"1" + b"]" * depth + b"}"),
    st.sampled_from(["value", "labels", "extra"]), st.integers(min_value=50, max_value=5000))

invalid_utf8 = st.builds(
    lambda junk, field: _json({**BASE, field: "@@"}).replace(b"@@", junk),
    st.sampled_from([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80",
                     b"\x80abc", b"\xfe\xfe"]),
    st.sampled_from(["entity", "metric", "event_id"]))

not_finite = st.builds(
    lambda token: _json(BASE).replace(b'"value": 1.0', b'"value": ' + token),
    st.sampled_from([b"NaN", b"Infinity", b"-Infinity", b"1e999", b"-1e999"]))

garbage = st.one_of(st.just(b""), st.binary(min_size=1, max_size=200))

JSON_HOSTILE = st.one_of(wrong_types, huge_strings, deep_nesting, invalid_utf8, not_finite,
                         garbage)


def _avro_telemetry() -> bytes:
    return encode(TelemetryEvent(**BASE), "avro")


CONFLUENT_HOSTILE = st.one_of(
    # unknown schema ids, and ids of other contracts (decision, outcome, ...)
    st.builds(lambda sid: b"\x00" + sid.to_bytes(4, "big") + _avro_telemetry(),
              st.one_of(st.integers(min_value=7, max_value=2**32 - 1),
                        st.integers(min_value=2, max_value=6), st.just(0))),
    st.builds(lambda b0, rest: bytes([b0]) + rest, st.integers(min_value=1, max_value=255),
              st.binary(max_size=50)),                                     # bad magic byte
    st.builds(lambda rest: b"\x00" + rest, st.binary(max_size=3)),          # truncated header
    st.builds(lambda rest: b"\x00\x00\x00\x00\x01" + rest, st.binary(min_size=1, max_size=40)),
)


def draw(strategy: st.SearchStrategy[bytes], fmt: str, n: int = EXAMPLES) -> list[bytes]:
    """``n`` generated records, each checked offline to be invalid (so the test proves
    the worker's routing, not the generator's luck)."""
    out: list[bytes] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(raw: bytes) -> None:
        if isinstance(validate_record(raw, fmt=fmt, topic="t", partition=0, offset=0),
                      DeadLetter):
            out.append(raw)

    collect()
    return out


# --------------------------------------------------------------------------- the run


def _valid(fmt: str, tag: str, n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        ev = TelemetryEvent(entity=f"ok-{i % 20:02d}", metric="load", value=50.0 + i % 7,
                            ts=NOW_MS + i, event_id=f"{tag}-{i}")
        out.append((ev.entity.encode(), encode(ev, fmt)))
    return out


def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all",
                  "message.max.bytes": 2_000_000})
    for key, value in records:
        p.produce(topic, value=value, key=key)
        p.poll(0)
    assert p.flush(60) == 0


def _timed(progress: Progress, bootstrap: str, topic: str,
           records: list[tuple[bytes, bytes]]) -> float:
    """Seconds from producing ``records`` until the worker has emitted one record for each."""
    target = progress.count() + len(records)
    started = time.perf_counter()
    _produce(bootstrap, topic, records)
    deadline = time.monotonic() + 180
    while progress.count() < target:
        assert time.monotonic() < deadline, "the worker stopped emitting"
        time.sleep(0.02)
    return time.perf_counter() - started


def _read_keyed(bootstrap: str, topic: str, until: Callable[[dict[str, dict]], bool]
                ) -> dict[str, dict]:
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "ia-fault-dlq",
                  "enable.auto.commit": False})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out: dict[str, dict] = {}
    deadline = time.monotonic() + 60
    try:
        while not until(out) and time.monotonic() < deadline:
            for m in c.consume(1000, timeout=0.2):
                if not m.error():
                    out[(m.key() or b"").decode()] = json.loads(m.value())
    finally:
        c.close()
    return out


@pytest.mark.parametrize("fmt", ["json", "confluent"])
def test_hostile_inputs_go_to_the_dlq_and_the_worker_keeps_its_pace(infra, tmp_path,
                                                                   topic_prefix, fmt):
    hostile = draw(JSON_HOSTILE if fmt == "json" else CONFLUENT_HOSTILE, fmt)
    assert len(hostile) >= EXAMPLES // 2, "the generator produced too few invalid records"
    topics = Topics(topic_prefix)
    ensure_topics(infra.kafka, topics.all(), 4)
    policy = tmp_path / "policy.yaml"
    policy.write_text("version: 1\nrules:\n  - name: never\n    match: {metric: never}\n"
                      "    action: {type: log, target: x}\n")
    env = ia_env(infra, topic_prefix, policy, IA_WIRE_FORMAT=fmt, IA_BATCH_SIZE="200")
    worker = IaProcess(["worker"], env, tmp_path / "worker.log").start()
    out = Progress(infra.kafka, topics.decisions)
    dlq = Progress(infra.kafka, topics.dlq)
    both = _Sum(out, dlq)
    try:
        _timed(both, infra.kafka, topics.telemetry, _valid(fmt, "warm", 300))
        clean_s = _timed(both, infra.kafka, topics.telemetry, _valid(fmt, "clean", VALID))
        keyed = [(f"hostile-{i}".encode(), raw) for i, raw in enumerate(hostile)]
        mixed = _interleave(_valid(fmt, "mixed", VALID), keyed)
        mixed_s = _timed(both, infra.kafka, topics.telemetry, mixed)
        assert worker.alive(), worker.tail()
        want = {k.decode() for k, _ in keyed}
        letters = _read_keyed(infra.kafka, topics.dlq, lambda got: want <= set(got))
        missing = want - set(letters)
        assert not missing, f"{len(missing)} hostile records not in the DLQ"
        reasons = {letters[k]["reason"] for k in want}
        assert all(r and (r in DECODE_REASONS or r == "ts_in_future") for r in reasons), reasons
        assert all(letters[k]["error"] for k in want), "a dead letter without an error message"
        assert dlq.count() == len(keyed), "valid records went to the DLQ"
        pace = clean_s / mixed_s
        # The valid events' pace with 1 hostile record per ~12 valid ones, against the
        # clean pace measured just before on the same worker; generous for shared cores.
        assert pace > 0.33, f"throughput fell to {pace:.2f} of the clean run"
        record(f"hostile_{fmt}", hostile=len(keyed), to_dlq=len(keyed), decided_hostile=0,
               reasons=sorted(reasons), valid_decided=2 * VALID + 300,
               valid_pace_vs_clean=round(pace, 2), worker_restarts=0)
    finally:
        worker.stop()
        out.close()
        dlq.close()


class _Sum:
    def __init__(self, *parts: Progress) -> None:
        self.parts = parts

    def count(self) -> int:
        return sum(p.count() for p in self.parts)


def _interleave(valid: list, hostile: list) -> list:
    """Spread ``hostile`` evenly through ``valid``."""
    step = max(1, len(valid) // max(1, len(hostile)))
    out, rest = [], list(hostile)
    for i, rec in enumerate(valid):
        out.append(rec)
        if i % step == 0 and rest:
            out.append(rest.pop(0))
    return out + rest
