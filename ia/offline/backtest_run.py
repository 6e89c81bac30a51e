"""``ia backtest``: run two variants over one history and write the evidence.

Outputs in ``--out DIR``: ``summary.json`` (the JSON summary of
:func:`ia.offline.backtest.summarize`), ``diff.jsonl`` (every added, removed
or changed decision) and ``report.html`` (:mod:`ia.offline.report`).  All three are
functions of the inputs only: running the same backtest twice gives the same
bytes.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ia.offline.backtest import (
    Labels,
    Row,
    compare,
    load_labels_file,
    summarize,
    windows_from_feedback,
)
from ia.offline.history import History
from ia.offline.run import Variant, decide
from ia.schemas.models import Feedback


@dataclass
class LabelSource:
    path: Path | None = None
    # Feedback records read from the feedback topic (ia.feedback).
    feedback: Sequence[Feedback] | None = None
    feedback_topic: str = ""
    tolerance_ms: int = 300_000


async def _rows(history: History, variant: Variant) -> list[Row]:
    rows: list[Row] = []
    async for batch in decide(history, variant):
        rows.extend(Row.of(d) for d in batch)
    return rows


def decide_rows(history: History, variant: Variant) -> list[Row]:
    return asyncio.run(_rows(history, variant))


def resolve_labels(src: LabelSource, rows: Sequence[Row]) -> Labels | None:
    if src.path is not None:
        return load_labels_file(src.path, rows, src.tolerance_ms)
    if src.feedback is not None:
        return windows_from_feedback(src.feedback, rows, src.tolerance_ms,
                                     f"topic {src.feedback_topic}")
    return None


@dataclass
class BacktestResult:
    summary: dict[str, Any]
    paths: dict[str, Path]


def run_backtest(history: History, baseline: Variant, candidate: Variant,
                 labels_from: LabelSource, out_dir: Path, command: str = "",
                 html: bool = True, max_series: int = 40) -> BacktestResult:
    base_rows = decide_rows(history, baseline)
    cand_rows = decide_rows(history, candidate)
    labels = resolve_labels(labels_from, base_rows)
    changes = compare(base_rows, cand_rows)
    summary = summarize(history.describe(), baseline, candidate, base_rows, cand_rows, labels,
                        changes)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"summary": out_dir / "summary.json", "diff": out_dir / "diff.jsonl"}
    paths["summary"].write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n",
                                encoding="utf-8")
    with paths["diff"].open("w", encoding="utf-8", newline="\n") as fh:
        fh.writelines(json.dumps(c.to_json(), sort_keys=True) + "\n" for c in changes)
    if html:
        from ia.offline.report import ReportInput, render

        paths["report"] = out_dir / "report.html"
        paths["report"].write_text(render(ReportInput(
            summary, baseline, candidate, base_rows, cand_rows, labels, changes, command,
            max_series)), encoding="utf-8")
    return BacktestResult(summary, paths)


def format_summary(summary: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    diff, src = summary["diff"], summary["source"]
    lines = [f"events {src['events']} on {src['entities']} entities; decisions added "
             f"{diff['added']}, removed {diff['removed']}, changed {diff['changed']}"]
    for side in ("baseline", "candidate"):
        s = summary[side]
        line = (f"{side:9} {s['name']}: {s['volume']['actions']} actions, guard "
                f"interventions {sum(s['guard_interventions'].values())}")
        held = {name: sum(modes.values()) for name, modes in s["held_by_windows"].items()}
        if held:
            line += "; held by windows " + ", ".join(f"{n} {k}" for n, k in held.items())
        q = s.get("quality")
        if q:
            line += (f"; precision {q['precision']}, recall {q['recall']} "
                     f"({q['detected_windows']}/{q['windows']} windows), false actions "
                     f"{q['false_actions']}, median time to detect "
                     f"{q['time_to_detect_s']['median']} s")
        lines.append(line)
    return "\n".join(lines)
