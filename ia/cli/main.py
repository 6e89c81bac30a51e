"""The ``ia`` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from ia.cli.common import IaGroup, settings
from ia.core.settings import Settings


def _settings(**overrides: object) -> Settings:
    return settings(**overrides)


@click.group(cls=IaGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="intelligent-automation")
def main() -> None:
    """intelligent-automation: closed-loop operations automation.

    Connects to KAFKA_BOOTSTRAP_SERVERS and REDIS_URL; `eval "$(ia up)"` starts
    an embedded broker and Redis and sets both.
    """


@main.command()
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="State and logs of the embedded services (default: $IA_RUN_DIR or .ia).")
def up(run_dir: Path | None) -> None:
    """Start the embedded Kafka-protocol broker and Redis; print their addresses."""
    from ia.core.kafka import ensure_topics
    from ia.runtime import embedded

    s = _settings()
    info = embedded.up(run_dir or s.run_dir)
    ensure_topics(info.kafka_bootstrap_servers, s.topics.all(), s.topic_partitions)
    click.echo("\n".join(info.env_lines()))


@main.command()
@click.option("--run-dir", type=click.Path(path_type=Path), default=None)
def down(run_dir: Path | None) -> None:
    """Stop the embedded services started by `ia up`."""
    from ia.runtime import embedded

    stopped = embedded.down(run_dir or _settings().run_dir)
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"),
               err=True)


@main.command()
@click.option("--run-dir", type=click.Path(path_type=Path), default=None)
def status(run_dir: Path | None) -> None:
    """Show the embedded services and whether they are healthy."""
    from ia.runtime import embedded

    click.echo(json.dumps(embedded.status(run_dir or _settings().run_dir), indent=2,
                          default=str))


def _built(build, settings: Settings):
    """``build(settings)``; a policy that does not load is a one-line error (file:line)."""
    from ia.decisions.policy import PolicyError

    try:
        return build(settings)
    except PolicyError as exc:
        raise click.ClickException(str(exc)) from None


@main.command()
@click.option("--policy", "policy_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="Policy YAML (default: $IA_POLICY_FILE or observe-only).")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics on this port.")
@click.option("--shadow", is_flag=True,
              help="Run --policy as a shadow candidate (own group and Redis namespace, "
                   "decisions only to <prefix>.decisions.shadow; see `ia shadow`).")
def worker(policy_file: Path | None, metrics_port: int | None, shadow: bool) -> None:
    """Run the pipeline: telemetry -> features -> model -> policy -> decisions."""
    from ia.streams.app import run_faust
    from ia.streams.worker import build_worker

    s = _settings(policy_file=policy_file, metrics_port=metrics_port)
    if shadow:
        from ia.core.kafka import ensure_topics
        from ia.offline.shadow import shadow_settings

        if policy_file is None:
            raise click.UsageError("--shadow needs --policy CANDIDATE")
        s = shadow_settings(s)
        s.require_endpoints()
        ensure_topics(s.kafka, [s.topics.decisions_shadow], s.topic_partitions)
    run_faust(_built(lambda st: build_worker(st, shadow=shadow), s), s)


@main.command()
@click.option("--policy", "policy_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="Policy YAML, for its named commands.")
@click.option("--metrics-port", type=int, default=None)
def actuate(policy_file: Path | None, metrics_port: int | None) -> None:
    """Run the actuators: decisions -> actions -> outcomes."""
    from ia.streams.actuator import build_actuator
    from ia.streams.app import run_faust

    s = _settings(policy_file=policy_file, metrics_port=metrics_port)
    run_faust(_built(build_actuator, s), s)


@main.command()
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

    run_simulator_cli(_settings(), seed=seed, speed=speed, duration_s=duration_s,
                      n_services=n_services, n_incidents=n_incidents, port=port)


@main.command()
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the summary as JSON to this file.")
@click.option("--seed", type=int, default=7)
@click.option("--speed", type=float, default=60.0)
@click.option("--duration", "duration_s", type=float, default=6000.0)
def demo(json_file: Path | None, seed: int, speed: float, duration_s: float) -> None:
    """Run the whole closed loop on the embedded broker and Redis, then summarise."""
    from ia.sim.demo import run_demo

    summary = run_demo(_settings(), seed=seed, speed=speed, duration_s=duration_s)
    if json_file:
        json_file.write_text(json.dumps(summary, indent=2) + "\n")
    ok = summary["incidents_detected"] > 0 and summary["actions_succeeded"] > 0
    sys.exit(0 if ok else 1)


# --- kill switch and policy tools (decisions/guards/, ia/offline/policy_tester.py) -----------


def _kill_switch():
    import redis.asyncio as aioredis

    from ia.decisions.guards import KillSwitch

    s = _settings()
    if not s.redis.url:
        raise click.ClickException('REDIS_URL must be set (eval "$(ia up)" starts one)')
    client = aioredis.from_url(s.redis.url)
    return client, KillSwitch(client, s.redis.prefix)


@main.command()
@click.option("--reason", default="", help="Why; recorded with the pause.")
@click.option("--by", default=None, help="Who pauses (default: $USER).")
def pause(reason: str, by: str | None) -> None:
    """Kill switch: stop all automation; workers and actuators honour it within 1 s."""
    import asyncio
    import getpass

    async def run() -> dict:
        client, ks = _kill_switch()
        try:
            return await ks.pause(by or getpass.getuser(), reason)
        finally:
            await client.aclose()

    info = asyncio.run(run())
    click.echo(json.dumps({"paused": True, **info}))


@main.command()
def resume() -> None:
    """Lift the kill switch set by `ia pause`."""
    import asyncio

    async def run() -> bool:
        client, ks = _kill_switch()
        try:
            return await ks.resume()
        finally:
            await client.aclose()

    was = asyncio.run(run())
    click.echo(json.dumps({"paused": False, "was_paused": was}))


@main.group()
def policy() -> None:
    """Policy documents: validate them, test them against events."""


@policy.command("check")
@click.argument("policy_file", type=click.Path(dir_okay=False, path_type=Path))
def policy_check(policy_file: Path) -> None:
    """Validate POLICY_FILE; errors name the file and line (exit status 2)."""
    from ia.decisions.policy import Policy, PolicyError

    try:
        p = Policy.from_file(policy_file)
    except PolicyError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    click.echo(f"ok: {policy_file}: {len(p.doc.rules)} rules, version {p.version}")


@policy.command("test")
@click.argument("policy_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input", "input_file", required=True, type=click.File("r"),
              help="JSON Lines: telemetry events, scored events or outcomes ('-' for stdin).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, then a summary.")
@click.option("--all", "show_all", is_flag=True, help="Also show events no rule fired for.")
@click.option("--paused", is_flag=True, help="Evaluate as if `ia pause` were in force.")
@click.option("--action-seconds", type=float, default=30.0, show_default=True,
              help="How long an action holds its blast-radius slot (event time).")
def policy_test(policy_file: Path, input_file, as_json: bool, show_all: bool, paused: bool,
                action_seconds: float) -> None:
    """Show which rules would fire and which guards would intervene, without acting.

    Exit status: 0, 1 if an input line was invalid, 2 if the policy is invalid.
    """
    import asyncio

    from ia.decisions.policy import Policy, PolicyError
    from ia.offline.policy_tester import PolicyTester, format_report

    try:
        p = Policy.from_file(policy_file)
    except PolicyError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(2)
    tester = PolicyTester(p, paused=paused, action_seconds=action_seconds)
    report = asyncio.run(tester.run(input_file, getattr(input_file, "name", "<input>")))
    if as_json:
        for r in report.lines:
            if show_all or r.kind != "event" or r.rule or r.guards:
                click.echo(json.dumps(r.to_json()))
        click.echo(json.dumps({"summary": report.summary()}))
    else:
        click.echo(format_report(report, show_all))
    sys.exit(1 if report.errors else 0)


def _add_config_command() -> None:
    from ia.cli.config import config

    main.add_command(config)


_add_config_command()


# --- approvals, audit, approval API (ia/cli/governance.py) ------------------------------------
def _add_governance_commands() -> None:
    from ia.cli.governance import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_add_governance_commands()


# --- replay, eval nab, bench decisions (ia/cli/model.py) -----------------------------------
def _add_model_commands() -> None:
    from ia.cli.model import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_add_model_commands()


# --- backtest, record, shadow (ia/cli/evidence.py) ------------------------------------------
def _add_evidence_commands() -> None:
    from ia.cli.evidence import COMMANDS

    for command in COMMANDS:
        main.add_command(command)


_add_evidence_commands()


# --- feature store: features list/show, bench features (ia/cli/features.py) -------------------
def _add_feature_commands() -> None:
    from ia.cli.features import bench_features, features

    main.add_command(features)
    group = main.commands.get("bench")
    if not isinstance(group, click.Group):
        group = click.Group("bench", help="Benchmarks.")
        main.add_command(group)
    group.add_command(bench_features, "features")


_add_feature_commands()


# --- benchmarks (ia/bench/e2e.py): `ia bench` runs the end-to-end benchmark; other benchmarks
# are its subcommands. Keep this last: it adopts the subcommands of any `bench` group
# registered above (e.g. `ia bench decisions` from ia/cli/model.py). ----------------------
def _add_bench_commands() -> None:
    from ia.cli.bench import bench

    earlier = main.commands.get("bench")
    if isinstance(earlier, click.Group) and earlier is not bench:
        for name, command in earlier.commands.items():
            bench.add_command(command, name)
    main.add_command(bench)


_add_bench_commands()

if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
