"""The demo's simulated fleet: schedule, incidents, remediation, summary, control API.

Pure tests (no Kafka, no Redis): the fleet is a deterministic model, and the
control API runs in-process.
"""

from __future__ import annotations

import itertools
import json
from collections import defaultdict
from collections.abc import Iterator

import httpx
import pytest
from aiohttp.test_utils import TestClient, TestServer

from ia.features.series import WARMUP_SAMPLES, SeriesState
from ia.schemas.models import EventKind, TelemetryEvent
from ia.sim.simulator import (
    INCIDENT_TYPES,
    MAGNITUDE,
    MANUAL_RECOVERY_S,
    METRICS,
    REMEDIATION,
    SIM_EPOCH_MS,
    WARMUP_S,
    Fleet,
    Incident,
    SimulatorServer,
    drive,
    make_schedule,
)
from tests.reference import observe

STEP_MS = 10_000
ONSET_S = 1200  # 20 simulated minutes: well past the warm-up


def at(seconds: float) -> int:
    return SIM_EPOCH_MS + round(seconds * 1000)


def one_incident(kind: str, service: str = "svc-01", start_s: float = ONSET_S,
                 duration_s: float = 6000.0, magnitude: float | None = None) -> Fleet:
    defaults = {"memory_leak": 2.5, "bad_deploy": 0.08, "latency_spike": 3.5,
                "cpu_saturation": 95.0}
    inc = Incident(id="inc-x", type=kind, service=service, start_ts=at(start_s),
                   manual_recovery_s=MANUAL_RECOVERY_S[kind],
                   magnitude=magnitude if magnitude is not None else defaults[kind])
    return Fleet(seed=3, duration_s=duration_s, incidents=[inc], benign_deploys=[])


def run(fleet: Fleet, until_s: float, from_s: float = 0.0) -> Iterator[TelemetryEvent]:
    """Tick every 10 simulated seconds over ``[from_s, until_s]``."""
    for ts in range(at(from_s), at(until_s) + 1, STEP_MS):
        yield from fleet.tick(ts)


def values(events: list[TelemetryEvent], service: str, metric: str) -> list[float]:
    return [e.value for e in events
            if e.entity == service and e.metric == metric and e.kind is EventKind.metric]


# -- schedule ---------------------------------------------------------------------------

def test_schedule_is_deterministic_per_seed():
    assert make_schedule(7) == make_schedule(7)
    assert make_schedule(7) != make_schedule(8)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize(("n_services", "n_incidents"), [(6, 6), (6, 4), (3, 6), (2, 4)])
def test_schedule_respects_warmup_types_and_one_incident_per_service(seed, n_services,
                                                                     n_incidents):
    duration_s = 6000.0
    incidents = make_schedule(seed, n_services, duration_s, n_incidents)
    assert len(incidents) == n_incidents
    assert {i.type for i in incidents} == set(INCIDENT_TYPES)
    for inc in incidents:
        assert at(WARMUP_S) <= inc.start_ts < at(duration_s)
        assert inc.service in {f"svc-{k:02d}" for k in range(n_services)}
    by_service = defaultdict(list)
    for inc in incidents:
        by_service[inc.service].append(inc)
    for items in by_service.values():
        items.sort(key=lambda i: i.start_ts)
        for a, b in itertools.pairwise(items):
            assert a.manual_end_ts <= b.start_ts, "two incidents on one service at once"


def test_schedule_with_few_incidents_has_distinct_types():
    kinds = [i.type for i in make_schedule(1, 6, 6000.0, 3)]
    assert len(set(kinds)) == 3
    assert make_schedule(1, 6, 6000.0, 0) == []


def test_schedule_that_cannot_fit_is_refused():
    with pytest.raises(ValueError, match="cannot fit"):
        make_schedule(1, 1, 6000.0, 4)


