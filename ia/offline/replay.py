"""``ia replay``: history through the worker's decision code, in isolation.

History is any :class:`~ia.offline.history.History` (a file, a NAB directory, a
recording or a topic slice), decided by the one offline runner
(:mod:`ia.offline.run`): memory state, event time as its clock, no Redis
connection ever made (production keys cannot be touched), no actuator.  The
same history gives byte-identical output.  Decisions go to a file, one compact
JSON line per event or (``full``) the whole ``Decision``, or to a replay topic;
a topic an actuator could consume (any ``*.decisions``) or any production topic
is refused.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TextIO

from ia.core.errors import IaError, UsageError
from ia.core.settings import KafkaSettings, Settings, Topics
from ia.offline.history import History
from ia.offline.run import Variant, decide
from ia.offline.topic_slice import require_kafka
from ia.schemas.models import Decision
from ia.schemas.serde import encode


class ReplayError(IaError):
    """Replayed decisions that cannot be delivered where they were asked to go."""


def output_line(d: Decision) -> str:
    """The compact form of a decision: what was decided, without the features."""
    return json.dumps({
        "entity": d.entity, "metric": d.metric, "ts": d.ts, "value": d.value,
        "anomaly_score": d.anomaly_score, "confidence": d.confidence,
        "action": d.action.model_dump(mode="json") if d.action else None,
        "mode": d.mode.value, "decision_id": d.decision_id, "drift": d.drift.value,
        "explanation": d.explanation.summary if d.explanation else "",
    }, separators=(",", ":"), ensure_ascii=False)


def check_output_topic(name: str, topics: Topics) -> None:
    """Refuse topics that production reads: decisions there could reach an actuator."""
    protected = {*topics.all(), topics.decisions_shadow}
    if name in protected or name.endswith(".decisions"):
        raise UsageError(f"refusing to publish replayed decisions to {name!r}: an actuator or "
                         f"the pipeline may read it; use e.g. {topics.prefix}.decisions.replay")


class Sink(Protocol):
    def write(self, decisions: list[Decision]) -> None: ...

    def close(self) -> None: ...


class FileSink:
    def __init__(self, out: TextIO, full: bool) -> None:
        self.out = out
        self.line: Callable[[Decision], str] = (lambda d: d.model_dump_json()) if full \
            else output_line

    def write(self, decisions: list[Decision]) -> None:
        self.out.writelines(self.line(d) + "\n" for d in decisions)

    def close(self) -> None:
        self.out.flush()


class TopicSink:
    """Publishes decisions keyed by entity; every record is confirmed before close returns."""

    def __init__(self, kafka: KafkaSettings, topic: str, fmt: str) -> None:
        from ia.core.kafka import producer

        self.topic, self.fmt = topic, fmt
        self.errors: list[str] = []
        self.producer = producer(kafka, {"acks": "all", "enable.idempotence": True,
                                         "linger.ms": 20})

    def _delivered(self, err: Any, _msg: Any) -> None:
        if err is not None:
            self.errors.append(str(err))

    def write(self, decisions: list[Decision]) -> None:
        for d in decisions:
            self.producer.produce(self.topic, key=d.entity.encode(), value=encode(d, self.fmt),
                                  on_delivery=self._delivered)
            self.producer.poll(0)

    def close(self) -> None:
        left = self.producer.flush(60)
        if left or self.errors:
            raise ReplayError(f"{left} decision(s) unconfirmed, errors: {self.errors[:3]}")


@dataclass(frozen=True)
class Replayed:
    """What a replay did: events decided, how many with an action, where they went."""

    events: int
    acted: int
    dead_letters: int
    target: str


async def _replay(history: History, variant: Variant, sink: Sink) -> tuple[int, int]:
    n = acted = 0
    async for batch in decide(history, variant):
        sink.write(batch)
        n += len(batch)
        acted += sum(d.action is not None for d in batch)
    sink.close()
    return n, acted


def replay(settings: Settings, history: History, variant: Variant, *,
           output_path: Path | None = None, output_topic: str | None = None,
           full: bool = False) -> Replayed:
    """Decide ``history`` with ``variant`` and write the decisions to one place."""
    if bool(output_path) == bool(output_topic):
        raise UsageError("give either --output FILE or --output-topic TOPIC")
    if output_topic:
        from ia.core.kafka import ensure_topics

        check_output_topic(output_topic, settings.topics)
        kafka = require_kafka(settings)
        ensure_topics(kafka, [output_topic], settings.topic_partitions)
        n, acted = asyncio.run(_replay(history, variant, TopicSink(
            kafka, output_topic, settings.wire_format)))
    else:
        assert output_path is not None
        with output_path.open("w", encoding="utf-8", newline="\n") as out:
            n, acted = asyncio.run(_replay(history, variant, FileSink(out, full)))
    return Replayed(n, acted, sum(history.dead_letters.values()),
                    str(output_path or output_topic))
