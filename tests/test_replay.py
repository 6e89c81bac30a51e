"""Offline replay: same code as the worker, no Kafka/Redis, byte-identical output."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

from ia.decisions.policy import Policy
from ia.offline.replay import replay_file

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


def test_jsonl_replay_is_byte_identical_and_complete(tmp_path: Path) -> None:
    n = telemetry(tmp_path / "in.jsonl")
    policy = Policy.from_text(POLICY)
    assert replay_file(tmp_path / "in.jsonl", tmp_path / "a.jsonl", policy=policy) == n
    replay_file(tmp_path / "in.jsonl", tmp_path / "b.jsonl", policy=policy)
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
