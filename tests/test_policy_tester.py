"""`ia policy test` and `ia policy check`: rules fired, guards intervening, nothing executed."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from click.testing import CliRunner

from ia.cli import main

T0 = 1_750_000_000_000

POLICY = """\
version: 1
defaults: {cooldown_s: 60}
cost_cap: {max: 8, window_s: 3600}
rules:
  - name: restart
    match: {entity: "svc-*", metric: cpu}
    when: {min_score: 0.8, direction: up}
    autonomy: {auto_above: 0.9, approval_above: 0.7, notify_above: 0.5}
    action: {type: log, target: "{entity}"}
    rate_limit: {max: 3, window_s: 600}
    cost: 3
  - name: page
    match: {metric: latency_ms}
    when: {min_score: 0.9, direction: up}
    action: {type: webhook, target: "{entity}", params: {url: "http://127.0.0.1:9/x"}}
    cooldown_s: 0
    circuit_breaker: {failures: 2, window_s: 60, open_s: 30}
    blast_radius: {max_concurrent: 1}
"""


def scored(entity: str, ts: int, score: float = 0.95, confidence: float | None = None,
           metric: str = "cpu", zscore: float = 5.0) -> dict:
    out = {"entity": entity, "metric": metric, "value": 99.0, "ts": ts, "score": score,
           "features": {"zscore": zscore}}
    if confidence is not None:
        out["confidence"] = confidence
    return out


def write(tmp_path: Path, lines: list[dict | str], policy: str = POLICY) -> tuple[Path, Path]:
    p = tmp_path / "policy.yaml"
    p.write_text(policy)
    e = tmp_path / "events.jsonl"
    e.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return p, e


def run(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_rules_and_guards_human_output(tmp_path: Path) -> None:
    p, e = write(tmp_path, [
        scored("svc-a", T0),                         # 1 auto
        scored("svc-a", T0 + 10_000),                # 2 cooldown
        scored("svc-b", T0 + 20_000, confidence=0.8),  # 3 ladder: needs_approval
        scored("svc-c", T0 + 30_000, confidence=0.6),  # 4 ladder: notify
        scored("svc-d", T0 + 40_000),                # 5 rate limit (3 in 600 s)
        scored("svc-e", T0 + 40_000, confidence=0.3),  # 6 below the ladder: nothing fires
        scored("svc-a", T0 + 700_000),               # 7 cost cap (auto + approval: 6; +3 > 8)
        scored("db-1", T0, metric="disk"),           # 8 no rule selects it
    ])
    r = run("policy", "test", str(p), "--input", str(e))
    assert r.exit_code == 0, r.output
    out = r.output
    assert out.startswith(f"policy {p} (version ")
    assert f"{e}:1  svc-a cpu=99 ts={T0}  score 0.950 confidence 0.950\n" \
        "    rule restart fired: log svc-a  (score 0.950 >= 0.8, confidence 0.950 >= 0.0; " \
        "autonomy ladder: auto)\n    => mode auto (would execute)" in out
    block2 = out.split(f"{e}:2  ")[1].split(f"{e}:3  ")[0]
    assert "guard:cooldown intervened: svc-a in cooldown (60s) after decision dc-" in block2
    assert "=> mode blocked (would not execute)" in block2
    assert "autonomy ladder: needs_approval" in out.split(f"{e}:3  ")[1].split(f"{e}:4")[0]
    assert "=> mode notify (would not execute)" in out.split(f"{e}:4  ")[1].split(f"{e}:5")[0]
    assert "guard:rate_limit intervened: rule restart already acted 3 times within 600s" \
        in out.split(f"{e}:5  ")[1]
    # Nothing fired: the closest rule and the condition that failed.
    assert "    no rule fired; closest: rule restart (confidence 0.300 below the autonomy " \
        "ladder (lowest band 0.5))" in out.split(f"{e}:6  ")[1].split(f"{e}:7")[0]
    assert "    no rule fired; closest: rule page (metric not selected)" \
        in out.split(f"{e}:8  ")[1]
    assert "guard:cost_cap intervened: cost 3 would exceed the cap: 6 of 8 spent" \
        in out.split(f"{e}:7  ")[1]
    assert out.rstrip().splitlines()[-1] == (
        "summary: 8 events, 0 outcomes, 0 errors; rules fired: restart 6; guards intervened: "
        "cooldown 1, cost_cap 1, rate_limit 1; modes: auto 1, blocked 3, needs_approval 1, "
        "none 2, notify 1")
    r = run("policy", "test", str(p), "--input", str(e), "--all")
    assert f"{e}:6  svc-e" in r.output and "no rule fired" in r.output


def test_json_output_outcomes_breaker_blast_radius_and_pause(tmp_path: Path) -> None:
    lat = "latency_ms"
    p, e = write(tmp_path, [
        scored("web-1", T0, metric=lat),
        scored("web-2", T0 + 1_000, metric=lat),   # blast radius: web-1's action still running
        scored("web-3", T0 + 40_000, metric=lat),  # 30 s later it has finished
        {"outcome": {"action_type": "webhook", "target": "web-9", "status": "failed"}},
        {"outcome": {"action_type": "webhook", "target": "web-9", "status": "timeout"}},
        scored("web-9", T0 + 50_000, metric=lat),  # breaker open
    ])
    r = run("policy", "test", str(p), "--input", str(e), "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    assert [row.get("mode") for row in rows[:-1]] == [
        "auto", "blocked", "auto", None, None, "blocked"]
    assert rows[1]["guards"] == [{"guard": "blast_radius", "reason": (
        "1 actions already in flight in group all (limit 1: max_concurrent 1)")}]
    assert rows[3] == {"line": 4, "kind": "outcome", "outcome": {
        "action_type": "webhook", "target": "web-9", "status": "failed", "at": T0 + 40_000}}
    assert rows[5]["guards"][0]["guard"] == "circuit_breaker"
    assert rows[5]["rule"] == "page" and rows[5]["action"]["target"] == "web-9"
    assert rows[-1]["summary"]["guards_intervened"] == {"blast_radius": 1, "circuit_breaker": 1}
    # a longer action keeps its slot
    r = run("policy", "test", str(p), "--input", str(e), "--json", "--action-seconds", "60")
    assert json.loads(r.output.splitlines()[2])["mode"] == "blocked"
    # as if paused
    r = run("policy", "test", str(p), "--input", str(e), "--json", "--paused")
    rows = [json.loads(line) for line in r.output.splitlines()]
    decided = [row for row in rows[:-1] if "mode" in row]
    assert {row["mode"] for row in decided} == {"blocked"}
    assert {row["guards"][0]["guard"] for row in decided} == {"kill_switch"}


def test_telemetry_goes_through_the_real_model(tmp_path: Path) -> None:
    rng = random.Random(3)
    events = [{"entity": "api-1", "metric": "latency_ms", "value": 100 + rng.gauss(0, 2),
               "ts": T0 + i * 10_000} for i in range(80)]
    events.append({"entity": "api-1", "metric": "latency_ms", "value": 900.0,
                   "ts": T0 + 80 * 10_000})
    p, e = write(tmp_path, events)
    r = run("policy", "test", str(p), "--input", str(e), "--json")
    assert r.exit_code == 0, r.output
    rows = [json.loads(line) for line in r.output.splitlines()]
    fired = rows[:-1]
    assert [row["line"] for row in fired] == [81], fired  # only the spike
    assert fired[0]["rule"] == "page" and fired[0]["mode"] == "auto"
    assert fired[0]["score"] >= 0.9
    assert rows[-1]["summary"]["events"] == 81
    assert rows[-1]["summary"]["modes"] == {"none": 80, "auto": 1}


def test_invalid_input_lines_and_policies(tmp_path: Path) -> None:
    p, e = write(tmp_path, [
        "not json",
        "[1, 2]",
        {"entity": "", "metric": "cpu", "value": 1, "ts": T0},
        scored("svc-a", T0, score=1.5),
        {"outcome": {"target": "x"}},
        "# a comment",
        scored("svc-a", T0),
    ])
    r = run("policy", "test", str(p), "--input", str(e))
    assert r.exit_code == 1
    lines = r.output.splitlines()
    assert f"{e}:1: not JSON: Expecting value: line 1 column 1 (char 0)" in lines
    assert f"{e}:2: expected a JSON object" in lines
    assert f"{e}:3: invalid input: entity: String should have at least 1 character" in lines
    assert f"{e}:4: invalid input: score and confidence must be within [0, 1]" in lines
    assert f"{e}:5: invalid input: missing 'action_type'" in lines
    assert "summary: 1 events, 0 outcomes, 5 errors" in lines[-1]

    bad = tmp_path / "bad.yaml"
    bad.write_text(textwrap.dedent("""\
        version: 1
        rules:
          - name: r
            action: {type: log}
            rate_limit: {max: 0, window_s: 60}
    """))
    r = run("policy", "test", str(bad), "--input", str(e))
    assert r.exit_code == 2
    assert f"Error: {bad}:5: rules.0.rate_limit.max: Input should be greater than or equal" \
        in r.output
    r = run("policy", "check", str(bad))
    assert r.exit_code == 2 and f"{bad}:5:" in r.output
    r = run("policy", "check", str(p))
    assert r.exit_code == 0 and r.output.startswith(f"ok: {p}: 2 rules, version ")


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_the_real_command_needs_no_broker_or_redis(tmp_path: Path, fmt: str) -> None:
    p, e = write(tmp_path, [scored("svc-a", T0)])
    env = {k: v for k, v in os.environ.items()
           if k not in ("KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL")}
    args = [sys.executable, "-m", "ia.cli", "policy", "test", str(p), "--input", "-"]
    if fmt == "json":
        args.append("--json")
    out = subprocess.run(args, input=e.read_text(), capture_output=True, text=True, env=env,
                         timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert "restart" in out.stdout


@pytest.mark.parametrize("command", ["worker", "actuate"])
def test_worker_and_actuator_refuse_a_broken_policy_naming_file_and_line(
        tmp_path: Path, command: str) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("version: 1\nrules:\n  - name: r\n    when: {min_score: lots}\n")
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9", "REDIS_URL":
           "redis://127.0.0.1:9/0"}
    out = subprocess.run([sys.executable, "-m", "ia.cli", command, "--policy", str(bad)],
                         capture_output=True, text=True, env=env, timeout=120, cwd=tmp_path)
    assert out.returncode == 2  # an invalid policy exits 2 everywhere
    assert out.stderr.strip().splitlines()[-1] == (
        f"Error: {bad}:4: rules.0.when.min_score: Input should be a valid number, "
        "unable to parse string as a number")


def test_events_that_fired_nothing_each_say_why_without_all(tmp_path: Path) -> None:
    def raw(entity: str, metric: str, i: int = 0) -> dict:  # telemetry, scored by the tester
        return {"entity": entity, "metric": metric, "value": 1.0, "ts": T0 + i * 1000}

    p, e = write(tmp_path, [raw("db-1", "disk"), raw("svc-e", "cpu", 1)])
    lines = run("policy", "test", str(p), "--input", str(e)).output.splitlines()
    assert f"{e}:1  db-1 disk=1 fired no rule; closest: rule page (metric not selected)" \
        in lines, lines
    assert any(line.startswith(f"{e}:2  svc-e cpu=1 fired no rule; closest: rule restart (")
               for line in lines), lines
    p, e = write(tmp_path, [raw(f"db-{i}", "disk", i) for i in range(8)])
    out = run("policy", "test", str(p), "--input", str(e)).output
    assert out.count("fired no rule; closest: rule page (metric not selected)") == 5
    assert "(8 telemetry events fired no rule, 5 shown; --all shows each in full)" in out
