"""`ia record`: a topic slice to a file that replays exactly like the topic itself."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka import Producer

from ia.core.kafka import ensure_topics
from ia.offline.recording import (
    RawRecord,
    parse_record,
    read_recording,
    record_line,
    write_recording,
)

T0 = 1_700_000_000_000
STEP = 30_000


def test_record_lines_round_trip_text_binary_and_missing() -> None:
    recs = [RawRecord(0, 7, T0, b"web-1", b'{"entity":"web-1"}'),
            RawRecord(1, 0, -1, None, b"\x00\xff avro"),
            RawRecord(3, 2, T0, b"\xfe", None)]
    assert [parse_record(record_line(r)) for r in recs] == recs
    assert json.loads(record_line(recs[0]))["v"] == '{"entity":"web-1"}'  # readable when text


def test_recording_file_is_sorted_and_stable(tmp_path: Path) -> None:
    parts = {1: [RawRecord(1, 5, T0, b"k", b"b")], 0: [RawRecord(0, 3, T0, b"k", b"a")]}
    for name in ("a", "b"):
        write_recording(tmp_path / name, "t", "json", parts, {"from_ms": T0})
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    header, back = read_recording(tmp_path / "a")
    assert header["topic"] == "t" and header["partitions"] == {"0": [3, 4], "1": [5, 6]}
    assert back == {0: parts[0], 1: parts[1]}


def ia(infra, prefix: str, *args: str) -> subprocess.CompletedProcess:
    # No REDIS_URL at all: recording and replaying need only the broker.
    env = {"KAFKA_BOOTSTRAP_SERVERS": infra.kafka, "IA_TOPIC_PREFIX": prefix,
           "PATH": "/usr/bin:/bin"}
    return subprocess.run([sys.executable, "-m", "ia.cli", *args], env=env, check=True,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.integration
def test_recorded_slice_replays_like_the_topic(infra, topic_prefix: str,
                                               tmp_path: Path) -> None:
    topic = f"{topic_prefix}.telemetry"
    ensure_topics(infra.kafka, [topic], 4)
    rng = random.Random(9)
    p = Producer({"bootstrap.servers": infra.kafka, "acks": "all"})
    for i in range(200):
        for entity in ("rec-a", "rec-b"):
            ts = T0 + i * STEP
            ev = {"entity": entity, "metric": "cpu", "value": 50 + rng.gauss(0, 1)
                  + (60 if (entity, i) == ("rec-b", 150) else 0), "ts": ts}
            p.produce(topic, key=entity.encode(), value=json.dumps(ev).encode(), timestamp=ts)
    assert p.flush(30) == 0

    lo, hi = T0 + 20 * STEP, T0 + 179 * STEP
    rng_args = ["--from", str(lo)]
    # The flags of replay and backtest (--to is a time, the file is --output), and the
    # deprecated spelling (--to FILE, --until TIME), which still records the same slice.
    ia(infra, topic_prefix, "record", "--topic", topic, "--output", str(tmp_path / "one"),
       *rng_args, "--to", str(hi))
    ia(infra, topic_prefix, "record", "--topic", topic, "--to", str(tmp_path / "two"),
       *rng_args, "--until", str(hi))
    assert (tmp_path / "one").read_bytes() == (tmp_path / "two").read_bytes()
    header, parts = read_recording(tmp_path / "one")
    assert header["range"] == {"from_ms": lo, "to_ms": hi}
    assert sum(len(r) for r in parts.values()) == 160 * 2
    assert all(lo <= r.timestamp <= hi for recs in parts.values() for r in recs)

    from_file, from_topic = tmp_path / "file.jsonl", tmp_path / "topic.jsonl"
    ia(infra, topic_prefix, "replay", "--input", str(tmp_path / "one"), "--output",
       str(from_file))
    ia(infra, topic_prefix, "replay", "--topic", topic, *rng_args, "--to", str(hi),
       "--output", str(from_topic))
    assert from_file.read_bytes() == from_topic.read_bytes()
    rows = [json.loads(line) for line in from_file.read_text().splitlines()]
    assert len(rows) == 320 and max(r["anomaly_score"] for r in rows
                                    if r["entity"] == "rec-b") >= 0.8
