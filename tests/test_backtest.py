"""Backtests without Kafka: a known pair of policies gives the known diff; labels give
the right precision, recall, false action rate and time to detect; outputs are stable."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ia.offline.backtest import (
    BacktestError,
    Labels,
    Row,
    compare,
    guard_interventions,
    load_labels_file,
    load_variant,
    quality,
    volume,
    windows_from_json,
)
from ia.offline.run import decide
from ia.schemas.models import Feedback, TelemetryEvent

T0 = 1_700_000_000_000
STEP = 60_000
SPIKE_AT = 400

# Baseline pages on a-* and c-*; the candidate pages on b-* instead of a-*, and on c-*
# with a different action.  Expected: a-1 removed, b-1 added, c-1 changed.
BASELINE = """\
version: 1
rules:
  - name: page-a
    match: {entity: "a-*"}
    when: {min_score: 0.8}
    action: {type: log, target: "{entity}"}
  - name: page-c
    match: {entity: "c-*"}
    when: {min_score: 0.8}
    action: {type: log, target: "{entity}"}
"""
CANDIDATE = """\
version: 1
rules:
  - name: page-b
    match: {entity: "b-*"}
    when: {min_score: 0.8}
    action: {type: log, target: "{entity}"}
  - name: page-c
    match: {entity: "c-*"}
    when: {min_score: 0.8}
    action: {type: webhook, target: "{entity}", params: {url: "http://127.0.0.1:9/x"}}
    mode: needs_approval
