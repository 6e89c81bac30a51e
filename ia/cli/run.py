"""The long-running processes: ``ia worker``, ``ia actuate``, ``ia audit-writer``,
``ia api``, and the simulated fleet (``ia simulate``, ``ia demo``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ia.cli.common import settings


@click.command()
@click.option("--policy", "policy_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="Policy YAML (default: $IA_POLICY_FILE or observe-only).")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics on this port.")
@click.option("--shadow", is_flag=True,
              help="Run --policy as a shadow candidate (own group and Redis namespace, "
                   "decisions only to <prefix>.decisions.shadow, dead letters to "
                   "<prefix>.telemetry.dlq.shadow; see `ia shadow`).")
def worker(policy_file: Path | None, metrics_port: int | None, shadow: bool) -> None:
    """Run the pipeline: telemetry -> features -> model -> policy -> decisions."""
    from ia.streams.app import run_faust
    from ia.streams.worker import build_worker

    s = settings(policy_file=policy_file, metrics_port=metrics_port)
    if shadow:
        from ia.core.kafka import ensure_topics
        from ia.offline.shadow import shadow_settings

        if policy_file is None:
            raise click.UsageError("--shadow needs --policy CANDIDATE")
        s = shadow_settings(s)
        s.require_endpoints()
        ensure_topics(s.kafka, [s.topics.decisions_shadow, s.topics.dlq_shadow],
                      s.topic_partitions)
    run_faust(build_worker(s, shadow=shadow), s)


@click.command()
@click.option("--policy", "policy_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="Policy YAML, for its named commands.")
@click.option("--metrics-port", type=int, default=None)
def actuate(policy_file: Path | None, metrics_port: int | None) -> None:
    """Run the actuators: decisions -> actions -> outcomes."""
    from ia.streams.actuator import build_actuator
    from ia.streams.app import run_faust

    s = settings(policy_file=policy_file, metrics_port=metrics_port)
    run_faust(build_actuator(s), s)


@click.command("audit-writer")
@click.option("--metrics-port", type=int, default=None)
@click.option("--grace", "grace_s", type=float, default=300.0, show_default=True,
              help="Seconds a decision's record may stay incomplete before it counts as "
                   "overdue (after the approval's expiry for needs_approval).")
def audit_writer(metrics_port: int | None, grace_s: float) -> None:
    """Append every decision, approval and outcome to the hash-chained audit log."""
    from ia.streams.app import run_faust
    from ia.streams.audit import build_audit_writer

    s = settings(metrics_port=metrics_port)
    run_faust(build_audit_writer(s, grace_s=grace_s), s)


@click.command("api")
@click.option("--host", default=None, help="Bind address (default: $IA_API_HOST or 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: $IA_API_PORT or 8470).")
def api(host: str | None, port: int | None) -> None:
    """Serve the approval HTTP API (token from IA_API_TOKEN or IA_API_TOKEN_FILE)."""
    from ia.governance.api import serve

    serve(settings(), host, port)


@click.command()
@click.option("--seed", type=int, default=7)
@click.option("--speed", type=float, default=60.0, help="Simulated seconds per wall second.")
@click.option("--duration", "duration_s", type=float, default=6000.0,
              help="Simulated seconds to run.")
@click.option("--services", "n_services", type=int, default=6)
@click.option("--incidents", "n_incidents", type=int, default=6)
@click.option("--port", type=int, default=0, help="Port of the simulator's control API.")
def simulate(seed: int, speed: float, duration_s: float, n_services: int, n_incidents: int,
             port: int) -> None:
    """Stream a simulated fleet with injected incidents into the telemetry topic."""
    from ia.sim.demo import run_simulator_cli

    run_simulator_cli(settings(), seed=seed, speed=speed, duration_s=duration_s,
                      n_services=n_services, n_incidents=n_incidents, port=port)


@click.command()
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the summary as JSON to this file.")
@click.option("--seed", type=int, default=7)
@click.option("--speed", type=float, default=60.0)
@click.option("--duration", "duration_s", type=float, default=6000.0)
def demo(json_file: Path | None, seed: int, speed: float, duration_s: float) -> None:
    """Run the whole closed loop on the embedded broker and Redis, then summarise."""
    from ia.sim.demo import run_demo

    summary = run_demo(settings(), seed=seed, speed=speed, duration_s=duration_s)
    if json_file:
        json_file.write_text(json.dumps(summary, indent=2) + "\n")
    ok = summary["incidents_detected"] > 0 and summary["actions_succeeded"] > 0
    sys.exit(0 if ok else 1)
