"""``ia backtest`` and ``ia record``: evidence for a policy or model change."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import Any

import click

from ia.cli import common
from ia.cli.options import history_options, range_options
from ia.core.settings import Settings


def _variant(path: Path, name: str | None) -> Any:
    from ia.offline.backtest import load_variant

    return load_variant(path, name)


def _feedback(settings: Settings) -> tuple[list, str]:
    """Every Feedback record on the feedback topic (labels for a backtest)."""
    from ia.offline.topic_slice import SliceSpec, read_slice, require_kafka
    from ia.schemas.models import Feedback
    from ia.schemas.serde import DecodeError, decode

    kafka = require_kafka(settings)
    topic = settings.topics.feedback
    out = []
    for recs in read_slice(kafka, SliceSpec(topic)).values():
        for rec in recs:
            try:
                out.append(decode(rec.value or b"", Feedback, settings.wire_format))
            except DecodeError:
                continue
    return out, topic


@click.command()
@click.option("--baseline", required=True, type=click.Path(exists=True, dir_okay=False,
                                                            path_type=Path),
              help="Policy YAML or backtest config (policy + detector settings).")
@click.option("--candidate", required=True, type=click.Path(exists=True, dir_okay=False,
                                                             path_type=Path))
@click.option("--input", "input_path", type=click.Path(exists=True, path_type=Path),
              default=None, help="Events (JSON Lines), a recording, a CSV or a NAB directory.")
@click.option("--format", "fmt", default="auto", show_default=True,
              type=click.Choice(["auto", "jsonl", "recording", "nab-csv", "nab"]))
@history_options
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False,
                                                          path_type=Path), default=None,
              help="Labelled windows (JSON, e.g. NAB's combined_windows) or Feedback JSON Lines.")
@click.option("--labels-from-feedback", is_flag=True,
              help="Use the labels on the feedback topic (true positive = a window).")
@click.option("--label-tolerance", "tolerance_s", type=float, default=300.0, show_default=True,
              help="Seconds either side of a feedback-labelled decision that count as its window.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path),
              default=Path(".ia/backtest"), show_default=True,
              help="Writes summary.json, diff.jsonl and report.html here.")
@click.option("--no-html", is_flag=True, help="Only the JSON summary and the diff.")
@click.option("--max-series", type=int, default=40, show_default=True,
              help="Series plotted in the report (most changed first).")
def backtest(baseline: Path, candidate: Path, input_path: Path | None, fmt: str,
             labels_path: Path | None, labels_from_feedback: bool, tolerance_s: float,
             out_dir: Path, no_html: bool, max_series: int, **kafka: Any) -> None:
    """Run BASELINE and CANDIDATE over the same history and compare their decisions.

    Reports decisions added/removed/changed, action volume, guard interventions
    and, with labels, precision, recall, false action rate and time to detect.
    """
    from ia.offline.backtest_run import LabelSource, format_summary, run_backtest
    from ia.offline.history import load_history

    if labels_path and labels_from_feedback:
        raise click.UsageError("give --labels or --labels-from-feedback, not both")
    settings = common.settings()
    command = "ia " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    history = load_history(settings, input_path, fmt, **kafka)
    base, cand = _variant(baseline, "baseline"), _variant(candidate, "candidate")
    labels = LabelSource(path=labels_path, tolerance_ms=int(tolerance_s * 1000))
    if labels_from_feedback:
        labels.feedback, labels.feedback_topic = _feedback(settings)
    result = run_backtest(history, base, cand, labels, out_dir, command,
                          html=not no_html, max_series=max_series)
    click.echo(format_summary(result.summary))
    for name, path in result.paths.items():
        click.echo(f"{name}: {path}", err=True)


@click.command()
@click.option("--topic", required=True, help="Topic to record (e.g. ia.telemetry).")
@click.option("--output", "output_file", default=None,
              type=click.Path(dir_okay=False, path_type=Path), help="Recording file to write.")
@range_options
@click.option("--until", "until_time", default=None, hidden=True,
              help="Deprecated: --to (the last record's broker time).")
def record(topic: str, output_file: Path | None, until_time: str | None, **rng: Any) -> None:
    """Capture a slice of TOPIC to a file that replay and backtest read (--input FILE).

    The range options are those of `ia replay` and `ia backtest` (--from/--to broker
    times, or offsets); the file is --output. The file keeps each record's partition,
    offset, broker timestamp, key and value, so replaying it equals replaying the slice
    from Kafka. (Deprecated spellings: `--to FILE` for the file, `--until` for --to.)
    """
    output_file, rng["to_time"] = _record_target(output_file, rng["to_time"], until_time)
    from ia.offline.recording import write_recording
    from ia.offline.topic_slice import SliceSpec, read_slice, require_kafka

    settings = common.settings()
    spec = SliceSpec.from_options(topic, rng["from_time"], rng["to_time"],
                                  rng["from_offsets"], rng["to_offsets"])
    partitions = read_slice(require_kafka(settings), spec)
    n = write_recording(output_file, topic, settings.wire_format, partitions, spec.describe())
    click.echo(f"recorded {n} records of {topic} -> {output_file}", err=True)


def _record_target(output_file: Path | None, to: str | None, until: str | None
                   ) -> tuple[Path, str | None]:
    """The file and the end time of ``ia record``, from the options and their old spellings.

    ``ia record --to`` used to name the file (while ``replay --to`` is a time) and
    ``--until`` the end time. An old command keeps working, with a warning: ``--to``
    is read as the file when ``--output`` is missing and it is no time.
    """
    from ia.core.times import TimeFormatError, parse_time

    if until is not None:
        click.echo("warning: ia record --until is deprecated; use --to TIME", err=True)
        if to is not None and output_file is not None:
            raise click.UsageError("give --to or --until, not both")
    if output_file is None and to is not None:
        try:
            parse_time(to)
        except TimeFormatError:
            click.echo("warning: ia record --to FILE is deprecated; use --output FILE "
                       "(--to is the end time, as in ia replay and ia backtest)", err=True)
            return Path(to), until
    if output_file is None:
        raise click.UsageError("give --output FILE (the recording to write)")
    return output_file, to if to is not None else until
