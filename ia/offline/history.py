"""History to replay or backtest: telemetry events in one deterministic order.

Every reader is here, behind one type, :class:`History`: JSON Lines of
``TelemetryEvent``, one NAB-style CSV (``timestamp,value``, rows taken as a
stream in file order), a directory of them (the NAB layout
``data/<category>/<file>.csv``), a recording (:mod:`ia.offline.recording`) and
a topic slice read from Kafka (:mod:`ia.offline.topic_slice`).
:func:`load_history` picks one from ``--input`` or ``--topic``.

Files are read as a stream, afresh on every pass, so a backtest can run two
variants over a history larger than memory.  Kafka records are validated
exactly as the worker validates them (bad ones are counted as dead letters, by
reason), with the record's broker timestamp standing in for the worker's clock
so the "too far in the future" check gives the same answer on every replay.
Partitions and NAB files are merged by event time; each keeps its own order
(for a partition, the order the owning worker saw), and ties go to the lower
partition or the earlier file, so the same input always gives the same sequence.
"""

from __future__ import annotations

import csv
import datetime as dt
import heapq
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import ValidationError

from ia.core.errors import IaError, UsageError
from ia.core.settings import KafkaSettings, Settings
from ia.offline.recording import Partitions, RawRecord, is_recording, read_recording
from ia.schemas.models import DeadLetter, TelemetryEvent
from ia.schemas.validation import validate_record

if TYPE_CHECKING:
    from ia.offline.topic_slice import SliceSpec

FORMATS = ("auto", "jsonl", "recording", "nab-csv", "nab")


class HistoryError(IaError):
    """The input cannot be read as history (message says why)."""


# A pass over the history; counts the records it skips as dead letters by reason.
Reader = Callable[[Counter[str]], Iterator[TelemetryEvent]]


@dataclass
class History:
    """Telemetry events in order, read afresh each time the history is iterated.

    ``dead_letters`` counts the records the last pass skipped as invalid.
    """

    read: Reader
    source: dict[str, Any]
    dead_letters: Counter[str] = field(default_factory=Counter)

    def __iter__(self) -> Iterator[TelemetryEvent]:
        self.dead_letters.clear()
        return self.read(self.dead_letters)

    def describe(self) -> dict[str, Any]:
        return {**self.source, "dead_letters": dict(sorted(self.dead_letters.items()))}


# --------------------------------------------------------------------------- files


def _nab_ms(stamp: str) -> int:
    """NAB timestamps are naive ``YYYY-MM-DD HH:MM:SS``; read them as UTC."""
    return int(dt.datetime.fromisoformat(stamp.strip()).replace(tzinfo=dt.UTC).timestamp()
               * 1000)


def read_nab_csv(path: Path, entity: str, metric: str) -> Iterator[TelemetryEvent]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        rows = csv.reader(fh)
        header = [h.strip() for h in next(rows, [])]
        t_col, v_col = header.index("timestamp"), header.index("value")
        for i, row in enumerate(r for r in rows if r):
            # Row numbers make ids unique even where a file repeats a timestamp.
            yield TelemetryEvent(entity=entity, metric=metric, value=float(row[v_col]),
                                 ts=_nab_ms(row[t_col]), event_id=f"{entity}:{metric}:{i}")


def read_jsonl(path: Path) -> Iterator[TelemetryEvent]:
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                yield TelemetryEvent.model_validate_json(line)
            except ValueError as exc:
                raise HistoryError(f"{path}:{number}: not JSON Lines of telemetry events: "
                                   f"{_first_problem(exc)}") from None


def _first_problem(exc: ValueError) -> str:
    """The first thing wrong with a line, where (``field: message``) if pydantic says."""
    if isinstance(exc, ValidationError) and exc.errors():
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        return f"{where}: {first['msg']}" if where else first["msg"]
    return str(exc).splitlines()[0]


def nab_files(root: Path) -> list[Path]:
    """CSV files of a NAB-style tree: ``root/data/*/*.csv``, ``root/*/*.csv`` or
    ``root/*.csv``, sorted."""
    for pattern in ("data/*/*.csv", "*/*.csv", "*.csv"):
        found = sorted(root.glob(pattern))
        if found:
            return found
    raise HistoryError(f"{root}: no CSV files (expected data/<category>/<file>.csv)")


