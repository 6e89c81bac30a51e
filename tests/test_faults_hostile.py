"""Fault suite, hostile input: records generated with hypothesis go, as generated (no
offline validator picks them first), through the real broker to a real worker
(JSON and Confluent wire formats).  Each one must end either as a decision or as
a dead letter with a reason, never both and never neither; the valid events
around them must all be decided, and the worker keeps its throughput.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import pytest
from confluent_kafka import OFFSET_BEGINNING, Consumer, Producer, TopicPartition
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from ia.core.kafka import ensure_topics
from ia.core.settings import Topics
from ia.schemas.models import DeadLetter, Decision, TelemetryEvent
from ia.schemas.serde import decode, detect_format, encode
from ia.schemas.validation import validate_record
from tests.fault_support import Progress, trial
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


def draw(strategy: st.SearchStrategy[bytes], n: int = EXAMPLES) -> list[bytes]:
    """``n`` generated records, all of them: the worker, not the generator, must sort
    out which are valid."""
    out: list[bytes] = []

    @settings(max_examples=n, derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(raw: bytes) -> None:
        out.append(raw)

    collect()
    return out


def rejected_offline(records: list[bytes], fmt: str) -> int:
    """How many of ``records`` the offline validator rejects (reported, not relied on)."""
    return sum(isinstance(validate_record(raw, fmt=fmt, topic="t", partition=0, offset=0),
                          DeadLetter) for raw in records)


# --------------------------------------------------------------------------- the run


def _valid(fmt: str, tag: str, n: int) -> list[tuple[bytes, bytes]]:
    out = []
    for i in range(n):
        ev = TelemetryEvent(entity=f"ok-{i % 20:02d}", metric="load", value=50.0 + i % 7,
                            ts=NOW_MS + i, event_id=f"{tag}-{i}")
        out.append((ev.entity.encode(), encode(ev, fmt)))
    return out


def _produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]
             ) -> dict[bytes, tuple[int, int]]:
    """Produce ``records``; returns where each key's record landed (partition, offset)."""
    p = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, "acks": "all",
                  "message.max.bytes": 2_000_000})
    landed: dict[bytes, tuple[int, int]] = {}

    def delivered(err, msg) -> None:
        assert err is None, err
        landed[msg.key()] = (msg.partition(), msg.offset())

    for key, value in records:
        p.produce(topic, value=value, key=key, on_delivery=delivered)
        p.poll(0)
    assert p.flush(60) == 0
    return landed


def _timed(progress: _Sum, bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]
           ) -> tuple[float, dict[bytes, tuple[int, int]]]:
    """Seconds from producing ``records`` until the worker has emitted one record for
    each, and where each record landed."""
    target = progress.count() + len(records)
    started = time.perf_counter()
    landed = _produce(bootstrap, topic, records)
    deadline = time.monotonic() + 180
    while progress.count() < target:
        assert time.monotonic() < deadline, "the worker stopped emitting"
        time.sleep(0.02)
    return time.perf_counter() - started, landed


def _read_all(bootstrap: str, topic: str, until: Callable[[list[dict]], bool],
              model: type[BaseModel], fmt: str) -> list[dict]:
    """Records of ``topic`` from the beginning until ``until(all so far)``, or 60 s."""
    c = Consumer({"bootstrap.servers": bootstrap, "group.id": "ia-fault-hostile",
                  "enable.auto.commit": False})
    parts = c.list_topics(topic, timeout=10).topics[topic].partitions
    c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
    out: list[dict] = []
    deadline = time.monotonic() + 60
    try:
        while not until(out) and time.monotonic() < deadline:
            out.extend(decode(m.value(), model, detect_format(m.value(), fmt)).model_dump()
                       for m in c.consume(1000, timeout=0.2) if not m.error())
    finally:
        c.close()
    return out


@pytest.mark.parametrize("fmt", ["json", "confluent"])
def test_hostile_inputs_each_end_as_a_decision_or_a_dead_letter(infra, tmp_path,
                                                                topic_prefix, fmt):
    hostile = draw(JSON_HOSTILE if fmt == "json" else CONFLUENT_HOSTILE)
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
    with trial(f"hostile_{fmt}") as t:
        try:
            _timed(both, infra.kafka, topics.telemetry, _valid(fmt, "warm", 300))
            clean_s, _ = _timed(both, infra.kafka, topics.telemetry,
                                _valid(fmt, "clean", VALID))
            keyed = [(f"hostile-{i}".encode(), raw) for i, raw in enumerate(hostile)]
            mixed_s, landed = _timed(both, infra.kafka, topics.telemetry,
                                     _interleave(_valid(fmt, "mixed", VALID), keyed))
            hostile_at = {landed[k] for k, _ in keyed}
            letters = _read_all(infra.kafka, topics.dlq, lambda got: len(got) >= dlq.count(),
                                DeadLetter, fmt)
            valid = 2 * VALID + 300
            decisions = _read_all(infra.kafka, topics.decisions,
                                  lambda got: len(got) >= out.count(), Decision, fmt)
            of_valid = [d for d in decisions if _is_valid_id(d["event_id"])]
            from_valid = {d["event_id"] for d in of_valid}
            lettered = [(d["source_partition"], d["source_offset"]) for d in letters]
            decided_hostile = len(decisions) - len(of_valid)
            pace = clean_s / mixed_s
            t.report(events=len(hostile) + valid, undecided=valid - len(from_valid),
                     hostile=len(keyed), to_dlq=len(lettered), decided_hostile=decided_hostile,
                     rejected_by_offline_validator=rejected_offline(hostile, fmt),
                     reasons=sorted({d["reason"] for d in letters}), valid_decided=len(from_valid),
                     valid_pace_vs_clean=round(pace, 2))
            assert worker.alive(), worker.tail()
            assert len(from_valid) == valid, f"{valid - len(from_valid)} valid events undecided"
            assert set(lettered) <= hostile_at, "valid records went to the DLQ"
            assert len(set(lettered)) == len(lettered), "a record went to the DLQ twice"
            assert len(lettered) + decided_hostile == len(keyed), \
                f"{len(keyed)} hostile records, {len(lettered)} dead letters, " \
                f"{decided_hostile} decisions: each must be exactly one of the two"
            assert all(d["reason"] and d["error"] for d in letters), "a dead letter, no reason"
            # The valid events' pace with 1 hostile record per ~12 valid ones, against the
            # clean pace measured just before on the same worker; generous for shared cores.
            assert pace > 0.33, f"throughput fell to {pace:.2f} of the clean run"
        finally:
            worker.stop()
            out.close()
            dlq.close()


def _is_valid_id(event_id: str) -> bool:
    tag, _, n = event_id.partition("-")
    return tag in ("warm", "clean", "mixed") and n.isdigit()


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