def test_manual_recovery_is_a_parameter():
    incs = make_schedule(7, manual_recovery_s={"bad_deploy": 60.0})
    for inc in incs:
        expected = 60.0 if inc.type == "bad_deploy" else MANUAL_RECOVERY_S[inc.type]
        assert inc.manual_recovery_s == expected


# -- the fleet's metrics ----------------------------------------------------------------

def test_tick_emits_every_series_with_labels_and_is_deterministic():
    a, b = Fleet(seed=11), Fleet(seed=11)
    ev_a, ev_b = a.tick(at(0)), b.tick(at(0))
    assert [e.model_dump() for e in ev_a] == [e.model_dump() for e in ev_b]
    assert len(ev_a) == 6 * len(METRICS)
    for ev in ev_a:
        assert ev.entity.startswith("svc-") and ev.ts == at(0)
        assert ev.labels["service"] == ev.entity and ev.labels["env"] == "demo"
        assert ev.labels["region"]
        assert ev.event_id  # derived deterministically
        # The JSON contract round-trips.
        assert TelemetryEvent.model_validate(json.loads(json.dumps(ev.model_dump(mode="json"))))


def test_healthy_metrics_stay_in_realistic_ranges():
    fleet = Fleet(seed=5, n_incidents=0, n_benign_deploys=0)
    events = list(run(fleet, 3000))
    for svc in fleet.services:
        lat = values(events, svc, "latency_p99_ms")
        err = values(events, svc, "error_rate")
        cpu = values(events, svc, "cpu_pct")
        mem = values(events, svc, "memory_pct")
        assert 80 < min(lat) <= max(lat) < 180
        assert min(err) >= 0.0 and max(err) < 0.02
        assert 20 < min(cpu) <= max(cpu) < 60
        assert 40 < min(mem) <= max(mem) < 70  # far below the restart guard rail (85)
        assert len(set(lat)) > len(lat) * 0.9  # noisy, not flat


def test_actions_do_not_perturb_the_random_stream():
    """Runs with and without automation see the same noise elsewhere."""
    a, b = Fleet(seed=2, n_incidents=0), Fleet(seed=2, n_incidents=0)
    list(run(a, 600))
    list(run(b, 600))
    b.apply_action("restart", "svc-00", "dc-1")
    later_a = [e for e in run(a, 900, 610) if e.entity != "svc-00"]
    later_b = [e for e in run(b, 900, 610) if e.entity != "svc-00"]
    assert [e.value for e in later_a] == [e.value for e in later_b]


# -- incidents move their metrics -------------------------------------------------------

def test_memory_leak_climbs_then_oom_restarts_and_keeps_leaking():
    fleet = one_incident("memory_leak", magnitude=2.5)
    base = fleet.baseline("svc-01", "memory_pct")
    events = list(run(fleet, ONSET_S + 600))
    mem = values(events, "svc-01", "memory_pct")
    assert mem[-1] > base + 20  # +25 points after 10 minutes
    # Reaching ~98 % the kernel kills it: a restart event, memory drops, the leak goes on.
    oom_at_s = ONSET_S + (98 - base) / 2.5 * 60
    events = list(run(fleet, oom_at_s + 120, ONSET_S + 610))
    restarts = [e for e in events if e.kind is EventKind.event and e.metric == "restart"]
    assert len(restarts) == 1 and restarts[0].labels["reason"] == "oom_killed"
    mem = values(events, "svc-01", "memory_pct")
    assert max(mem) > 90 and mem[-1] < base + 8
    assert fleet.active_incident("svc-01") is not None
    assert fleet.incidents[0].oom_restarts == 1


def test_bad_deploy_emits_a_deploy_then_errors_jump():
    fleet = one_incident("bad_deploy")
    before = list(run(fleet, ONSET_S - 10))
    after = list(run(fleet, ONSET_S + 120, ONSET_S))
    deploys = [e for e in after if e.kind is EventKind.event and e.metric == "deploy"]
    assert [d.ts for d in deploys] == [at(ONSET_S)] and deploys[0].entity == "svc-01"
    assert max(values(before, "svc-01", "error_rate")) < 0.02
    assert min(values(after, "svc-01", "error_rate")[4:]) > 0.05
    lat_before = values(before, "svc-01", "latency_p99_ms")
    lat_after = values(after, "svc-01", "latency_p99_ms")[4:]
    assert sum(lat_after) / len(lat_after) > sum(lat_before) / len(lat_before)


