"""``ia bench``: the end-to-end benchmark, and the benchmarks below it as subcommands."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from ia.cli.common import settings


def _entity_counts(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


@click.group(invoke_without_command=True)
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the results as JSON to this file.")
@click.option("--quick", is_flag=True, help="Small sizes (checks the benchmark, not the speed).")
@click.option("--events", type=int, default=None, help="Backlog per throughput run.")
@click.option("--entities", type=int, default=None, help="Entities of the throughput runs.")
@click.option("--rate", type=float, default=None, help="Offered load of the latency phase.")
@click.option("--latency-seconds", type=float, default=None)
@click.option("--actions", type=int, default=None, help="Webhook actions to time.")
@click.option("--scale", default=None, help="Entity counts, e.g. 1000,10000,100000.")
@click.option("--scale-events", type=int, default=None, help="Backlog per entity count.")
@click.option("--keep-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Keep worker logs (and the embedded stack's) in this directory.")
@click.pass_context
def bench(ctx: click.Context, json_file: Path | None, quick: bool, events: int | None,
          entities: int | None, rate: float | None, latency_seconds: float | None,
          actions: int | None, scale: str | None, scale_events: int | None,
          keep_dir: Path | None) -> None:
    """Benchmarks. Without a subcommand: the end-to-end benchmark (a few minutes)."""
    if ctx.invoked_subcommand is not None:
        return
    from ia.bench.e2e import BenchOptions, format_table, run_bench

    opts = BenchOptions.quick() if quick else BenchOptions()
    overrides = {"events": events, "entities": entities, "rate": rate,
                 "latency_s": latency_seconds, "actions": actions,
                 "scale": _entity_counts(scale) if scale else None,
                 "scale_events": scale_events}
    for k, v in overrides.items():
        if v is not None:
            setattr(opts, k, v)
    summary = run_bench(opts, log=lambda m: click.echo(m, err=True), run_dir=keep_dir)
    click.echo(format_table(summary))
    if json_file:
        json_file.write_text(json.dumps(summary, indent=2) + "\n")


@bench.command("passthrough", hidden=True)
def passthrough() -> None:
    """The trivial pass-through agent the benchmark compares the pipeline with."""
    from ia.bench.passthrough import build_passthrough
    from ia.streams.app import run_faust

    s = settings()
    run_faust(build_passthrough(s), s)


@bench.command(name="decisions")
@click.option("--series", type=int, default=1000, show_default=True)
@click.option("--events-per-series", "per_series", type=int, default=30, show_default=True)
@click.option("--repeat", type=int, default=3, show_default=True)
@click.option("--json", "json_file", type=click.Path(dir_okay=False, path_type=Path),
              default=None, help="Also write the figures as JSON.")
def bench_decisions_cmd(series: int, per_series: int, repeat: int,
                        json_file: Path | None) -> None:
    """Scoring + learning cost per event per series, vs River HalfSpaceTrees."""
    from ia.bench.decisions import bench_decisions, format_bench

    result = bench_decisions(series, per_series, repeat)
    click.echo(format_bench(result))
    if json_file:
        json_file.write_text(json.dumps(result, indent=2) + "\n")
    sys.exit(0)


@bench.command("features")
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
    result = run_bench(settings().redis, opts)
    click.echo(format_report(result))
    if json_file:
        json_file.write_text(json.dumps(result, indent=2) + "\n")
