"""Offline replay: the worker's decision code on a file, without Kafka or Redis.

The same :class:`~decisions.engine.DecisionEngine` runs with an in-memory
feature store and guard store, and with event time as its clock, so the same
input always gives byte-identical output.  Input is JSON lines of
``TelemetryEvent`` or a NAB-style CSV (``timestamp,value``, rows taken as a
stream in file order).  Output is one JSON line per input event.
"""

from __future__ import annotations

import asyncio
import csv
import datetime as dt
import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import TextIO

from ia.decisions.engine import DecisionEngine
from ia.decisions.guards import MemoryGuardStore
from ia.decisions.policy import Policy
from ia.features.store import MemoryFeatureStore
from ia.schemas.models import Decision, TelemetryEvent

OBSERVE_ONLY = "version: 1\nrules: []\n"
BATCH = 500


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
        for line in fh:
            if line.strip():
                yield TelemetryEvent.model_validate_json(line)


def output_line(d: Decision) -> str:
    return json.dumps({
        "entity": d.entity, "metric": d.metric, "ts": d.ts, "value": d.value,
        "anomaly_score": d.anomaly_score, "confidence": d.confidence,
        "action": d.action.model_dump(mode="json") if d.action else None,
        "mode": d.mode.value, "decision_id": d.decision_id, "drift": d.drift.value,
        "explanation": d.explanation.summary if d.explanation else "",
    }, separators=(",", ":"), ensure_ascii=False)


def replay_engine(policy: Policy | None = None) -> DecisionEngine:
    p = policy or Policy.from_text(OBSERVE_ONLY, "<observe-only>")
    return DecisionEngine(lambda: p, MemoryFeatureStore(), MemoryGuardStore(),
                          clock=lambda ev: ev.ts)


async def replay_events(events: Iterable[TelemetryEvent], out: TextIO,
                        policy: Policy | None = None) -> int:
    """Decide every event in order (in batches, as the worker does); write one line each."""
    engine = replay_engine(policy)
    count, batch = 0, []
    for ev in events:
        batch.append(ev)
        if len(batch) >= BATCH:
            count += _write(await engine.process(batch), out)
            batch = []
    if batch:
        count += _write(await engine.process(batch), out)
    return count


def _write(decisions: list[Decision], out: TextIO) -> int:
    out.writelines(output_line(d) + "\n" for d in decisions)
    return len(decisions)


def replay_file(input_path: Path, output_path: Path, fmt: str = "jsonl",
                entity: str | None = None, metric: str | None = None,
                policy: Policy | None = None) -> int:
    if fmt == "nab-csv":
        events: Iterable[TelemetryEvent] = read_nab_csv(
            input_path, entity or input_path.stem, metric or "value")
    else:
        events = read_jsonl(input_path)
    with output_path.open("w", encoding="utf-8", newline="\n") as out:
        return asyncio.run(replay_events(events, out, policy))
