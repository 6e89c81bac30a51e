"""CLI: ``ia backtest``, ``ia record`` and ``ia shadow report|promote|rollback|history``.

Registered on the main ``ia`` group by :mod:`ia.cli`; ``ia replay --topic``
lives with ``ia replay`` in :mod:`ia.cli.model`.  Heavy imports happen inside
the commands so ``ia`` starts fast.
"""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path
from typing import Any

import click

from ia.cli.common import settings
from ia.cli.options import cli_errors, history_options, range_options
from ia.core.settings import Settings


def _settings() -> Settings:
    return settings()


def _variant(path: Path, name: str | None) -> Any:
    from ia.decisions.policy import PolicyError
    from ia.offline.backtest import load_variant

    with cli_errors(PolicyError):
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


# --------------------------------------------------------------------------- backtest


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
    settings = _settings()
    command = "ia " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    with cli_errors():
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


# --------------------------------------------------------------------------- record


@click.command()
@click.option("--topic", required=True, help="Topic to record (e.g. ia.telemetry).")
@click.option("--to", "to_file", required=True,
              type=click.Path(dir_okay=False, path_type=Path), help="Recording file to write.")
@click.option("--from", "from_time", default=None,
              help="First record: broker time, ISO 8601 (UTC), epoch ms or -2h.")
@click.option("--until", "to_time", default=None, help="Last record: broker time.")
@click.option("--from-offsets", default=None, help="PARTITION:OFFSET[,...]")
@click.option("--to-offsets", default=None, help="PARTITION:OFFSET[,...] (exclusive)")
def record(topic: str, to_file: Path, **rng: Any) -> None:
    """Capture a slice of TOPIC to a file that replay and backtest read (--input FILE).

    The file keeps each record's partition, offset, broker timestamp, key and
    value, so replaying it equals replaying the slice from Kafka.
    """
    from ia.offline.recording import write_recording
    from ia.offline.topic_slice import SliceSpec, read_slice, require_kafka

    settings = _settings()
    with cli_errors():
        spec = SliceSpec.from_options(topic, rng["from_time"], rng["to_time"],
                                      rng["from_offsets"], rng["to_offsets"])
        partitions = read_slice(require_kafka(settings), spec)
    n = write_recording(to_file, topic, settings.wire_format, partitions, spec.describe())
    click.echo(f"recorded {n} records of {topic} -> {to_file}", err=True)


# --------------------------------------------------------------------------- shadow


@click.group()
def shadow() -> None:
    """Shadow mode: compare a candidate with production, promote it, roll it back.

    Run the candidate with `ia worker --shadow --policy CANDIDATE`.
    """


def _topic_decisions(settings: Settings, topic: str, kafka: dict[str, Any]) -> list:
    from ia.offline.shadow import decisions_of
    from ia.offline.topic_slice import SliceSpec, read_slice, require_kafka

    with cli_errors():
        spec = SliceSpec.from_options(topic, kafka["from_time"], kafka["to_time"],
                                      kafka["from_offsets"], kafka["to_offsets"])
        found, _bad = decisions_of(read_slice(require_kafka(settings), spec),
                                   settings.wire_format)
    return found


@shadow.command("report")
@range_options
@click.option("--labels", "labels_path", type=click.Path(exists=True, dir_okay=False,
                                                          path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True, help="The comparison as JSON.")
def shadow_report(labels_path: Path | None, as_json: bool, **kafka: Any) -> None:
    """Compare shadow decisions with production's over a time range (broker time)."""
    from ia.offline.backtest import Row, load_labels_file
    from ia.offline.shadow import compare_topics, format_report

    s = _settings()
    production = _topic_decisions(s, s.topics.decisions, kafka)
    candidate = _topic_decisions(s, s.topics.decisions_shadow, kafka)
    # Feedback labels name production decisions, so they are resolved against those.
    labels = load_labels_file(labels_path, [Row.of(d) for d in production], 300_000) \
        if labels_path else None
    report = compare_topics(production, candidate, labels)
    click.echo(json.dumps(report, indent=2, sort_keys=True) if as_json
               else format_report(report))


def _production_file(s: Settings, production: Path | None) -> Path:
    path = production or s.policy_file
    if path is None:
        raise click.UsageError("name the production policy with --production or IA_POLICY_FILE")
    return Path(path)


@shadow.command("promote")
@click.option("--candidate", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--production", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Production policy file (default: $IA_POLICY_FILE).")
@click.option("--by", default=None, help="Who promotes (default: user@host).")
@click.option("--reason", required=True, help="Why; recorded in the promotion log.")
@click.option("--evidence", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              multiple=True, help="Backtest summary or shadow report; its SHA-256 is logged.")
def shadow_promote(candidate: Path, production: Path | None, by: str | None, reason: str,
                   evidence: tuple[Path, ...]) -> None:
    """Make CANDIDATE the production policy (workers reload it within a second)."""
    from ia.decisions.policy import PolicyError
    from ia.governance.promotion import Places, PromotionError, default_by, promote

    s = _settings()
    try:
        rec = promote(candidate, _production_file(s, production), Places.of(s),
                      by or default_by(), reason, evidence)
    except (PromotionError, PolicyError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(rec, sort_keys=True))


@shadow.command("rollback")
@click.option("--production", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Production policy file (default: $IA_POLICY_FILE).")
@click.option("--by", default=None)
@click.option("--reason", required=True)
@click.option("--force", is_flag=True, help="Even if the file changed since the promotion.")
def shadow_rollback(production: Path | None, by: str | None, reason: str, force: bool) -> None:
    """Restore the policy that the last promotion replaced."""
    from ia.decisions.policy import PolicyError
    from ia.governance.promotion import Places, PromotionError, default_by, rollback

    s = _settings()
    try:
        rec = rollback(_production_file(s, production), Places.of(s), by or default_by(),
                       reason, force)
    except (PromotionError, PolicyError) as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(rec, sort_keys=True))


@shadow.command("history")
@click.option("--json", "as_json", is_flag=True)
def shadow_history(as_json: bool) -> None:
    """Promotions and rollbacks, oldest first; exit 1 if the log was tampered with."""
    from ia.governance.promotion import Places, PromotionLog

    log = PromotionLog(Places.of(_settings()).log)
    for rec in log.records():
        click.echo(json.dumps(rec, sort_keys=True) if as_json else
                   f"#{rec['seq']} {rec['action']:8} {rec['from_version']} -> "
                   f"{rec['to_version']} {rec['production']} by {rec['by']}: {rec['reason']}")
    problems = log.verify()
    for p in problems:
        click.echo(f"error: {p}", err=True)
    sys.exit(1 if problems else 0)


COMMANDS = [backtest, record, shadow]
