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
@click.option("--run-dir", type=click.Path(path_type=Path), default=None,
              help="Where `ia up` keeps its state (default: $IA_RUN_DIR, which `ia up` "
                   "exports, else .ia).")
def status(run_dir: Path | None) -> None:
    """Show the embedded services, whether they are healthy, and whether `ia pause` is in
    force (read from REDIS_URL, else the embedded Redis)."""
    from ia.runtime import embedded

    s = settings()
    report = embedded.status(run_dir or s.run_dir)
    report["paused"] = _pause_state(s, report.get("redis_url"))
    click.echo(json.dumps(report, indent=2, default=str))


def _pause_state(s, embedded_redis: str | None) -> dict | str:
    """``{"paused": bool, ...who, when, why}``, or why it cannot be told."""
    import asyncio

    from ia.cli.common import as_user_error, redis_client
    from ia.core.errors import IaError
    from ia.decisions.guards import KillSwitch

    if s.redis.url is None and embedded_redis:
        s = s.model_copy(update={"redis": s.redis.model_copy(update={"url": embedded_redis})})

    async def read() -> dict | None:
        client = redis_client(s)
        try:
            return await KillSwitch(client, s.redis.prefix).info()
        finally:
            await client.aclose()

    try:
        info = asyncio.run(read())
    except IaError as exc:
        return f"unknown: {exc}"
    except Exception as exc:
        known = as_user_error(exc)
        if known is None:
            raise
        return f"unknown: {known}"
    return {"paused": info is not None, **(info or {})}
