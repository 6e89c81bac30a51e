"""Changes judged over the simulated fleet's history (the demo's services, five seeds):
every bad deploy fails on its error rate, within minutes; a healthy deploy fails only
where an incident of another kind began on that service while it was being judged."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner
from confluent_kafka import Producer

from ia.cli import main
from ia.core.kafka import ensure_topics
from ia.decisions.change_judge import JudgeParams
from ia.offline.judge import JudgeSpec, judge_changes
from ia.schemas.models import TelemetryEvent
from ia.sim.simulator import DEFAULT_SAMPLE_INTERVAL_S, Fleet

SEEDS = (7, 8, 9, 10, 11)
SPEC = JudgeSpec(watch=("error_rate", "latency_p99_ms"), params=JudgeParams(min_effect=1.0))


def history(fleet: Fleet) -> list[TelemetryEvent]:
    """The fleet left alone (no remediation): what a recording of the demo's telemetry
    would hold, one sample per series every 10 simulated seconds."""
    events, ts, step = [], fleet.start_ts_ms, int(DEFAULT_SAMPLE_INTERVAL_S * 1000)
    while ts <= fleet.run_end_ts:
        events += fleet.tick(ts)
        ts += step
    return events


@pytest.mark.parametrize("seed", SEEDS)
def test_bad_deploys_fail_and_healthy_ones_pass_unless_an_incident_began(seed: int) -> None:
    fleet = Fleet(seed=seed)
    records = list(judge_changes(history(fleet), SPEC))
    bad = {(i.service, i.start_ts) for i in fleet.incidents if i.type == "bad_deploy"}
    assert bad
    for service, start in bad:
        [verdict] = [r for r in records if (r["entity"], r["change_ts"]) == (service, start)
                     and r["metric"] == "error_rate"]
        assert verdict["outcome"] == "fail", verdict
        assert verdict["seconds_to_verdict"] <= 700 and verdict["shift"] > 0, verdict
    for r in records:
        if r["outcome"] != "fail" or (r["entity"], r["change_ts"]) in bad:
            continue
        began = [i for i in fleet.incidents if i.service == r["entity"]
                 and r["change_ts"] < i.start_ts <= r["verdict_ts"]]
        assert began, f"a healthy deploy judged harmful: {r}"


def test_no_baseline_and_open_judgements_are_reported() -> None:
    fleet = Fleet(seed=7)
    events = history(fleet)
    first_deploy = next(e for e in events if e.metric == "deploy")
    before = [e for e in events if e.ts < first_deploy.ts and e.metric != "deploy"]
    early = [*before[-10:], first_deploy]
    records = list(judge_changes(early, SPEC))
    assert {r["outcome"] for r in records} == {"no_baseline"}
    assert "min_baseline" in records[0]["reason"]
    cut = [e for e in events if e.ts <= first_deploy.ts + 30_000]
    last = [r for r in judge_changes(cut, SPEC) if r["change_ts"] == first_deploy.ts]
    assert {r["outcome"] for r in last} == {"open"}


def test_ia_judge_writes_a_verdict_per_change_and_metric(tmp_path) -> None:
    fleet = Fleet(seed=8)
    path = tmp_path / "fleet.jsonl"
    path.write_text("".join(e.model_dump_json() + "\n" for e in history(fleet)))
    out = tmp_path / "verdicts.jsonl"
    run = CliRunner().invoke(main, ["judge", "--input", str(path), "--watch", "error_rate",
                                    "--output", str(out)])
    assert run.exit_code == 0, run.output
    records = [json.loads(line) for line in out.read_text().splitlines()]
    [bad] = [i for i in fleet.incidents if i.type == "bad_deploy"]
    [verdict] = [r for r in records if (r["entity"], r["change_ts"]) == (bad.service,
                                                                         bad.start_ts)]
    assert verdict["outcome"] == "fail" and verdict["relative_to_peers"] is True
    table = CliRunner().invoke(main, ["judge", "--input", str(path), "--watch", "error_rate"])
    assert f"{bad.service} deploy@{bad.start_ts} error_rate: fail after " in table.output


@pytest.mark.integration
def test_ia_judge_reads_a_topic_slice(infra, topic_prefix: str, tmp_path) -> None:
    """The same history produced to a topic (keyed by entity, over four partitions, as
    producers do) and judged from there: partitions merged in time order."""

    fleet = Fleet(seed=9)
    topic = f"{topic_prefix}.telemetry"
    ensure_topics(infra.kafka, [topic], 4)
    p = Producer({"bootstrap.servers": infra.kafka, "acks": "all", "linger.ms": 20})
    for i, ev in enumerate(history(fleet)):
        p.produce(topic, key=ev.entity.encode(), value=ev.model_dump_json().encode())
        if i % 1000 == 0:
            p.poll(0)
    assert p.flush(60) == 0
    out = tmp_path / "verdicts.jsonl"
    env = {"KAFKA_BOOTSTRAP_SERVERS": infra.kafka, "PATH": "/usr/bin:/bin"}
    subprocess.run([sys.executable, "-m", "ia.cli", "judge", "--topic", topic, "--watch",
                    "error_rate", "--output", str(out)], env=env, check=True,
                   capture_output=True, text=True, timeout=300)
    records = [json.loads(line) for line in out.read_text().splitlines()]
    [bad] = [i for i in fleet.incidents if i.type == "bad_deploy"]
    [verdict] = [r for r in records if (r["entity"], r["change_ts"]) == (bad.service,
                                                                         bad.start_ts)]
    assert verdict["outcome"] == "fail", verdict
