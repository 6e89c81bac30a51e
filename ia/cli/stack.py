"""``ia up``, ``ia down``, ``ia status``: the embedded broker and Redis."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ia.cli.common import settings


@click.command()
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="State and logs of the embedded services (default: $IA_RUN_DIR or .ia).")
@click.option("--redis-password/--no-redis-password", default=True, show_default=True,
              help="Redis requires a random password, kept in <run-dir>/redis.password "
                   "(0600) and exported as IA_REDIS_PASSWORD_FILE; --no-redis-password "
                   "starts an open Redis that anything local can write.")
def up(run_dir: Path | None, redis_password: bool) -> None:
    """Start the embedded Kafka-protocol broker and Redis; print their addresses."""
    from ia.core.kafka import ensure_topics
    from ia.runtime import embedded

    s = settings()
    info = embedded.up(run_dir or s.run_dir, redis_password=redis_password)
    ensure_topics(info.kafka_bootstrap_servers, s.topics.all(), s.topic_partitions)
    click.echo("\n".join(info.env_lines()))


@click.command()
@click.option("--run-dir", type=click.Path(path_type=Path), default=None)
def down(run_dir: Path | None) -> None:
    """Stop the embedded services started by `ia up`."""
    from ia.runtime import embedded

    stopped = embedded.down(run_dir or settings().run_dir)
    click.echo("stopped: " + (", ".join(stopped) if stopped else "nothing was running"),
               err=True)


@click.command()
@click.option("--run-dir", type=click.Path(path_type=Path), default=None)
def status(run_dir: Path | None) -> None:
    """Show the embedded services and whether they are healthy."""
    from ia.runtime import embedded

    click.echo(json.dumps(embedded.status(run_dir or settings().run_dir), indent=2,
                          default=str))
