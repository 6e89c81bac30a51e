"""``ia approvals``: human approval of needs_approval decisions."""

from __future__ import annotations

import asyncio
import json

import click

from ia.cli.common import redis_client, settings, when
from ia.core.clock import now_ms
from ia.core.operator import default_by


@click.group()
def approvals() -> None:
    """Human approval of needs_approval decisions."""


@approvals.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also resolved requests (most recent first).")
@click.option("--json", "as_json", is_flag=True)
def approvals_list(show_all: bool, as_json: bool) -> None:
    """Pending approval requests (oldest first)."""
    from ia.actuators.approvals import ApprovalStore

    s = settings()

    async def run():
        client = redis_client(s)
        try:
            return await ApprovalStore(client, s.redis.prefix).list(pending_only=not show_all)
        finally:
            await client.aclose()

    events = asyncio.run(run())
    if as_json:
        for ev in events:
            click.echo(ev.model_dump_json())
        return
    if not events:
        click.echo("no pending approval requests" if not show_all else "no approval requests")
        return
    now = now_ms()
    for ev in events:
        left = max(0, ev.expires_at - now) // 1000
        state = f"expires in {left}s" if ev.status.value == "requested" else \
            f"{ev.status.value} by {ev.by} via {ev.via}"
        click.echo(f"{ev.approval_id}  {ev.action.type} on {ev.action.target}  "
                   f"(entity {ev.entity}, {ev.metric}, score {ev.anomaly_score:.2f}, "
                   f"rule {ev.rule or '-'})  {state}")


@approvals.command("show")
@click.argument("approval_id")
def approvals_show(approval_id: str) -> None:
    """One approval request and its decision, as JSON (approval or decision id)."""
    from ia.actuators.approvals import ApprovalStore

    s = settings()

    async def run():
        client = redis_client(s)
        try:
            return await ApprovalStore(client, s.redis.prefix).get(approval_id)
        finally:
            await client.aclose()

    found = asyncio.run(run())
    if found is None:
        raise click.ClickException(f"no approval request {approval_id}")
    click.echo(json.dumps({"approval": found[0].model_dump(mode="json"),
                           "decision": found[1].model_dump(mode="json")}, indent=2))


def _answer(approval_id: str, approve: bool, by: str | None, reason: str,
            while_paused: bool = False) -> None:
    from ia.actuators.approvals import ApprovalStore
    from ia.core.signing import approval_keys
    from ia.decisions.guards import KillSwitch
    from ia.governance.api import PAUSED_APPROVAL, ApprovalDesk, kafka_publisher, paused_by

    if by is not None:
        raise click.UsageError(
            f"--by is not accepted: the approver is who runs this command ({default_by()}); "
            "use `ia api` with a named token to answer as another identity")
    s = settings()
    s.require_endpoints()
    keys = approval_keys(s.approvals, s.signing)

    async def paused() -> dict | None:
        client = redis_client(s)
        try:
            return await KillSwitch(client, s.redis.prefix).info()
        finally:
            await client.aclose()

    pause = asyncio.run(paused()) if approve else None
    if pause is not None:
        who = paused_by(pause)
        if not while_paused:
            raise click.ClickException(
                PAUSED_APPROVAL.format(who=who) + ". Approve after `ia resume`, or pass "
                "--while-paused to approve now anyway")

    async def run():
        client = redis_client(s)
        publish, close = kafka_publisher(s.kafka, s.topics.approvals, s.wire_format)
        try:
            store = ApprovalStore(client, s.redis.prefix, keys=keys)
            store.require_keys()
            return await ApprovalDesk(store, publish).answer(
                approval_id, approve, by=default_by(), via="cli", reason=reason)
        finally:
            close()
            await client.aclose()

    ev = asyncio.run(run())
    if ev.status.value == "requested":  # an approval short of the rule's required count
        click.echo(f"{ev.approval_id} approval by {ev.by} recorded at {when(ev.at)}: "
                   f"{len(ev.approvals)} of {ev.required} approvers")
        return
    click.echo(f"{ev.approval_id} {ev.status.value} by {ev.by} at {when(ev.at)}")
    if pause is not None:
        click.echo(f"note: {PAUSED_APPROVAL.format(who=who)}", err=True)


# The approver is the OS user running the command (user@host), flagged ``via cli``;
# --by is kept only to say so (it used to let the caller choose the name).
_BY = click.option("--by", default=None, hidden=True)


@approvals.command("approve")
@click.argument("approval_id")
@click.option("--reason", default="", help="Why (recorded).")
@_BY
@click.option("--while-paused", is_flag=True,
              help="Approve even though `ia pause` is in force (the action is then blocked, "
                   "not run).")
def approvals_approve(approval_id: str, reason: str, by: str | None,
                      while_paused: bool) -> None:
    """Approve APPROVAL_ID (or the decision id) as user@host of this shell: the actuator
    runs the action once the rule's approvers agree.

    While automation is paused this is refused (the action would be blocked for good),
    unless --while-paused.
    """
    _answer(approval_id, True, by, reason, while_paused)


@approvals.command("reject")
@click.argument("approval_id")
@click.option("--reason", required=True, help="Why (recorded; required).")
@_BY
def approvals_reject(approval_id: str, reason: str, by: str | None) -> None:
    """Reject APPROVAL_ID (or the decision id) as user@host: the action never runs."""
    if not reason.strip():
        raise click.BadParameter("a rejection needs a reason", param_hint="--reason")
    _answer(approval_id, False, by, reason)


@approvals.command("token")
@click.argument("name")
def approvals_token(name: str) -> None:
    """A new random API token for identity NAME.

    Prints the token (give it to NAME; it is not stored) and, on stderr, the line
    for IA_API_TOKEN_FILE, which holds only its SHA-256.
    """
    import secrets

    from ia.governance.api import TOKEN_NAME_RE, token_hash

    if not TOKEN_NAME_RE.fullmatch(name):
        raise click.BadParameter("letters, digits and . _ + -, at most 64 (no @ or :)",
                                 param_hint="NAME")
    token = secrets.token_urlsafe(32)
    click.echo(token)
    click.echo(f"{name} {token_hash(token)}", err=True)
