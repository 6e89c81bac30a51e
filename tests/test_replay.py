"""Offline replay: same code as the worker, no Kafka/Redis, byte-identical output."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from ia.core.errors import UsageError
from ia.core.settings import Settings
from ia.decisions.policy import Policy
from ia.offline.history import HistoryError, from_file, load_history
from ia.offline.replay import replay
from ia.offline.run import Variant

POLICY = """\
version: 1
rules:
  - name: page
    when: {min_score: 0.8}
    action: {type: log, target: "{entity}"}
    mode: shadow
"""
FIELDS = {"entity", "metric", "ts", "value", "anomaly_score", "confidence", "action", "mode",
          "decision_id"}


def telemetry(path: Path) -> int:
    rng = random.Random(3)
    lines = []
    for i in range(400):
        for entity in ("web-1", "web-2"):
            v = 100 + rng.gauss(0, 2) + (300 if (entity, i) == ("web-2", 350) else 0)
            lines.append(json.dumps({"entity": entity, "metric": "latency_ms", "value": v,
                                     "ts": 1_700_000_000_000 + i * 10_000}))
    path.write_text("\n".join(lines) + "\n")
    return len(lines)


def replay_file(src: Path, out: Path, policy: Policy, full: bool = False) -> int:
    variant = Variant("test", "<test>", policy)
    return replay(Settings(), from_file(src), variant, output_path=out, full=full).events


def test_jsonl_replay_is_byte_identical_and_complete(tmp_path: Path) -> None:
    n = telemetry(tmp_path / "in.jsonl")
    policy = Policy.from_text(POLICY)
    assert replay_file(tmp_path / "in.jsonl", tmp_path / "a.jsonl", policy) == n
    replay_file(tmp_path / "in.jsonl", tmp_path / "b.jsonl", policy)
    a = (tmp_path / "a.jsonl").read_bytes()
    assert a == (tmp_path / "b.jsonl").read_bytes()
    rows = [json.loads(line) for line in a.decode().splitlines()]
    assert len(rows) == n and all(set(r) >= FIELDS for r in rows)
    acted = [r for r in rows if r["action"]]
    assert [(r["entity"], r["value"] > 300) for r in acted] == [("web-2", True)]
    assert acted[0]["mode"] == "shadow" and acted[0]["anomaly_score"] >= 0.8


def test_nab_csv_replay_through_the_cli(tmp_path: Path) -> None:
    rng = random.Random(4)
    csv_lines = ["timestamp,value"] + [
        f"2014-04-{1 + i // 288:02d} {(i % 288) // 12:02d}:{(i % 12) * 5:02d}:00,"
        f"{50 + rng.gauss(0, 1):.3f}" for i in range(600)]
    src = tmp_path / "series.csv"
    src.write_text("\n".join(csv_lines) + "\n")
    outs = []
    for name in ("one", "two"):
        out = tmp_path / f"{name}.jsonl"
        subprocess.run([sys.executable, "-m", "ia.cli", "replay", "--input", str(src),
                        "--output", str(out), "--format", "nab-csv", "--entity", "m1",
                        "--metric", "temp"], check=True, capture_output=True)
        outs.append(out.read_bytes())
    assert outs[0] == outs[1]
    rows = [json.loads(line) for line in outs[0].decode().splitlines()]
    assert len(rows) == 600 and {r["entity"] for r in rows} == {"m1"}
    assert len({r["decision_id"] for r in rows}) == 600
    assert rows[0]["ts"] == 1396310400000  # 2014-04-01 00:00:00 read as UTC


def test_full_replay_of_a_file_gives_whole_decisions(tmp_path: Path) -> None:
    n = telemetry(tmp_path / "in.jsonl")
    policy = Policy.from_text(POLICY)
    replay_file(tmp_path / "in.jsonl", tmp_path / "compact.jsonl", policy)
    replay_file(tmp_path / "in.jsonl", tmp_path / "full.jsonl", policy, full=True)
    compact = [json.loads(line) for line in (tmp_path / "compact.jsonl").read_text().splitlines()]
    full = [json.loads(line) for line in (tmp_path / "full.jsonl").read_text().splitlines()]
    assert len(full) == n
    assert [d["decision_id"] for d in full] == [r["decision_id"] for r in compact]
    assert all("rule_trace" in d and "features" in d for d in full)
    assert {d["policy_version"] for d in full} == {policy.version}


def test_observe_only_decides_nothing_with_a_fixed_version() -> None:
    observe = Policy.observe_only()
    assert observe is Policy.observe_only()
    assert observe.doc.rules == []
    # The hash of the packaged file's bytes; it is in every replayed decision.
    assert observe.version == "7f2c43106364"


def test_history_is_read_afresh_on_every_pass(tmp_path: Path) -> None:
    n = telemetry(tmp_path / "in.jsonl")
    history = from_file(tmp_path / "in.jsonl")
    first = [ev.model_dump_json() for ev in history]
    assert len(first) == n and [ev.model_dump_json() for ev in history] == first


def test_bad_input_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "bad.jsonl").write_text('{"entity": "a"}\n')
    with pytest.raises(HistoryError, match=r"bad\.jsonl:1: not JSON Lines of telemetry events: "
                                           r"metric: Field required"):
        list(from_file(tmp_path / "bad.jsonl"))
    good = '{"entity": "a", "metric": "m", "value": 1, "ts": 1700000000000}\n'
    (tmp_path / "third.jsonl").write_text(good + "\n" + "not json\n")
    with pytest.raises(HistoryError, match=r"third\.jsonl:3: .*Invalid JSON"):
        list(from_file(tmp_path / "third.jsonl"))
    with pytest.raises(UsageError, match="need --topic"):
        load_history(Settings(), tmp_path / "bad.jsonl", from_time="-1h")
    with pytest.raises(UsageError, match="either --input"):
        load_history(Settings(), None)
    proc = subprocess.run([sys.executable, "-m", "ia.cli", "replay", "--input",
                           str(tmp_path / "bad.jsonl"), "--output", str(tmp_path / "o.jsonl")],
                          capture_output=True, text=True)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "not JSON Lines of telemetry events" in proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ia.cli", "replay", "--input",
                           str(tmp_path / "bad.jsonl")], capture_output=True, text=True)
    assert proc.returncode == 2 and "--output FILE or --output-topic" in proc.stderr