def test_latency_spike_and_cpu_saturation_move_latency_and_cpu():
    spike = one_incident("latency_spike", magnitude=3.5)
    sat = one_incident("cpu_saturation", magnitude=95.0)
    base_lat = spike.baseline("svc-01", "latency_p99_ms")
    ev = list(run(spike, ONSET_S + 180))
    assert min(values(ev, "svc-01", "latency_p99_ms")[-10:]) > 2.5 * base_lat
    assert min(values(ev, "svc-01", "cpu_pct")[-10:]) > spike.baseline("svc-01", "cpu_pct") + 15
    ev = list(run(sat, ONSET_S + 180))
    assert min(values(ev, "svc-01", "cpu_pct")[-10:]) > 88
    assert max(values(ev, "svc-01", "cpu_pct")) <= 100
    assert min(values(ev, "svc-01", "latency_p99_ms")[-10:]) > 1.6 * sat.baseline(
        "svc-01", "latency_p99_ms")


# -- actions ----------------------------------------------------------------------------

def _near_baseline(fleet: Fleet, events: list[TelemetryEvent], service: str) -> bool:
    for metric in METRICS:
        base, sd = fleet.baseline(service, metric), fleet.noise_sd(service, metric)
        if any(abs(v - base) > 5 * sd for v in values(events, service, metric)):
            return False
    return True


@pytest.mark.parametrize("kind", INCIDENT_TYPES)
def test_right_op_ends_the_incident_and_metrics_return_to_baseline(kind):
    fleet = one_incident(kind)
    during = list(run(fleet, ONSET_S + 600))
    assert not _near_baseline(fleet, during[-24:], "svc-01")
    result = fleet.apply_action(REMEDIATION[kind], "svc-01", "dc-fix", at(ONSET_S + 605))
    assert result["effect"] == "remediated" and result["remediated_incident"] == "inc-x"
    assert result["false_action"] is False and result["duplicate"] is False
    inc = fleet.incidents[0]
    assert inc.end_ts == at(ONSET_S + 605) and inc.remediated_by == REMEDIATION[kind]
    assert inc.detected_ts == at(ONSET_S + 605)
    assert fleet.active_incident("svc-01") is None
    after = list(run(fleet, ONSET_S + 900, ONSET_S + 610))
    assert _near_baseline(fleet, after, "svc-01")
    assert fleet.counters.actions_remediating == 1


@pytest.mark.parametrize("kind", INCIDENT_TYPES)
def test_wrong_op_has_no_effect(kind):
    fleet = one_incident(kind)
    list(run(fleet, ONSET_S + 300))
    wrong = next(op for op in ("restart", "rollback", "scale_out") if op != REMEDIATION[kind])
    result = fleet.apply_action(wrong, "svc-01", "dc-wrong")
    assert result["effect"] == "no_effect" and result["remediated_incident"] is None
    assert result["false_action"] is False and result["incident"] == "inc-x"
    assert fleet.active_incident("svc-01") is not None
    assert not _near_baseline(fleet, list(run(fleet, ONSET_S + 400, ONSET_S + 310)), "svc-01")
    assert fleet.counters.wrong_op_actions == 1 and fleet.counters.false_actions == 0


def test_op_on_a_healthy_service_is_a_false_action():
    fleet = one_incident("bad_deploy")
    list(run(fleet, ONSET_S + 60))
    result = fleet.apply_action("scale_out", "svc-04", "dc-healthy")
    assert result["false_action"] is True and result["effect"] == "false_action"
    assert fleet.counters.false_actions == 1 and fleet.summary()["false_actions"] == 1
    # The action still happened: it shows up in telemetry.
    scale = [e for e in fleet.tick(at(ONSET_S + 70)) if e.metric == "scale"]
    assert [e.entity for e in scale] == ["svc-04"] and scale[0].value == 4


