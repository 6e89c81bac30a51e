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


@click.command()
@click.option("--input", "input_path", default=None,
              type=click.Path(exists=True, path_type=Path),
              help="Telemetry history: JSON Lines or a recording (`ia record`), in time order.")
@history_options
@click.option("--watch", multiple=True, required=True, help="A metric to judge (repeatable).")
@click.option("--change", "changes", multiple=True, default=("deploy",), show_default=True,
              help="Event metric that is a change (repeatable).")
@click.option("--direction", type=click.Choice(["up", "down", "both"]), default="up",
              show_default=True, help="Which way the watched metrics get worse.")
@click.option("--baseline-s", type=click.FloatRange(min=1), default=2400.0, show_default=True,
              help="Seconds of samples before a change it is judged against.")
@click.option("--alpha", type=click.FloatRange(0, 1, min_open=True, max_open=True),
              default=0.01, show_default=True, help="Bound on a false fail's chance.")
@click.option("--min-effect", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Harm below this many block standard deviations is no fail.")
@click.option("--output", "output_path", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="Write one JSON line per (change, metric) here instead of a table.")
def judge(input_path: Path | None, watch: tuple[str, ...], changes: tuple[str, ...],
          direction: str, baseline_s: float, alpha: float, min_effect: float,
          output_path: Path | None, **topic_options: str | None) -> None:
    """Judge each change in a history: did it make a watched metric worse?

    Every change event (a deploy by default) of an entity starts a sequential test of
    each watched metric against its baseline, relative to the other entities that
    report it (ia.decisions.change_judge): fail as soon as harm is shown, pass once it
    is ruled out or the window ends.  History from --input, or from --topic and its
    range (own consumer, no commits; partitions merged in time order).
    """
    import json

    from ia.decisions.change_judge import JudgeParams
    from ia.offline.history import load_history
    from ia.offline.judge import JudgeSpec, judge_changes

    spec = JudgeSpec(watch=watch, changes=changes, baseline_s=baseline_s,
                     params=JudgeParams(alpha=alpha, direction=direction,  # type: ignore[arg-type]
                                        min_effect=min_effect))
    history = load_history(common.settings(), input_path, **topic_options)
    records = judge_changes(history, spec)
    if output_path is not None:
        written = 0
        with output_path.open("w", encoding="utf-8") as out:
            for record in records:
                out.write(json.dumps(record, sort_keys=True) + "\n")
                written += 1
        click.echo(f"judged {written} (change, metric) pairs -> {output_path}", err=True)
        return
    for r in records:
        after = f" after {r['seconds_to_verdict']:g} s" if r.get("seconds_to_verdict") else ""
        why = f": {r['reason']}" if r.get("reason") else ""
        click.echo(f"{r['entity']} {r['change']}@{r['change_ts']} {r['metric']}: "
                   f"{r['outcome']}{after}{why}")
