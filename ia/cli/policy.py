"""``ia policy check`` and ``ia policy test``."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

import click

from ia.cli.common import settings


@click.group()
def policy() -> None:
    """Policy documents: validate them, test them against events."""


@policy.command("check")
@click.argument("policy_file", type=click.Path(dir_okay=False, path_type=Path))
def policy_check(policy_file: Path) -> None:
    """Validate POLICY_FILE, its actions included; errors name the file and line.

    Action types and their params are checked against the built-in actuators and the
    plug-ins IA_ACTUATOR_PLUGINS selects (exit status 2 on any problem).
    """
    from ia.actuators.registry import action_catalog
    from ia.decisions.policy import Policy, PolicyError
    from ia.decisions.policy_check import check_actions

    p = Policy.from_file(policy_file)
    problems, notes = check_actions(p, action_catalog(settings().actuator.plugins))
    for note in notes:
        click.echo(f"note: {note}", err=True)
    if problems:
        for problem in problems[:-1]:
            click.echo(f"Error: {problem}", err=True)
        last = problems[-1]
        if len(problems) > 1:
            raise PolicyError(last.source, last.line,
                              f"{last.message} ({len(problems)} problems)")
        raise last
    click.echo(f"ok: {policy_file}: {len(p.doc.rules)} rules, version {p.version}")


@policy.command("actions")
@click.option("--markdown", is_flag=True, help="The README's reference table.")
def policy_actions(markdown: bool) -> None:
    """List the action types (built-in and plug-ins) and the params each one takes."""
    from ia.actuators.registry import action_catalog
    from ia.schemas.actions import BUILTIN_ACTIONS, COMMON_PARAMS, reference_markdown

    if markdown:
        click.echo(reference_markdown(BUILTIN_ACTIONS))
        return
    for name, spec in action_catalog(settings().actuator.plugins).items():
        origin = "built-in" if spec.builtin else "plug-in"
        click.echo(f"{name} ({origin}): {spec.help}")
        if not spec.declared:
            click.echo("    (declares no params: not checked)")
        for param, p in spec.params.items():
            click.echo(f"    {param}: {p.describe()}  {p.help}")
    click.echo("every type:")
    for param, p in COMMON_PARAMS.items():
        click.echo(f"    {param}: {p.describe()}  {p.help}")


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