def test_duplicate_decision_id_is_ignored():
    fleet = one_incident("latency_spike")
    list(run(fleet, ONSET_S + 60))
    first = fleet.apply_action("scale_out", "svc-01", "dc-same")
    again = fleet.apply_action("scale_out", "svc-01", "dc-same")
    assert first["duplicate"] is False and again["duplicate"] is True
    assert again["effect"] == first["effect"] == "remediated"
    assert fleet.counters.actions_received == 1 and fleet.counters.duplicate_actions == 1
    assert fleet.counters.actions_remediating == 1
    assert len([e for e in fleet.tick(at(ONSET_S + 70)) if e.metric == "scale"]) == 1


def test_unknown_op_or_service_is_refused():
    fleet = Fleet(seed=1)
    with pytest.raises(ValueError):
        fleet.apply_action("reboot", "svc-00", "dc-1")
    with pytest.raises(KeyError):
        fleet.apply_action("restart", "svc-99", "dc-2")
    assert fleet.counters.actions_received == 0


# -- manual baseline and summary --------------------------------------------------------

def test_without_action_humans_fix_it_at_the_manual_recovery_time():
    fleet = one_incident("cpu_saturation")
    end_s = ONSET_S + MANUAL_RECOVERY_S["cpu_saturation"]
    events = list(run(fleet, end_s + 60))
    inc = fleet.incidents[0]
    assert inc.end_ts == at(end_s) and inc.remediated_by == "manual"
    fix = [e for e in events if e.metric == "scale"]
    assert len(fix) == 1 and fix[0].labels["by"] == "human" and fix[0].ts == at(end_s)
    assert _near_baseline(fleet, events[-24:], "svc-01")


def test_incident_open_at_run_end_counts_as_ending_there():
    fleet = one_incident("memory_leak", start_s=5000, duration_s=6000)
    list(run(fleet, 6000))
    report = fleet.summary()["incidents"][0]
    assert report["remediated_by"] == "unresolved_at_run_end"
    assert report["end_ts"] == report["end_without_automation_ts"] == at(6000)
    assert report["duration_s"] == 1000.0


def _run_whole(fleet: Fleet, react_after_s: float | None) -> dict:
    """Tick the whole run; optionally apply the right op ``react_after_s`` after each onset."""
    reacted = set()
    for ts in range(fleet.start_ts_ms, fleet.run_end_ts + 1, STEP_MS):
        fleet.tick(ts)
        if react_after_s is None:
            continue
        for inc in fleet.incidents:
            due = inc.start_ts + react_after_s * 1000
            if inc.id not in reacted and due <= ts and inc.end_ts is None:
                reacted.add(inc.id)
                fleet.apply_action(inc.correct_op, inc.service, f"dc-{inc.id}", ts)
    return fleet.summary()


def test_summary_without_actions_has_equal_mttrs():
    summary = _run_whole(Fleet(seed=7), react_after_s=None)
    assert summary["incidents_injected"] == 6
    assert summary["mttr_with_automation_seconds"] == summary["mttr_without_automation_seconds"]
    assert summary["mttr_with_automation_seconds"] > 0
    assert summary["actions_received"] == summary["false_actions"] == 0
    assert all(r["detected_ts"] is None for r in summary["incidents"])


def test_summary_with_correct_actions_has_lower_mttr():
    summary = _run_whole(Fleet(seed=7), react_after_s=120)
    assert summary["mttr_with_automation_seconds"] < summary["mttr_without_automation_seconds"]
    assert summary["mttr_with_automation_seconds"] <= 130
    assert summary["actions_received"] == summary["actions_remediating"] == 6
    assert summary["false_actions"] == 0
    assert summary["incidents_remediated_by_action"] == 6
    for r in summary["incidents"]:
        assert r["remediated_by"] == r["correct_op"]
        assert r["end_ts"] > r["start_ts"] and r["time_to_detect_s"] <= 130
    json.dumps(summary)  # serialisable as is


