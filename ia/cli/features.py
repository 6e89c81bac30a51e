"""``ia features``: the feature definitions and an entity's stored state."""

from __future__ import annotations

import asyncio
import json
import sys

import click

from ia.cli.common import redis_client, settings


@click.group("features")
def features() -> None:
    """The feature store: definitions, and what is stored for an entity."""


@features.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per definition.")
@click.option("--metric", default="any", show_default=True,
              help="Report the state size of this metric's series.")
def list_definitions(as_json: bool, metric: str) -> None:
    """The feature definitions (as code, in features/definitions.py)."""
    from ia.features.registry import DEFAULT_REGISTRY
    from ia.features.views import describe_definitions, format_definitions

    if as_json:
        for row in describe_definitions(DEFAULT_REGISTRY):
            click.echo(json.dumps(row))
    else:
        click.echo(format_definitions(DEFAULT_REGISTRY, metric))


@features.command("show")
@click.argument("entity")
@click.argument("metric", required=False)
@click.option("--json", "as_json", is_flag=True)
def show(entity: str, metric: str | None, as_json: bool) -> None:
    """An entity's current features (all its series, or METRIC's), from Redis.

    Features are shown as the entity's last sample of each series would be
    served at that series' watermark; exit status 1 if nothing is stored.
    """

    from ia.features.registry import DEFAULT_REGISTRY
    from ia.features.store import RedisFeatureStore
    from ia.features.views import entity_snapshot, format_snapshot

    s = settings()

    async def load():
        client = redis_client(s)
        try:
            return (await RedisFeatureStore(client, s.redis.prefix).load([entity]))[entity]
        finally:
            await client.aclose()

    rec = asyncio.run(load())
    snap = entity_snapshot(entity, rec, DEFAULT_REGISTRY, metric)
    click.echo(json.dumps(snap, indent=2) if as_json else format_snapshot(snap))
    if not snap["series"] and not snap["context"]:
        sys.exit(1)
