"""``ia policy check`` and ``ia policy test``."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click


@click.group()
def policy() -> None:
    """Policy documents: validate them, test them against events."""


@policy.command("check")
@click.argument("policy_file", type=click.Path(dir_okay=False, path_type=Path))
def policy_check(policy_file: Path) -> None:
    """Validate POLICY_FILE; errors name the file and line (exit status 2)."""
    from ia.decisions.policy import Policy

    p = Policy.from_file(policy_file)
    click.echo(f"ok: {policy_file}: {len(p.doc.rules)} rules, version {p.version}")


@policy.command("test")
@click.argument("policy_file", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--input", "input_file", required=True, type=click.File("r"),
              help="JSON Lines: telemetry events, scored events or outcomes ('-' for stdin).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line, then a summary.")
@click.option("--all", "show_all", is_flag=True, help="Also show events no rule fired for.")
@click.option("--paused", is_flag=True, help="Evaluate as if `ia pause` were in force.")
@click.option("--action-seconds", type=float, default=30.0, show_default=True,
              help="How long an action holds its blast-radius slot (event time).")
def policy_test(policy_file: Path, input_file, as_json: bool, show_all: bool, paused: bool,
                action_seconds: float) -> None:
    """Show which rules would fire and which guards would intervene, without acting.

    Exit status: 0, 1 if an input line was invalid, 2 if the policy is invalid.
    """

    from ia.decisions.policy import Policy
    from ia.offline.policy_tester import PolicyTester, format_report

    p = Policy.from_file(policy_file)
    tester = PolicyTester(p, paused=paused, action_seconds=action_seconds)
    report = asyncio.run(tester.run(input_file, getattr(input_file, "name", "<input>")))
    if as_json:
        for r in report.lines:
            if show_all or r.kind != "event" or r.rule or r.guards:
                click.echo(json.dumps(r.to_json()))
        click.echo(json.dumps({"summary": report.summary()}))
    else:
        click.echo(format_report(report, show_all))
    sys.exit(1 if report.errors else 0)