def from_nab_dir(root: Path) -> History:
    """Every file as one entity (its stem), metric ``value``, merged by event time."""
    files = nab_files(root)
    stems = [f.stem for f in files]
    if len(set(stems)) != len(stems):
        raise HistoryError(f"{root}: two files share a name; entities must be unique")

    def read(_dead: Counter[str]) -> Iterator[TelemetryEvent]:
        return heapq.merge(*(read_nab_csv(f, f.stem, "value") for f in files),
                           key=lambda ev: ev.ts)

    return History(read, {"input": str(root), "format": "nab", "files": len(files)})


def _file_format(path: Path, fmt: str) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "nab"
    if path.suffix == ".csv":
        return "nab-csv"
    return "recording" if is_recording(path) else "jsonl"


def from_file(path: Path, fmt: str = "auto", entity: str | None = None,
              metric: str | None = None) -> History:
    """History in a file or directory; ``fmt`` ``auto`` tells the format by looking."""
    kind = _file_format(path, fmt)
    if kind == "nab":
        return from_nab_dir(path)
    if kind == "recording":
        return from_recording(path)
    source = {"input": str(path), "format": kind}
    if kind == "nab-csv":
        name, field_name = entity or path.stem, metric or "value"
        return History(lambda _dead: read_nab_csv(path, name, field_name), source)
    return History(lambda _dead: read_jsonl(path), source)


# --------------------------------------------------------------------------- Kafka records


def _decode(rec: RawRecord, fmt: str, topic: str, dead: Counter[str]
            ) -> TelemetryEvent | None:
    out = validate_record(rec.value, fmt=fmt, topic=topic, partition=rec.partition,
                          offset=rec.offset,
                          now_ms=rec.timestamp if rec.timestamp >= 0 else None)
    if isinstance(out, DeadLetter):
        dead[out.reason] += 1
        return None
    return out


def _valid(records: Iterable[RawRecord], fmt: str, topic: str, dead: Counter[str]
           ) -> Iterator[TelemetryEvent]:
    for rec in records:
        ev = _decode(rec, fmt, topic, dead)
        if ev is not None:
            yield ev


def events_in_order(partitions: Partitions, fmt: str, topic: str, dead: Counter[str]
                    ) -> Iterator[TelemetryEvent]:
    """The valid events of ``partitions`` merged by event time (invalid ones counted
    in ``dead``)."""
    # heapq.merge keeps each input's order and prefers earlier inputs on ties.
    return heapq.merge(*(_valid(partitions[p], fmt, topic, dead) for p in sorted(partitions)),
                       key=lambda ev: ev.ts)


def from_partitions(partitions: Partitions, fmt: str, topic: str,
                    source: dict[str, Any]) -> History:
    counts = {str(p): len(recs) for p, recs in sorted(partitions.items())}
    return History(lambda dead: events_in_order(partitions, fmt, topic, dead),
                   {**source, "records": counts})


def from_recording(path: Path) -> History:
    try:
        header, partitions = read_recording(path)
    except ValueError as exc:
        raise HistoryError(str(exc)) from None
    return from_partitions(partitions, header["wire_format"], header["topic"],
                           {"recording": str(path), "topic": header["topic"],
                            "range": header.get("range", {})})


def from_topic(kafka: KafkaSettings, spec: SliceSpec, fmt: str) -> History:
    """A slice of a topic, read without joining or committing to any consumer group."""
    # Imported here: reading files needs no Kafka client.
    from ia.offline.topic_slice import read_slice

    partitions = read_slice(kafka, spec)
    return from_partitions(partitions, fmt, spec.topic,
                           {"topic": spec.topic, "range": spec.describe()})


# --------------------------------------------------------------------------- either


def load_history(settings: Settings, input_path: Path | None, fmt: str = "auto",
                 entity: str | None = None, metric: str | None = None, *,
                 topic: str | None = None, from_time: str | None = None,
                 to_time: str | None = None, from_offsets: str | None = None,
                 to_offsets: str | None = None) -> History:
    """History from ``--input`` or from ``--topic`` with its range."""
    if bool(input_path) == bool(topic):
        raise UsageError("give either --input FILE or --topic TOPIC")
    if input_path is not None:
        if from_time or to_time or from_offsets or to_offsets:
            raise UsageError("--from/--to/--from-offsets/--to-offsets need --topic")
        return from_file(input_path, fmt, entity, metric)
    from ia.offline.topic_slice import SliceSpec, require_kafka

    assert topic is not None
    spec = SliceSpec.from_options(topic, from_time, to_time, from_offsets, to_offsets)
    return from_topic(require_kafka(settings), spec, settings.wire_format)