def test_benign_deploys_happen_without_incident():
    fleet = Fleet(seed=7)
    events = [e for e in run(fleet, 6000) if e.metric == "deploy"]
    bad = {(i.service, i.start_ts) for i in fleet.incidents if i.type == "bad_deploy"}
    releases = [e for e in events if e.labels["change"] == "release"]
    benign = [e for e in releases if (e.entity, e.ts) not in bad]
    assert len(releases) == len(benign) + len(bad)
    assert len(benign) == 3 and fleet.counters.benign_deploys == 3
    # The humans roll the bad deploys back (no automation in this run).
    assert len([e for e in events if e.labels["change"] == "rollback"]) == len(bad)


# -- the detector's view ----------------------------------------------------------------

def _zscores(events: list[TelemetryEvent],
             states: dict[tuple[str, str], SeriesState]) -> list[tuple[str, str, float, float]]:
    out = []
    for ev in events:
        if ev.kind is not EventKind.metric:
            continue
        key = (ev.entity, ev.metric)
        feats, states[key] = observe(states.get(key, SeriesState()), ev.value, ev.ts)
        if feats["n"] >= 1:
            out.append((ev.entity, ev.metric, feats["zscore"], feats["n"]))
    return out


@pytest.mark.parametrize("seed", [7, 8, 9])
def test_normal_noise_rarely_exceeds_z5(seed):
    fleet = Fleet(seed=seed, n_incidents=0, n_benign_deploys=0)
    zs = _zscores(list(run(fleet, 6000)), {})
    extreme = [z for *_, z, _n in zs if abs(z) > 5]
    assert len(extreme) < 0.005 * len(zs)
    # Once the baseline is warm (and the detector's confidence with it), never.
    assert max(abs(z) for *_, z, n in zs if n >= 2 * WARMUP_SAMPLES) < 6


@pytest.mark.parametrize(("kind", "metric"), [("bad_deploy", "error_rate"),
                                              ("latency_spike", "latency_p99_ms"),
                                              ("cpu_saturation", "cpu_pct"),
                                              ("cpu_saturation", "latency_p99_ms")])
@pytest.mark.parametrize("magnitude_end", ["low", "high"])
def test_incident_onset_stands_out_within_a_few_samples(kind, metric, magnitude_end):
    lo, hi = MAGNITUDE[kind]
    fleet = one_incident(kind, magnitude=lo if magnitude_end == "low" else hi)
    states: dict[tuple[str, str], SeriesState] = {}
    _zscores(list(run(fleet, ONSET_S - 10)), states)
    onset = [z for svc, m, z, _ in _zscores(list(run(fleet, ONSET_S + 50, ONSET_S)), states)
             if svc == "svc-01" and m == metric]
    assert max(onset) > 6, onset


def test_bad_deploy_latency_rise_stays_modest():
    """So the latency rule does not fire a (useless) scale-out on a bad deploy."""
    fleet = one_incident("bad_deploy", magnitude=0.10)
    states: dict[tuple[str, str], SeriesState] = {}
    _zscores(list(run(fleet, ONSET_S - 10)), states)
    zs = [z for svc, m, z, _ in _zscores(list(run(fleet, ONSET_S + 300, ONSET_S)), states)
          if svc == "svc-01" and m == "latency_p99_ms"]
    assert max(zs) < 5


# -- control API ------------------------------------------------------------------------

def _action(op: str = "scale_out", target: str = "svc-01", decision_id: str = "dc-abc") -> dict:
    return {"decision_id": decision_id,
            "action": {"type": "simulator", "target": target, "params": {"op": op}},
            "entity": target, "metric": "latency_p99_ms", "anomaly_score": 0.93, "mode": "auto"}


