"""``ia demo``: the whole closed loop on the embedded broker and Redis.

It starts (or connects to) the broker and Redis, the worker and the actuator
as child processes, and the simulated fleet with its control API in this
process; streams the fleet through the loop in accelerated time; waits for
the pipeline to drain; and summarises what happened from the topics.
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ia.core.kafka import ensure_topics, read_all
from ia.core.settings import KafkaSettings, RedisSettings, Settings, Topics
from ia.core.signing import write_key_file
from ia.decisions.policy_source import builtin_policy_path
from ia.governance.audit import anchor_path
from ia.runtime import embedded
from ia.sim import simulator

console = Console(stderr=True)
EXECUTED = ("succeeded", "failed", "timeout")


def _die_with_parent() -> None:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _spawn(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    with open(log, "ab") as out:
        return subprocess.Popen([sys.executable, "-m", "ia.cli", *args],
                                env={**os.environ, **env}, stdout=out,
                                stderr=subprocess.STDOUT, preexec_fn=_die_with_parent)


def _stop(proc: subprocess.Popen, grace_s: float = 15.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _endpoints(settings: Settings,
               stack: ExitStack) -> tuple[KafkaSettings, RedisSettings, str]:
    """Broker, Redis and topic prefix: external if configured, else embedded."""
    if settings.kafka.bootstrap_servers and settings.redis.url:
        # Shared infrastructure: keep this run's topics and keys apart.
        return (settings.kafka, settings.redis,
                f"{settings.topic_prefix}-demo-{int(time.time())}")
    run_dir = settings.run_dir / "demo"
    run_dir.mkdir(parents=True, exist_ok=True)
    # A demo starts from nothing each time: its simulated fleet repeats the same event
    # ids, which a kept Redis would take for decisions already acted on.
    emb = embedded.EmbeddedStack(run_dir, durable=False)
    console.print("[bold]starting[/] embedded broker (tansu) and Redis (valkey) ...")
    emb.start()
    stack.callback(emb.stop)
    return (KafkaSettings(bootstrap_servers=emb.kafka_bootstrap_servers), emb.redis_settings(),
            settings.topic_prefix)


def run_demo(settings: Settings, *, seed: int = 7, speed: float = 60.0,
             duration_s: float = 6000.0) -> dict:
    started = time.monotonic()
    with ExitStack() as stack:
        kafka, redis, prefix = _endpoints(settings, stack)
        topics = Topics(prefix)
        ensure_topics(kafka, topics.all(), settings.topic_partitions)
        log_dir = settings.run_dir / "demo"
        log_dir.mkdir(parents=True, exist_ok=True)
        sim_summary = asyncio.run(_run_loop(
            stack, kafka=kafka, redis=redis, topics=topics, log_dir=log_dir,
            seed=seed, speed=speed, duration_s=duration_s))
        summary = summarise(sim_summary, read_all(kafka, topics.decisions),
                            read_all(kafka, topics.outcomes))
    summary["wall_seconds"] = round(time.monotonic() - started, 1)
    _print_summary(summary)
    return summary


async def _run_loop(stack: ExitStack, *, kafka: KafkaSettings, redis: RedisSettings,
                    topics: Topics, log_dir: Path, seed: int, speed: float,
                    duration_s: float) -> dict:
    async with simulator.SimulatorServer() as server:
        env = {"KAFKA_BOOTSTRAP_SERVERS": kafka.servers(), "REDIS_URL": str(redis.url),
               # The embedded Redis requires a password: the processes read its file.
               **({"IA_REDIS_PASSWORD_FILE": str(redis.password_file)}
                  if redis.password_file else {}),
               "IA_TOPIC_PREFIX": topics.prefix, "IA_REDIS_PREFIX": topics.prefix,
               "IA_POLICY_FILE": str(builtin_policy_path("demo")),
               "IA_SIMULATOR_URL": server.url, "IA_BATCH_WITHIN_S": "0.01",
               "IA_AUDIT_DIR": str(log_dir / "audit"),
               "IA_SIGNING_KEY_FILE": str(write_key_file(log_dir / "signing.key")),
               "IA_FEEDBACK_KEY_FILE": str(write_key_file(log_dir / "feedback.key"))}
        audit_log = log_dir / "audit" / f"{topics.prefix}.audit.jsonl"
        audit_log.unlink(missing_ok=True)  # a fresh broker and Redis start a fresh chain
        anchor_path(audit_log).unlink(missing_ok=True)
        procs = [_spawn(["worker"], env, log_dir / "worker.log"),
                 _spawn(["actuate"], env, log_dir / "actuator.log"),
                 _spawn(["audit-writer"], env, log_dir / "audit-writer.log")]
        for p in procs:
            stack.callback(_stop, p)
        console.print(f"[bold]running[/] worker, actuator and a fleet simulation "
                      f"({duration_s / 60:.0f} simulated minutes at {speed:g}x); "
                      f"logs in {log_dir}")
        sim = await simulator.run_simulation(
            kafka, topics.telemetry, seed=seed, speed=speed, duration_s=duration_s,
            server=server, on_progress=_progress)
        t0 = time.monotonic()
        await _drain(kafka, topics, sim["events_produced"], procs)
        console.print(f"[bold]drained[/] in {time.monotonic() - t0:.1f}s; stopping processes")
        for p in procs:
            _stop(p)
        return {**sim, "audit": _verify_audit(env)}


def _verify_audit(env: dict[str, str]) -> dict:
    """Run `ia audit verify` on the demo's hash-chained log, as a user would."""
    run = subprocess.run([sys.executable, "-m", "ia.cli", "audit", "verify", "--json"],
                         env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    try:
        report = json.loads(run.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"ok": False, "problems": [run.stderr.strip()[-500:]]}
    return report


def _progress(p: dict) -> None:
    active = ", ".join(f"{i['service']}:{i['type']}" for i in p["active_incidents"]) or "-"
    active = escape(f"[{active}]")  # brackets would otherwise be read as rich markup
    console.print(f"  t+{p['elapsed_s'] / 60:5.1f} min  events {p['events_emitted']:>6}  "
                  f"incidents {p['incidents_started']}  active {active}  "
                  f"actions {p['actions_received']} (remediating "
                  f"{p['actions_remediating']})")


async def _drain(kafka: KafkaSettings, topics: Topics, produced: int, procs: list,
                 timeout_s: float = 60.0) -> None:
    """Wait until every event has a decision and every automatic action an outcome."""
    deadline = time.monotonic() + timeout_s
    decided, missing = 0, -1
    while time.monotonic() < deadline:
        decisions = await asyncio.to_thread(read_all, kafka, topics.decisions)
        decided = len({d["event_id"] for d in decisions})
        if decided >= produced:
            outcomes = await asyncio.to_thread(read_all, kafka, topics.outcomes)
            # Decisions waiting for a human (needs_approval) have no outcome yet.
            acting = {d["decision_id"] for d in decisions
                      if d["action"] and d["mode"] == "auto"}
            missing = len(acting - {o["decision_id"] for o in outcomes})
            if not missing:
                return
        if any(p.poll() is not None for p in procs):
            raise SystemExit("a pipeline process exited early; see the logs in .ia/demo/")
        await asyncio.sleep(0.5)
    console.print("[yellow]warning:[/] pipeline did not fully drain within "
                  f"{timeout_s:g}s ({decided}/{produced} decisions, {missing} actions "
                  "without outcome); the summary covers what arrived")


def summarise(sim: dict, decisions: list[dict], outcomes: list[dict]) -> dict:
    """The demo's figures, computed from the decision and outcome topics.

    Incident windows (start, recovery) come from the simulated world; whether
    and when each was detected, and what the actions did, come from the topics.
    """
    by_id = {d["decision_id"]: d for d in decisions}
    final = {o["decision_id"]: o for o in outcomes if o["status"] in EXECUTED}
    windows = [(i["service"], i["start_ts"], i["end_ts"]) for i in sim["incidents"]]

    def in_incident(entity: str, ts: int) -> bool:
        return any(s == entity and start <= ts <= end for s, start, end in windows)

    detect_s = []
    for inc in sim["incidents"]:
        hits = [d["ts"] for d in decisions if d["action"] and d["entity"] == inc["service"]
                and inc["start_ts"] <= d["ts"] <= inc["end_ts"]]
        if hits:
            detect_s.append((min(hits) - inc["start_ts"]) / 1000.0)
    executed = [by_id[i] for i in final if i in by_id]
    return {
        "events": len({d["event_id"] for d in decisions}),
        "incidents_injected": sim["incidents_injected"],
        "incidents_detected": len(detect_s),
        "mttd_seconds": round(sum(detect_s) / len(detect_s), 1) if detect_s else None,
        "actions_executed": len(final),
        "actions_succeeded": sum(o["status"] == "succeeded" for o in final.values()),
        "actions_failed": sum(o["status"] != "succeeded" for o in final.values()),
        "false_actions": sum(not in_incident(d["entity"], d["ts"]) for d in executed),
        "incidents_remediated_by_action": sim["incidents_remediated_by_action"],
        "mttr_with_automation_seconds": round(sim["mttr_with_automation_seconds"], 1),
        "mttr_without_automation_seconds": round(sim["mttr_without_automation_seconds"], 1),
        "audit_chain_ok": sim.get("audit", {}).get("ok"),
        "audit_records": sim.get("audit", {}).get("records"),
        "decisions_by_mode": _count(d["mode"] for d in decisions),
        "incidents": [{k: i[k] for k in ("id", "type", "service", "time_to_detect_s",
                                         "remediated_by", "duration_s",
                                         "duration_without_automation_s")}
                      for i in sim["incidents"]],
    }


def _count(values) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _print_summary(s: dict) -> None:
    t = Table(title="ia demo: closed-loop summary (simulated time)")
    t.add_column("incident")
    t.add_column("type")
    t.add_column("service")
    t.add_column("detected after", justify="right")
    t.add_column("fixed by")
    t.add_column("recovery (auto)", justify="right")
    t.add_column("recovery (manual)", justify="right")
    for i in s["incidents"]:
        ttd = "-" if i["time_to_detect_s"] is None else f"{i['time_to_detect_s']:.0f}s"
        t.add_row(i["id"], i["type"], i["service"], ttd, str(i["remediated_by"]),
                  f"{i['duration_s'] / 60:.1f} min",
                  f"{i['duration_without_automation_s'] / 60:.1f} min")
    console.print(t)
    keys = ("events", "incidents_injected", "incidents_detected", "mttd_seconds",
            "actions_executed", "actions_succeeded", "actions_failed", "false_actions",
            "mttr_with_automation_seconds", "mttr_without_automation_seconds",
            "audit_chain_ok", "audit_records", "wall_seconds")
    for k in keys:
        console.print(f"  {k:<34} {s.get(k)}")


def run_simulator_cli(settings: Settings, *, seed: int, speed: float, duration_s: float,
                      n_services: int, n_incidents: int, port: int) -> None:
    """``ia simulate``: only the fleet, against an already running loop."""
    settings.require_endpoints()

    async def go() -> dict:
        async with simulator.SimulatorServer(port=port) as server:
            console.print(f"simulator control API: {server.url}  "
                          f"(set IA_SIMULATOR_URL={server.url} for `ia actuate`)")
            return await simulator.run_simulation(
                settings.kafka, settings.topics.telemetry, seed=seed, speed=speed,
                duration_s=duration_s, n_services=n_services, n_incidents=n_incidents,
                server=server, on_progress=_progress)

    sim = asyncio.run(go())
    console.print({k: sim[k] for k in ("incidents_injected", "actions_received",
                                      "mttr_with_automation_seconds",
                                      "mttr_without_automation_seconds")})
