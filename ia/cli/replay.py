"""``ia replay`` and ``ia eval nab``: the decision code on history, offline.

Neither needs Redis: they run on files, or (``ia replay --topic``) on a slice of a topic
read from the broker."""

from __future__ import annotations

from pathlib import Path

import click

from ia.cli import common
from ia.cli.options import history_options, replay_output_options


@click.command()
@click.option("--input", "input_path", default=None,
              type=click.Path(exists=True, path_type=Path),
              help="Events file, a recording (`ia record`) or a NAB directory.")
@click.option("--output", "output_path", default=None,
              type=click.Path(dir_okay=False, path_type=Path))
@click.option("--format", "fmt", type=click.Choice(["jsonl", "nab-csv", "recording", "nab"]),
              default="jsonl", show_default=True,
              help="JSON lines of TelemetryEvent (or a recording), timestamp,value CSV, "
                   "or a NAB directory.")
@click.option("--entity", default=None, help="Entity of a nab-csv file (default: file stem).")
@click.option("--metric", default=None, help="Metric of a nab-csv file (default: value).")
@click.option("--policy", "policy_file", type=click.Path(exists=True, path_type=Path),
              default=None, help="Policy YAML, or a backtest config (policy + detector) "
                                 "(default: observe only, no rules).")
@history_options
@replay_output_options
def replay(input_path: Path | None, output_path: Path | None, fmt: str, entity: str | None,
           metric: str | None, policy_file: Path | None, output_topic: str | None, full: bool,
           **topic_options: str | None) -> None:
    """Replay events through features, model and policy offline (event-time clock).

    Writes one JSON line per input event; the same input gives byte-identical output.
    With --topic, history comes from Kafka: own consumer, no commits, memory state, no
    actuator; decisions to --output or --output-topic.
    """
    from ia.offline.backtest import load_variant
    from ia.offline.history import load_history
    from ia.offline.replay import replay as run_replay
    from ia.offline.run import observe_only

    settings = common.settings()
    variant = load_variant(policy_file) if policy_file else observe_only()
    # The default `jsonl` also takes a recording: its header says what it is.
    history = load_history(settings, input_path, "auto" if fmt == "jsonl" else fmt,
                           entity, metric, **topic_options)
    done = run_replay(settings, history, variant, output_path=output_path,
                      output_topic=output_topic, full=full)
    click.echo(f"replayed {done.events} events ({done.acted} with an action, "
               f"{done.dead_letters} dead letters skipped) -> {done.target}", err=True)


@click.group(name="eval")
def eval_group() -> None:
    """Evaluate the detector on benchmarks."""


@eval_group.command(name="nab")
@click.option("--data", "data_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              default=None, help="NAB data folder [default: shared/data/nab in this folder or "
              "a parent, e.g. ../shared/data/nab].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".ia/nab-scores"), show_default=True)
@click.option("--scorer", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="nab_score.py (default: tools/ next to the data's shared/).")
@click.option("--path", "path_kind", type=click.Choice(["direct", "engine"]), default="direct",
              show_default=True, help="direct: the detector's score+learn per row (seconds); "
              "engine: every row through the full offline decision path (same scores).")
def eval_nab(data_dir: Path | None, out_dir: Path, scorer: Path | None, path_kind: str) -> None:
    """Score every NAB file, write score CSVs, score them with nab_score.py; print the
    result beside the published detectors, per category and per file."""
    from ia.core.errors import UsageError
    from ia.offline.evaluate import evaluate_nab, find_nab_data

    data_dir = data_dir or find_nab_data()
    if data_dir is None:
        raise UsageError("no shared/data/nab here or in a parent folder; pass --data")
    result = evaluate_nab(data_dir, out_dir, scorer, path_kind)
    click.echo(result.report.rstrip())
    click.echo(f"\nscored {result.files} files, {result.rows} rows ({path_kind} path); "
               f"score CSVs in {out_dir}")
    for profile, value in result.scores.items():
        click.echo(f"{profile}: {value:.2f}")