@pytest.fixture
async def client():
    fleet = one_incident("latency_spike")
    list(run(fleet, ONSET_S + 60))
    server = SimulatorServer(fleet)
    async with TestClient(TestServer(server.app)) as c:
        c.fleet = fleet
        yield c


async def test_post_action_remediates(client):
    resp = await client.post("/actions", json=_action(),
                             headers={"Idempotency-Key": "dc-abc"})
    assert resp.status == 200
    body = await resp.json()
    assert body["effect"] == "remediated" and body["remediated_incident"] == "inc-x"
    again = await (await client.post("/actions", json=_action())).json()
    assert again["duplicate"] is True
    state = await (await client.get("/state")).json()
    assert state["running"] is True and state["counters"]["actions_remediating"] == 1
    assert state["incidents"][0]["remediated_by"] == "scale_out"


@pytest.mark.parametrize("raw", [b"{not json", b"\xff\xfe", b"[1, 2]", b'"str"', b"[" * 5000,
                                 json.dumps({"decision_id": "dc-1"}).encode()])
async def test_post_bad_json_is_400(client, raw):
    resp = await client.post("/actions", data=raw,
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert "error" in await resp.json()


@pytest.mark.parametrize("mutate", [
    lambda b: b["action"].update(type="webhook"),
    lambda b: b["action"]["params"].update(op="rm -rf /"),
    lambda b: b["action"].update(params="restart"),
    lambda b: b["action"].update(target=["svc-01"]),
    lambda b: b.update(decision_id="dc-1\n"),
    lambda b: b.update(decision_id="x" * 300),
    lambda b: b.update(decision_id=42),
])
async def test_post_invalid_action_is_400(client, mutate):
    body = _action()
    mutate(body)
    resp = await client.post("/actions", json=body)
    assert resp.status == 400
    assert client.fleet.counters.actions_received == 0


async def test_idempotency_key_must_match_decision_id(client):
    resp = await client.post("/actions", json=_action(), headers={"Idempotency-Key": "dc-other"})
    assert resp.status == 400


async def test_post_unknown_service_is_404_and_does_not_echo(client):
    resp = await client.post("/actions", json=_action(target="<script>svc-x</script>"))
    assert resp.status == 404
    assert "script" not in await resp.text()


async def test_post_oversized_body_is_refused(client):
    resp = await client.post("/actions", data=b"{" + b" " * 100_000 + b"}",
                             headers={"Content-Type": "application/json"})
    assert resp.status == 413


async def test_server_without_fleet_is_503_then_serves_on_a_real_port():
    async with SimulatorServer() as server:
        assert server.url.startswith("http://127.0.0.1:")
        async with httpx.AsyncClient(base_url=server.url) as http:
            assert (await http.post("/actions", json=_action())).status_code == 503
            assert (await http.get("/state")).json() == {"running": False}
            fleet = one_incident("latency_spike")
            list(run(fleet, ONSET_S + 60))
            server.attach(fleet)
            resp = await http.post("/actions", json=_action(target="svc-02"))
            assert resp.status_code == 200 and resp.json()["false_action"] is True
    with pytest.raises(RuntimeError):
        _ = server.url


# -- pacing -----------------------------------------------------------------------------

async def test_drive_ticks_the_whole_run_and_reports_progress():
    fleet = Fleet(seed=4, duration_s=1800, n_incidents=1, n_benign_deploys=0)
    batches: list[list[TelemetryEvent]] = []
    progress: list[dict] = []
    emitted = await drive(fleet, batches.append, speed=1e6, sample_interval_s=10,
                          on_progress=progress.append, progress_every_s=300)
    assert len(batches) == 181
    assert emitted == sum(len(b) for b in batches) >= 181 * 24
    assert [p["elapsed_s"] for p in progress] == [0, 300, 600, 900, 1200, 1500, 1800]
    assert progress[-1]["events_emitted"] == emitted
    ts = [b[-1].ts for b in batches]
    assert ts == sorted(ts) and ts[-1] == fleet.run_end_ts