"""


def fleet() -> list[TelemetryEvent]:
    """Three quiet series, each with one spike at SPIKE_AT (same time)."""
    rng = random.Random(11)
    events = []
    for i in range(500):
        for entity in ("a-1", "b-1", "c-1"):
            v = 100 + rng.gauss(0, 2) + (400 if i == SPIKE_AT else 0)
            events.append(TelemetryEvent(entity=entity, metric="latency_ms", value=v,
                                         ts=T0 + i * STEP))
    return events


def write_fleet(path: Path) -> None:
    path.write_text("".join(ev.model_dump_json() + "\n" for ev in fleet()))


def rows_for(policy_file: Path, events: list[TelemetryEvent]) -> list[Row]:
    async def run() -> list[Row]:
        out: list[Row] = []
        async for batch in decide(events, load_variant(policy_file)):
            out.extend(Row.of(d) for d in batch)
        return out

    return asyncio.run(run())


@pytest.fixture
def policies(tmp_path: Path) -> tuple[Path, Path]:
    (tmp_path / "baseline.yaml").write_text(BASELINE)
    (tmp_path / "candidate.yaml").write_text(CANDIDATE)
    return tmp_path / "baseline.yaml", tmp_path / "candidate.yaml"


def test_known_pair_of_policies_gives_the_expected_diff(policies: tuple[Path, Path]) -> None:
    events = fleet()
    base, cand = rows_for(policies[0], events), rows_for(policies[1], events)
    changes = compare(base, cand)
    got = sorted((c.kind, c.baseline.entity, c.baseline.ts) for c in changes)
    spike_ts = T0 + SPIKE_AT * STEP
    assert got == [("added", "b-1", spike_ts), ("changed", "c-1", spike_ts),
                   ("removed", "a-1", spike_ts)]
    changed = next(c for c in changes if c.kind == "changed")
    assert (changed.baseline.mode, changed.candidate.mode) == ("auto", "needs_approval")
    assert changed.baseline.action.startswith("log c-1")
    assert changed.candidate.action.startswith("webhook c-1")
    # Same events, same pipeline id: decision ids match production's and each other.
    assert [r.decision_id for r in base] == [r.decision_id for r in cand]
    assert volume(base)["actions"] == volume(cand)["actions"] == 2


def test_backtest_cli_writes_summary_diff_and_report_byte_identically(
        tmp_path: Path, policies: tuple[Path, Path]) -> None:
    write_fleet(tmp_path / "events.jsonl")
    labels = {"a-1": [[T0 + (SPIKE_AT - 2) * STEP, T0 + (SPIKE_AT + 2) * STEP]],
              "b-1": [[T0 + (SPIKE_AT - 2) * STEP, T0 + (SPIKE_AT + 2) * STEP]], "c-1": []}
    (tmp_path / "labels.json").write_text(json.dumps(labels))
    out, names = tmp_path / "out", ("summary.json", "diff.jsonl", "report.html")
    runs = []
    for _ in range(2):
        proc = subprocess.run(
            [sys.executable, "-m", "ia.cli", "backtest", "--baseline", str(policies[0]),
             "--candidate", str(policies[1]), "--input", str(tmp_path / "events.jsonl"),
             "--labels", str(tmp_path / "labels.json"), "--out", str(out)],
            capture_output=True, text=True, check=True)
        assert "added 1, removed 1, changed 1" in proc.stdout, proc.stdout
        runs.append({name: (out / name).read_bytes() for name in names})
    for name in names:
        assert runs[0][name] == runs[1][name], name
    summary = json.loads(runs[0]["summary.json"])
    assert (summary["diff"]["added"], summary["diff"]["removed"], summary["diff"]["changed"]) \
        == (1, 1, 1)
    qb, qc = summary["baseline"]["quality"], summary["candidate"]["quality"]
    # a-1 and b-1 have a window each; c-1 is labelled quiet, so acting on it is false.
    assert (qb["detected_windows"], qb["true_actions"], qb["false_actions"]) == (1, 1, 1)
    assert (qc["detected_windows"], qc["true_actions"], qc["false_actions"]) == (1, 1, 1)
    assert qb["per_entity"]["a-1"]["detected"] == 1 and qc["per_entity"]["b-1"]["detected"] == 1
    assert qb["time_to_detect_s"]["median"] == 2 * STEP / 1000
    diff = [json.loads(line) for line in runs[0]["diff.jsonl"].decode().splitlines()]
    assert sorted(d["kind"] for d in diff) == ["added", "changed", "removed"]
    html = runs[0]["report.html"].decode()
    assert "<script src" not in html and "<link" not in html  # self-contained
    assert html.count("class=\"plotly-graph-div\"") == 1 + 3  # the overview + each series


def row(entity: str, ts: int, acts: bool, mode: str = "auto",
        guards: tuple[str, ...] = ()) -> Row:
    return Row(f"ev-{entity}-{ts}", f"dc-{entity}-{ts}", entity, "m", ts, 1.0, 0.9, 0.9, mode,
               "log x" if acts else None, "r" if acts else None, guards)


def test_quality_against_windows_is_exact() -> None:
    labels = Labels({"e1": [(100, 200), (500, 600)], "e2": []}, "test")
    rows = [row("e1", t, acts=t in (150, 170, 300)) for t in range(0, 1000, 10)]
    rows += [row("e2", t, acts=t == 40) for t in range(0, 100, 10)]
    rows += [row("unlabelled", 5, acts=True)]
    rows += [row("e1", 1000, acts=True, mode="blocked", guards=("cooldown",))]
    q = quality(rows, labels)
    assert (q["windows"], q["detected_windows"], q["missed_windows"]) == (2, 1, 1)
    assert (q["true_actions"], q["false_actions"], q["unjudged_actions"]) == (2, 2, 1)
    assert q["precision"] == 0.5 and q["recall"] == 0.5
    # events outside windows: e1 has 101 events (incl. the blocked one), 22 in windows
    assert q["negative_events"] == (101 - 22) + 10
    assert q["false_action_rate"] == round(2 / 89, 6)
    assert q["time_to_detect_s"]["median"] == 50 / 1000
    assert guard_interventions(rows) == {"cooldown": 1}
    assert volume(rows)["by_mode"] == {"auto": 5, "blocked": 1}


def test_labels_files_nab_windows_and_feedback(tmp_path: Path) -> None:
    nab = {"realKnownCause/nyc_taxi.csv": [["2014-11-01 19:00:00.000000",
                                            "2014-11-02 19:00:00.000000"]]}
    labels = windows_from_json(nab, "nab")
    assert labels.windows == {"nyc_taxi": [(1414868400000, 1414954800000)]}
    rows = [row("e1", 1000, acts=True), row("e1", 9000, acts=True)]
    fb = [Feedback(decision_id="dc-e1-1000", label="true_positive", by="t", at=1),
          Feedback(decision_id="dc-e1-9000", label="false_positive", by="t", at=1),
          Feedback(decision_id="dc-elsewhere", label="useful", by="t", at=1)]
    path = tmp_path / "feedback.jsonl"
    path.write_text("".join(f.model_dump_json() + "\n" for f in fb))
    labels = load_labels_file(path, rows, tolerance_ms=500)
    assert labels.windows == {"e1": [(500, 1500)]}
    assert labels.notes and "1 feedback" in labels.notes[0]
    q = quality(rows, labels)
    assert (q["true_actions"], q["false_actions"], q["precision"]) == (1, 1, 0.5)


def test_config_variant_changes_the_detector(tmp_path: Path) -> None:
    (tmp_path / "p.yaml").write_text(BASELINE)
    (tmp_path / "cfg.yaml").write_text("policy: p.yaml\ndetector: {alert_level: 0.3, "
                                       "level_drift: {threshold: 50}}\n")
    v = load_variant(tmp_path / "cfg.yaml")
    assert v.detector.alert_level == 0.3 and v.detector.level_drift.threshold == 50
    assert v.policy.version == load_variant(tmp_path / "p.yaml").policy.version
    (tmp_path / "bad.yaml").write_text("detector: {alert_levle: 0.3}\n")
    with pytest.raises(BacktestError, match="alert_levle"):
        load_variant(tmp_path / "bad.yaml")


def test_histories_of_different_lengths_are_refused() -> None:
    with pytest.raises(BacktestError):
        compare([row("e", 1, True)], [])
