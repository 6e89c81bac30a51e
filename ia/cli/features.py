"""``ia features list``, ``ia features show`` and ``ia bench features``."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ia.cli.common import settings


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
    import asyncio

    import redis.asyncio as aioredis

    from ia.features.registry import DEFAULT_REGISTRY
    from ia.features.store import RedisFeatureStore
    from ia.features.views import entity_snapshot, format_snapshot

    s = settings()
    if not s.redis.url:
        raise click.ClickException('REDIS_URL must be set (eval "$(ia up)" starts one)')

    async def load():
        client = aioredis.from_url(s.redis.url, decode_responses=False)
        try:
            return (await RedisFeatureStore(client, s.redis.prefix).load([entity]))[entity]
        finally:
            await client.aclose()

    rec = asyncio.run(load())
    snap = entity_snapshot(entity, rec, DEFAULT_REGISTRY, metric)
    click.echo(json.dumps(snap, indent=2) if as_json else format_snapshot(snap))
    if not snap["series"] and not snap["context"]:
        sys.exit(1)


@click.command("features")
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the figures as JSON to this file.")
@click.option("--quick", is_flag=True, help="1k entities and few batches (a smoke run).")
@click.option("--entities", type=int, default=None, help="Entities (default 10000).")
@click.option("--metrics", type=int, default=None, help="Series per entity (default 3).")
def bench_features(json_file: Path | None, quick: bool, entities: int | None,
                   metrics: int | None) -> None:
    """Feature store: enrichment cost per event at batch 1/100/500/1000, Redis memory per
    (entity, metric), against REDIS_URL or an embedded Redis."""
    from ia.bench.features import BenchOptions, format_report, run_bench

    opts = BenchOptions.quick() if quick else BenchOptions()
    if entities:
        opts.entities = entities
    if metrics:
        opts.metrics = metrics
    result = run_bench(settings().redis.url, opts)
    click.echo(format_report(result))
    if json_file:
        json_file.write_text(json.dumps(result, indent=2) + "\n")
