"""Faust apps process every record exactly once on the embedded broker, though it may serve
a later batch of a partition before an earlier one (see :mod:`ia.core.gaps`).

The app under test is ``ia bench passthrough``: the worker's plumbing (``make_app``, the
consumer every Faust app of ours reads through) with a trivial agent that copies each
record to the decisions topic, so the copies show what the app processed.
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

from ia.bench.load import producer, recount
from ia.core.kafka import ensure_topics
from ia.core.settings import Topics
from ia.runtime.embedded import free_port
from tests.support import IaProcess, ia_env, wait_until

ROOT = Path(__file__).resolve().parent.parent
POLICY = ROOT / "ia" / "policies" / "demo.yaml"
PER_PRODUCER = 6_000


class SkippingPassthrough(IaProcess):
    """:mod:`tests.skipping_passthrough` (the pass-through app behind a skipping broker)."""

    def start(self) -> SkippingPassthrough:
        out = open(self.log, "ab")  # noqa: SIM115  # owned by the child
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.skipping_passthrough"],
                                     env={**os.environ, **self.env}, cwd=ROOT, stdout=out,
                                     stderr=subprocess.STDOUT)
        out.close()
        return self


def _json(rec: dict) -> bytes:
    return json.dumps(rec, separators=(",", ":")).encode()


def _env(infra, prefix: str, metrics_port: int, **extra: str) -> dict[str, str]:
    return ia_env(infra, prefix, POLICY, IA_METRICS_PORT=str(metrics_port), **extra)


def _gaps(metrics_port: int, topic: str) -> dict[str, float]:
    """``ia_offset_gaps_total`` of ``topic`` by outcome, from the app's metrics endpoint."""
    text = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).text
    return {s.labels["outcome"]: s.value
            for family in text_string_to_metric_families(text) if family.name == "ia_offset_gaps"
            for s in family.samples
            if s.name == "ia_offset_gaps_total" and s.labels["topic"] == topic}


def _produce(bootstrap: str, topic: str, tag: str, n: int) -> None:
    # linger 0: many small produce requests, so the two producers' batches interleave
    # in every partition (the case in which the broker can serve them out of order).
    p = producer(bootstrap, linger_ms=0)
    rng = random.Random(tag)
    for i in range(n):
        p.produce(topic, key=f"k{rng.randrange(500)}".encode(),
                  value=_json({"event_id": f"{tag}-{i}"}))
        if i % 200 == 0:
            p.poll(0)
    assert p.flush(60) == 0


def _copied(bootstrap: str, sink: str, wanted: set[str]) -> bool:
    return recount(bootstrap, [sink], wanted).found == len(wanted)


def test_a_faust_app_processes_every_record_of_two_producers_exactly_once(
        infra, topic_prefix, tmp_path):
    topics = Topics(topic_prefix)
    port = free_port()
    ensure_topics(infra.kafka, topics.all(), 4)
    app = IaProcess(["bench", "passthrough"], _env(infra, topic_prefix, port),
                    tmp_path / "passthrough.log").start()
    try:
        # The app has joined its group and reads: no rebalance while the producers write.
        p = producer(infra.kafka)
        p.produce(topics.telemetry, value=_json({"event_id": "ready"}))
        p.flush(10)
        wait_until(lambda: _copied(infra.kafka, topics.decisions, {"ready"}), 60,
                   "the app to copy its first record")
        writers = [threading.Thread(target=_produce,
                                    args=(infra.kafka, topics.telemetry, f"p{k}", PER_PRODUCER))
                   for k in range(2)]
        for w in writers:
            w.start()
        for w in writers:
            w.join(120)
        wanted = {f"p{k}-{i}" for k in range(2) for i in range(PER_PRODUCER)} | {"ready"}
        wait_until(lambda: _copied(infra.kafka, topics.decisions, wanted), 120,
                   "every record copied", every_s=1.0)
        copies = recount(infra.kafka, [topics.decisions], wanted)
        gaps = _gaps(port, topics.telemetry)
        print(f"offset gaps in {topics.telemetry}: {gaps}")
    finally:
        app.stop()
    assert copies.records == copies.distinct_ids == len(wanted), "a record was processed twice"
    assert gaps.get("accepted", 0) == 0, "the guard gave up on a gap"
    assert gaps.get("refetched", 0) == gaps.get("opened", 0)


def test_a_faust_app_fetches_a_skipped_range_again(infra, topic_prefix, tmp_path):
    """The app's consumer is moved past offsets 0..11 of a partition: it fetches them
    again, and every record is processed once, none past the gap before the gap is filled."""
    topics = Topics(topic_prefix)
    port = free_port()
    ensure_topics(infra.kafka, topics.all(), 1)
    p = producer(infra.kafka, linger_ms=50)
    for batch in range(3):
        for i in range(10):
            p.produce(topics.telemetry, value=_json({"event_id": f"{batch}-{i}"}), partition=0)
        p.flush(10)
    wanted = {f"{b}-{i}" for b in range(3) for i in range(10)}
    app = SkippingPassthrough([], _env(infra, topic_prefix, port, IA_TEST_SKIP="12"),
                              tmp_path / "passthrough.log").start()
    try:
        wait_until(lambda: _copied(infra.kafka, topics.decisions, wanted), 60,
                   "every record copied")
        wait_until(lambda: _gaps(port, topics.telemetry).get("refetched") == 1, 10,
                   "the gap counted as refetched")
        copies = recount(infra.kafka, [topics.decisions], wanted)
        gaps = _gaps(port, topics.telemetry)
    finally:
        app.stop()
        print(app.tail())
    assert copies.records == copies.distinct_ids == len(wanted)
    assert gaps == {"opened": 1.0, "refetched": 1.0}
