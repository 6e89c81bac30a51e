"""The ``ia`` command line."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import click

from ia.settings import Settings


def _settings(**overrides: object) -> Settings:
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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
    from ia import embedded

    s = _settings()
    info = embedded.up(run_dir or s.run_dir)
    embedded.ensure_topics(info.kafka_bootstrap_servers, s.topics.all(), s.topic_partitions)
    click.echo("\n".join(info.env_lines()))


@main.command()
@click.option("--run-dir", type=click.Path(path_type=Path), default=None)
def down(run_dir: Path | None) -> None:
    """Stop the embedded services started by `ia up`."""
    from ia import embedded

    stopped = embedded.down(run_dir or _settings().run_dir)
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"),
               err=True)


@main.command()
@click.option("--run-dir", type=click.Path(path_type=Path), default=None)
def status(run_dir: Path | None) -> None:
    """Show the embedded services and whether they are healthy."""
    from ia import embedded

    click.echo(json.dumps(embedded.status(run_dir or _settings().run_dir), indent=2,
                          default=str))


def _run_faust(app, settings: Settings) -> None:
    from faust.worker import Worker

    from ia import embedded

    bootstrap, _ = settings.require_endpoints()
    embedded.ensure_topics(bootstrap, settings.topics.all(), settings.topic_partitions)
    Worker(app, loglevel=settings.log_level, quiet=True).execute_from_commandline()


@main.command()
@click.option("--policy", "policy_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="Policy YAML (default: $IA_POLICY_FILE or observe-only).")
@click.option("--metrics-port", type=int, default=None, help="Serve /metrics on this port.")
def worker(policy_file: Path | None, metrics_port: int | None) -> None:
    """Run the pipeline: telemetry -> features -> model -> policy -> decisions."""
    from streams.pipeline import build_worker

    s = _settings(policy_file=policy_file, metrics_port=metrics_port)
    _run_faust(build_worker(s), s)


@main.command()
@click.option("--policy", "policy_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="Policy YAML, for its named commands.")
@click.option("--metrics-port", type=int, default=None)
def actuate(policy_file: Path | None, metrics_port: int | None) -> None:
    """Run the actuators: decisions -> actions -> outcomes."""
    from streams.actuation import build_actuator

    s = _settings(policy_file=policy_file, metrics_port=metrics_port)
    _run_faust(build_actuator(s), s)


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
    from ia.demo import run_simulator_cli

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
    from ia.demo import run_demo

    summary = run_demo(_settings(), seed=seed, speed=speed, duration_s=duration_s)
    if json_file:
        json_file.write_text(json.dumps(summary, indent=2) + "\n")
    ok = summary["incidents_detected"] > 0 and summary["actions_succeeded"] > 0
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    main()
