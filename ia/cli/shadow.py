"""``ia shadow``: compare a shadow candidate with production, promote, roll back."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from ia.cli.common import settings
from ia.cli.options import range_options
from ia.core.operator import default_by
from ia.core.settings import Settings


@click.group()
def shadow() -> None:
    """Shadow mode: compare a candidate with production, promote it, roll it back.

    Run the candidate with `ia worker --shadow --policy CANDIDATE`.
    """


def _topic_decisions(settings: Settings, topic: str, kafka: dict[str, Any]) -> list:
    from ia.offline.shadow import decisions_of
    from ia.offline.topic_slice import SliceSpec, read_slice, require_kafka

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

    s = settings()
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
    from ia.governance.promotion import Places, promote

    s = settings()
    rec = promote(candidate, _production_file(s, production), Places.of(s),
                  by or default_by(), reason, evidence)
    click.echo(json.dumps(rec, sort_keys=True))


@shadow.command("rollback")
@click.option("--production", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Production policy file (default: $IA_POLICY_FILE).")
@click.option("--by", default=None)
@click.option("--reason", required=True)
@click.option("--force", is_flag=True, help="Even if the file changed since the promotion.")
def shadow_rollback(production: Path | None, by: str | None, reason: str, force: bool) -> None:
    """Restore the policy that the last promotion replaced."""
    from ia.governance.promotion import Places, rollback

    s = settings()
    rec = rollback(_production_file(s, production), Places.of(s), by or default_by(),
                   reason, force)
    click.echo(json.dumps(rec, sort_keys=True))


@shadow.command("history")
@click.option("--json", "as_json", is_flag=True)
def shadow_history(as_json: bool) -> None:
    """Promotions and rollbacks, oldest first; exit 1 if the log was tampered with."""
    from ia.governance.promotion import Places, PromotionLog

    log = PromotionLog(Places.of(settings()).log)
    for rec in log.records():
        click.echo(json.dumps(rec, sort_keys=True) if as_json else
                   f"#{rec['seq']} {rec['action']:8} {rec['from_version']} -> "
                   f"{rec['to_version']} {rec['production']} by {rec['by']}: {rec['reason']}")
    problems = log.verify()
    for p in problems:
        click.echo(f"error: {p}", err=True)
    sys.exit(1 if problems else 0)
