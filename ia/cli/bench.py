"""``ia bench``: the end-to-end benchmark, and the benchmarks below it as subcommands."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ia.bench.e2e import BenchOptions, format_table, run_bench
from ia.cli.common import settings as _settings


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

    s = _settings()
    run_faust(build_passthrough(s), s)
