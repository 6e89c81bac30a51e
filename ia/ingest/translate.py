"""``ia ingest`` minus Kafka: records of the OTLP and CloudEvents topics -> telemetry
events and dead letters.

:mod:`ia.streams.ingest` hands it batches of raw records and publishes what it returns
(events keyed by entity onto the telemetry topic, dead letters onto the DLQ) before
the batch is acknowledged.  A record that cannot be decoded is a dead letter with its
``undecodable_*`` reason; a record some of whose points are refused has its good
points sent and is a dead letter too, with the first refusal's reason and a count of
each (so nothing is dropped without a trace).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from ia.core import metrics
from ia.ingest import cloudevents, otlp
from ia.ingest.cumulative import CumulativeStore
from ia.ingest.mapping import Refused, Rules
from ia.schemas.models import DeadLetter, TelemetryEvent
from ia.schemas.validation import dead_letter


@dataclass(frozen=True)
class Record:
    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int
    headers: object = None
    ts_ms: int | None = None


@dataclass
class Translated:
    events: list[TelemetryEvent] = field(default_factory=list)
    dead_letters: list[tuple[bytes | None, DeadLetter]] = field(default_factory=list)


def summary(refused: list[Refused]) -> str:
    """``no_entity x3 (first: ...); not_finite x1`` for a dead letter's error."""
    counts = Counter(r.reason for r in refused)
    first = {}
    for r in refused:
        first.setdefault(r.reason, r.detail)
    return "; ".join(f"{reason} x{n} (first: {first[reason]})" for reason, n in counts.items())


class Translator:
    def __init__(self, rules: Rules, store: CumulativeStore, otlp_encoding: str = "auto"):
        self.rules, self.store, self.encoding = rules, store, otlp_encoding

    def _dead(self, out: Translated, rec: Record, refused: list[Refused], input_: str) -> None:
        for r in refused:
            metrics.INGEST_REFUSED.labels(input_, r.reason).inc()
        out.dead_letters.append((rec.key, dead_letter(rec.value or b"", refused[0].reason,
                                                      summary(refused), rec.topic,
                                                      rec.partition, rec.offset)))

    async def otlp(self, records: list[Record]) -> Translated:
        """The events of a batch of OTLP records; cumulative points are finished in one
        round trip to the store for the whole batch."""
        out = Translated()
        converted: list[tuple[Record, otlp.Converted]] = []
        for rec in records:
            try:
                req = otlp.decode(rec.value or b"", self.encoding)
            except Refused as exc:
                self._dead(out, rec, [exc], "otlp")
                continue
            converted.append((rec, otlp.convert(req, self.rules)))
        pending = [p for _, c in converted for p in c.pending]
        answers = iter(await self.store.previous([p.point for p in pending]))
        for rec, c in converted:
            for p in c.pending:
                _status, prev = next(answers)
                otlp.finish(self.rules, p, prev, c)
            out.events.extend(c.events)
            if c.refused:
                self._dead(out, rec, c.refused, "otlp")
        return out

    def cloudevents(self, records: list[Record]) -> Translated:
        out = Translated()
        for rec in records:
            try:
                out.events.append(cloudevents.convert(rec.headers, rec.key, rec.value,  # type: ignore[arg-type]
                                                      rec.ts_ms, self.rules))
            except Refused as exc:
                self._dead(out, rec, [exc], "cloudevents")
        return out
