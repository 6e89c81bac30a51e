"""``ia replay --topic``: a topic's history through the decision code, in isolation.

The history is read by :mod:`ia.offline.topic_slice` (own consumer: no group, no
commits) or from a recording, then decided by a fresh engine with in-memory
feature and guard state and event time as its clock
(:func:`ia.offline.backtest.engine_for`): no Redis connection is ever made, so
production keys cannot be touched, and no actuator is involved.  Decisions go
to a file or to a replay topic; a topic an actuator could consume (any
``*.decisions``) or any production topic is refused.  The same history gives
byte-identical output.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from pathlib import Path
from typing import Any, TextIO

import click

from ia.core.settings import Settings, Topics
from ia.core.times import TimeFormatError, parse_time
from ia.decisions.policy import Policy
from ia.offline.backtest import Variant, decide_batches, load_variant
from ia.offline.history import History, from_file, from_topic
from ia.offline.replay import output_line
from ia.schemas.models import Decision
from ia.schemas.serde import encode


class ReplayError(click.ClickException):
    pass


def kafka_bootstrap(settings: Settings) -> str:
    """The broker address; unlike the worker, nothing here needs (or opens) Redis."""
    if not settings.kafka.bootstrap_servers:
        raise click.ClickException('KAFKA_BOOTSTRAP_SERVERS must be set (eval "$(ia up)" '
                                   "starts an embedded broker)")
    return settings.kafka.bootstrap_servers


def slice_spec(topic: str, from_time: str | None = None, to_time: str | None = None,
               from_offsets: str | None = None, to_offsets: str | None = None) -> Any:
    from ia.offline.topic_slice import SliceError, SliceSpec, parse_offsets

    try:
        return SliceSpec(
            topic=topic,
            start_ms=parse_time(from_time) if from_time else None,
            end_ms=parse_time(to_time) if to_time else None,
            from_offsets=parse_offsets(from_offsets) if from_offsets else None,
            to_offsets=parse_offsets(to_offsets) if to_offsets else None)
    except (SliceError, TimeFormatError) as exc:
        raise click.BadParameter(str(exc)) from None


def load_history(settings: Settings, input_path: Path | None, fmt: str,
                 entity: str | None, metric: str | None, **kafka: Any) -> History:
    """History from ``--input`` or from ``--topic`` (with its range options)."""
    from ia.offline.history import HistoryError
    from ia.offline.topic_slice import SliceError

    ranged = [k for k in ("from_time", "to_time", "from_offsets", "to_offsets") if kafka.get(k)]
    if bool(input_path) == bool(kafka.get("topic")):
        raise click.UsageError("give either --input FILE or --topic TOPIC")
    try:
        if input_path is not None:
            if ranged:
                raise click.UsageError("--from/--to/--from-offsets/--to-offsets need --topic")
            return from_file(input_path, fmt, entity, metric)
        bootstrap = kafka_bootstrap(settings)
        spec = slice_spec(kafka["topic"], *(kafka.get(k) for k in
                                            ("from_time", "to_time", "from_offsets",
                                             "to_offsets")))
        return from_topic(bootstrap, spec, settings.wire_format)
    except (HistoryError, SliceError) as exc:
        raise click.ClickException(str(exc)) from None


def check_output_topic(name: str, topics: Topics) -> None:
    """Refuse topics that production reads: decisions there could reach an actuator."""
    protected = {*topics.all(), topics.decisions_shadow}
    if name in protected or name.endswith(".decisions"):
        raise ReplayError(f"refusing to publish replayed decisions to {name!r}: an actuator or "
                          f"the pipeline may read it; use e.g. {topics.prefix}.decisions.replay")


class FileSink:
    def __init__(self, out: TextIO, full: bool) -> None:
        self.out, self.full = out, full

    def write(self, decisions: list[Decision]) -> None:
        line: Callable[[Decision], str] = (lambda d: d.model_dump_json()) if self.full \
            else output_line
        self.out.writelines(line(d) + "\n" for d in decisions)

    def close(self) -> None:
        self.out.flush()


class TopicSink:
    """Publishes decisions keyed by entity; every record is confirmed before close returns."""

    def __init__(self, bootstrap: str, topic: str, fmt: str) -> None:
        from confluent_kafka import Producer

        self.topic, self.fmt = topic, fmt
        self.errors: list[str] = []
        self.producer = Producer({"bootstrap.servers": bootstrap, "acks": "all",
                                  "enable.idempotence": True, "linger.ms": 20})

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


async def _replay(history: History, variant: Variant, sink: FileSink | TopicSink
                  ) -> tuple[int, int]:
    n = acted = 0
    async for batch in decide_batches(history.events, variant):
        sink.write(batch)
        n += len(batch)
        acted += sum(d.action is not None for d in batch)
    return n, acted


def run_replay(settings: Settings, history: History, variant: Variant,
               output_path: Path | None, output_topic: str | None, full: bool) -> None:
    if bool(output_path) == bool(output_topic):
        raise click.UsageError("give either --output FILE or --output-topic TOPIC")
    if output_topic:
        from ia.core.kafka import ensure_topics

        check_output_topic(output_topic, settings.topics)
        bootstrap = kafka_bootstrap(settings)
        ensure_topics(bootstrap, [output_topic], settings.topic_partitions)
        sink: FileSink | TopicSink = TopicSink(bootstrap, output_topic, settings.wire_format)
        n, acted = asyncio.run(_replay(history, variant, sink))
        sink.close()
    else:
        assert output_path is not None
        with output_path.open("w", encoding="utf-8", newline="\n") as out:
            sink = FileSink(out, full)
            n, acted = asyncio.run(_replay(history, variant, sink))
            sink.close()
    dead = sum(history.dead_letters.values())
    click.echo(f"replayed {n} events ({acted} with an action, {dead} dead letters "
               f"skipped) -> {output_path or output_topic}", err=True)


def replay_command(input_path: Path | None, output_path: Path | None, fmt: str,
                   entity: str | None, metric: str | None, policy_file: Path | None,
                   **kafka: Any) -> None:
    settings = Settings()
    history = load_history(settings, input_path, "auto" if fmt == "jsonl" else fmt, entity,
                           metric, **kafka)
    variant = load_variant(policy_file) if policy_file else _observe_only()
    run_replay(settings, history, variant, output_path, kafka.get("output_topic"),
               bool(kafka.get("full")))


@functools.cache
def _observe_only() -> Variant:
    return Variant("observe-only", "<observe-only>",
                   Policy.from_text("version: 1\nrules: []\n", "<observe-only>"))
