"""History to replay or backtest: telemetry events in one deterministic order.

Sources: a topic slice read from Kafka (:mod:`ia.offline.topic_slice`), a recording
of one (:mod:`ia.offline.recording`), JSON Lines of ``TelemetryEvent``, one NAB-style
CSV, or a directory of them (the NAB layout ``data/<category>/<file>.csv``).

Kafka records are validated exactly as the worker validates them (bad ones
are counted as dead letters, by reason), with the record's broker timestamp
standing in for the worker's clock so the "too far in the future" check
gives the same answer on every replay.  Partitions are merged by event time;
each partition keeps its own order (the order the owning worker saw), and
ties go to the lower partition, so the same slice always gives the same
sequence.
"""

from __future__ import annotations

import heapq
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ia.offline.recording import Partitions, RawRecord, is_recording, read_recording
from ia.offline.replay import read_jsonl, read_nab_csv
from ia.schemas.models import DeadLetter, TelemetryEvent
from ia.schemas.validation import validate_record

FORMATS = ("auto", "jsonl", "recording", "nab-csv", "nab")


class HistoryError(ValueError):
    """The input cannot be read as history (message says why)."""


@dataclass
class History:
    events: list[TelemetryEvent]
    source: dict[str, Any]
    dead_letters: Counter[str] = field(default_factory=Counter)

    def describe(self) -> dict[str, Any]:
        return {**self.source, "dead_letters": dict(sorted(self.dead_letters.items()))}


def _decode(rec: RawRecord, fmt: str, topic: str, dead: Counter[str]
            ) -> TelemetryEvent | None:
    out = validate_record(rec.value, fmt=fmt, topic=topic, partition=rec.partition,
                          offset=rec.offset,
                          now_ms=rec.timestamp if rec.timestamp >= 0 else None)
    if isinstance(out, DeadLetter):
        dead[out.reason] += 1
        return None
    return out


def events_in_order(partitions: Partitions, fmt: str, topic: str
                    ) -> tuple[list[TelemetryEvent], Counter[str]]:
    dead: Counter[str] = Counter()
    streams = []
    for p in sorted(partitions):
        decoded = (_decode(r, fmt, topic, dead) for r in partitions[p])
        streams.append([ev for ev in decoded if ev is not None])
    # heapq.merge keeps each input's order and prefers earlier inputs on ties.
    return list(heapq.merge(*streams, key=lambda ev: ev.ts)), dead


def from_partitions(partitions: Partitions, fmt: str, topic: str,
                    source: dict[str, Any]) -> History:
    events, dead = events_in_order(partitions, fmt, topic)
    counts = {str(p): len(recs) for p, recs in sorted(partitions.items())}
    return History(events, {**source, "records": counts}, dead)


def from_recording(path: Path) -> History:
    header, partitions = read_recording(path)
    return from_partitions(partitions, header["wire_format"], header["topic"],
                           {"recording": str(path), "topic": header["topic"],
                            "range": header.get("range", {})})


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
    streams = [list(read_nab_csv(f, f.stem, "value")) for f in files]
    events = list(heapq.merge(*streams, key=lambda ev: ev.ts))
    return History(events, {"input": str(root), "format": "nab", "files": len(files)})


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
    kind = _file_format(path, fmt)
    if kind == "nab":
        return from_nab_dir(path)
    if kind == "recording":
        return from_recording(path)
    source = {"input": str(path), "format": kind}
    if kind == "nab-csv":
        return History(list(read_nab_csv(path, entity or path.stem, metric or "value")),
                       source)
    return History(list(_jsonl(path)), source)


def _jsonl(path: Path) -> Iterator[TelemetryEvent]:
    try:
        yield from read_jsonl(path)
    except ValueError as exc:
        raise HistoryError(f"{path}: not JSON Lines of telemetry events: "
                           f"{str(exc).splitlines()[0]}") from None


def from_topic(bootstrap: str, spec: Any, fmt: str) -> History:
    """A slice of a topic (``spec``: :class:`ia.offline.topic_slice.SliceSpec`), read without
    joining or committing to any consumer group."""
    from ia.offline.topic_slice import read_slice

    partitions = read_slice(bootstrap, spec)
    return from_partitions(partitions, fmt, spec.topic,
                           {"topic": spec.topic, "range": spec.describe()})
