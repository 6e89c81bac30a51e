"""Recorded topic slices: raw Kafka records in a file that replay and backtest read.

A recording is JSON Lines.  The first line is a header, every other line one
record, in (partition, offset) order::

    {"ia_recording":1,"topic":"ia.telemetry","wire_format":"json","range":{...}}
    {"p":0,"o":41,"t":1764230400000,"k":"web-1","v":"{\\"entity\\":\\"web-1\\",...}"}

``k`` and ``v`` are the key and value as text when they are UTF-8, otherwise
``k64`` / ``v64`` hold them in base64 (Avro values), and ``null`` stands for
a missing key or value.  Records keep their partition, offset and broker
timestamp, so replaying a recording is the same computation as replaying the
slice straight from Kafka (same order, same validation), byte for byte.

Nothing here talks to Kafka (see :mod:`ia.offline.topic_slice`).
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORMAT_VERSION = 1
HEADER_KEY = "ia_recording"


@dataclass(frozen=True, slots=True)
class RawRecord:
    """One Kafka record as the broker returned it."""

    partition: int
    offset: int
    timestamp: int  # broker timestamp (ms), -1 when the record has none
    key: bytes | None
    value: bytes | None


# Records of one topic slice, per partition, each list in offset order.
Partitions = dict[int, list[RawRecord]]


def _put(out: dict[str, Any], name: str, data: bytes | None) -> None:
    if data is None:
        out[name] = None
        return
    try:
        out[name] = data.decode("utf-8")
    except UnicodeDecodeError:
        out[name + "64"] = base64.b64encode(data).decode("ascii")


def _get(obj: dict[str, Any], name: str) -> bytes | None:
    if name + "64" in obj:
        return base64.b64decode(obj[name + "64"])
    text = obj.get(name)
    return None if text is None else text.encode("utf-8")


def record_line(rec: RawRecord) -> str:
    obj: dict[str, Any] = {"p": rec.partition, "o": rec.offset, "t": rec.timestamp}
    _put(obj, "k", rec.key)
    _put(obj, "v", rec.value)
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))


def parse_record(line: str) -> RawRecord:
    obj = json.loads(line)
    return RawRecord(int(obj["p"]), int(obj["o"]), int(obj.get("t", -1)), _get(obj, "k"),
                     _get(obj, "v"))


def write_recording(path: Path, topic: str, wire_format: str, partitions: Partitions,
                    slice_range: dict[str, Any]) -> int:
    """Write a recording; no wall-clock time goes in, so the same slice gives the same file."""
    header = {HEADER_KEY: FORMAT_VERSION, "topic": topic, "wire_format": wire_format,
              "range": slice_range,
              "partitions": {str(p): [recs[0].offset, recs[-1].offset + 1]
                             for p, recs in sorted(partitions.items()) if recs}}
    n = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as fh:
        fh.write(json.dumps(header, sort_keys=True, separators=(",", ":")) + "\n")
        for p in sorted(partitions):
            for rec in partitions[p]:
                fh.write(record_line(rec) + "\n")
                n += 1
    return n


def is_recording(path: Path) -> bool:
    """True if ``path`` starts with a recording header (a telemetry line never does:
    ``TelemetryEvent`` forbids unknown fields)."""
    with path.open(encoding="utf-8") as fh:
        first = fh.readline()
    try:
        obj = json.loads(first)
    except ValueError:
        return False
    return isinstance(obj, dict) and HEADER_KEY in obj


def read_recording(path: Path) -> tuple[dict[str, Any], Partitions]:
    """The header and the records of a recording, per partition in offset order."""
    with path.open(encoding="utf-8") as fh:
        header = json.loads(fh.readline())
        if not isinstance(header, dict) or header.get(HEADER_KEY) != FORMAT_VERSION:
            raise ValueError(f"{path}: not an ia recording (version {FORMAT_VERSION})")
        out: Partitions = {}
        for line in _lines(fh):
            rec = parse_record(line)
            out.setdefault(rec.partition, []).append(rec)
    for recs in out.values():
        recs.sort(key=lambda r: r.offset)
    return header, out


def _lines(lines: Iterable[str]) -> Iterator[str]:
    return (line for line in lines if line.strip())
