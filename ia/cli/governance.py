"""CLI commands of the governance layer: approvals, the audit log, the API.

Registered on the main ``ia`` group by :mod:`ia.cli`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import getpass
import json
import socket
import sys
import time
from pathlib import Path

import click

from ia.cli.common import settings
from ia.core.clock import now_ms
from ia.core.settings import Settings
from ia.schemas.models import RuleTrace


def _settings(**overrides: object) -> Settings:
    return settings(**overrides)


def _redis(s: Settings):
    import redis.asyncio as aioredis

    if not s.redis.url:
        raise click.ClickException('REDIS_URL must be set (eval "$(ia up)" starts one)')
    return aioredis.from_url(s.redis.url, decode_responses=False)


def _when(ms: int | None) -> str:
    if not ms:
        return "-"
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _default_by() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


# --------------------------------------------------------------------------- approvals


@click.group()
def approvals() -> None:
    """Human approval of needs_approval decisions."""


@approvals.command("list")
@click.option("--all", "show_all", is_flag=True, help="Also resolved requests (most recent first).")
@click.option("--json", "as_json", is_flag=True)
def approvals_list(show_all: bool, as_json: bool) -> None:
    """Pending approval requests (oldest first)."""
    from ia.actuators.approvals import ApprovalStore

    s = _settings()

    async def run():
        client = _redis(s)
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

    s = _settings()

    async def run():
        client = _redis(s)
        try:
            return await ApprovalStore(client, s.redis.prefix).get(approval_id)
        finally:
            await client.aclose()

    found = asyncio.run(run())
    if found is None:
        raise click.ClickException(f"no approval request {approval_id}")
    click.echo(json.dumps({"approval": found[0].model_dump(mode="json"),
                           "decision": found[1].model_dump(mode="json")}, indent=2))


def _answer(approval_id: str, approve: bool, by: str | None, reason: str) -> None:
    from ia.actuators.approvals import ApprovalError, ApprovalStore
    from ia.governance.api import ApprovalDesk, kafka_publisher

    s = _settings()
    s.require_endpoints()

    async def run():
        client = _redis(s)
        publish, close = kafka_publisher(s.kafka, s.topics.approvals, s.wire_format)
        try:
            desk = ApprovalDesk(ApprovalStore(client, s.redis.prefix), publish)
            return await desk.answer(approval_id, approve, by=by or _default_by(), via="cli",
                                     reason=reason)
        finally:
            close()
            await client.aclose()

    try:
        ev = asyncio.run(run())
    except ApprovalError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"{ev.approval_id} {ev.status.value} by {ev.by} at {_when(ev.at)}")


@approvals.command("approve")
@click.argument("approval_id")
@click.option("--by", default=None, help="Who approves (default: user@host).")
@click.option("--reason", default="", help="Why (recorded).")
def approvals_approve(approval_id: str, by: str | None, reason: str) -> None:
    """Approve APPROVAL_ID (or the decision id): the actuator runs the action."""
    _answer(approval_id, True, by, reason)


@approvals.command("reject")
@click.argument("approval_id")
@click.option("--reason", required=True, help="Why (recorded; required).")
@click.option("--by", default=None, help="Who rejects (default: user@host).")
def approvals_reject(approval_id: str, reason: str, by: str | None) -> None:
    """Reject APPROVAL_ID (or the decision id): the action never runs."""
    if not reason.strip():
        raise click.BadParameter("a rejection needs a reason", param_hint="--reason")
    _answer(approval_id, False, by, reason)


# --------------------------------------------------------------------------- audit


@click.group()
def audit() -> None:
    """The tamper-evident audit log."""


def _heads(s: Settings):
    from ia.governance.audit_store import RedisAuditState

    async def run():
        client = _redis(s)
        try:
            return await RedisAuditState(client, s.redis.prefix).heads()
        finally:
            await client.aclose()

    return asyncio.run(run())


@audit.command("verify")
@click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The log file (default: from the settings).")
@click.option("--no-head", is_flag=True,
              help="Check only the chain itself (cannot detect a cut tail).")
@click.option("--json", "as_json", is_flag=True)
def audit_verify(log_file: Path | None, no_head: bool, as_json: bool) -> None:
    """Check every record's hash, the chain and the stored head (exit 1 on any problem)."""
    from ia.governance.audit import Completeness, verify

    s = _settings()
    path = log_file or s.audit_log
    for attempt in range(10):
        head, pending = (None, None) if no_head else _heads(s)
        tracker = Completeness()
        result = verify(path, head, pending, on_record=tracker.add) if not no_head else \
            _scan_only(path, tracker)
        # A batch being written right now looks like a cut tail for a moment.
        if result.ok or pending is None or attempt == 9:
            break
        time.sleep(0.3)
    stats = tracker.stats(now_ms())
    report = {"log": str(path), "ok": result.ok, "records": result.records,
              "head": result.last.seq, "head_checked": not no_head,
              "problems": result.problems, "completeness": stats}
    if as_json:
        click.echo(json.dumps(report))
    elif result.ok:
        click.echo(f"ok: {path}: {result.records} records, chain intact, head seq "
                   f"{result.last.seq}" + ("" if not no_head else " (head not checked)"))
        click.echo(f"completeness {stats['ratio']:.2%}: {stats['complete']} complete, "
                   f"{stats['pending']} pending, {stats['overdue']} overdue")
    else:
        click.echo(f"FAILED: {path}", err=True)
        for p in result.problems:
            click.echo(f"  {p}", err=True)
    sys.exit(0 if result.ok else 1)


def _scan_only(path: Path, tracker):
    from ia.governance.audit import scan

    return scan(path, tracker.add)


@audit.command("show")
@click.argument("decision_id")
@click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True)
def audit_show(decision_id: str, log_file: Path | None, as_json: bool) -> None:
    """The full story of one decision: event, features, model, score, rule trace,
    guards, approval and outcome."""
    from ia.governance.audit import AuditError, find

    s = _settings()
    path = log_file or s.audit_log
    try:
        records = find(path, decision_id)
    except AuditError as exc:
        raise click.ClickException(f"{path}: {exc} (run ia audit verify)") from None
    if not records:
        raise click.ClickException(
            f"no record of {decision_id} in {path} (decisions without an action are recorded "
            "only as counts; see ia audit verify)")
    if as_json:
        click.echo(json.dumps({"decision_id": decision_id,
                               "records": [{"seq": r.seq, "at": r.at, "kind": r.kind,
                                            "hash": r.hash, "data": r.data} for r in records]},
                              indent=2))
        return
    click.echo(story(decision_id, records))


def story(decision_id: str, records) -> str:
    """Human-readable account of one decision's audit records."""
    out = [f"decision {decision_id}"]
    seqs = ", ".join(str(r.seq) for r in records)
    out.append(f"  audit records: seq {seqs} (each record's hash checked; "
               "`ia audit verify` checks the chain)")
    decision = next((r.data for r in records if r.kind == "decision"), None)
    if decision is None:
        out.append("  (the decision itself is not in the log)")
    else:
        d = decision
        out += [
            "event",
            f"  {d['entity']} {d['metric']} = {d['value']:g} at {_when(d['ts'])} "
            f"(event {d['event_id']}, correlation {d['correlation_id']})",
            "model",
            f"  {d['model']['id']} version {d['model']['version']}; "
            f"policy version {d.get('policy_version') or '-'}",
            *[f"  component {m['id']} version {m['version']}"
              for m in (d.get("explanation") or {}).get("models", [])],
            "score",
            f"  anomaly score {d['anomaly_score']:.3f}, confidence {d['confidence']:.3f}, "
            f"drift {d['drift']}",
            "features",
        ]
        feats = d.get("features") or {}
        out += [f"  {k} = {v:g}" for k, v in sorted(feats.items())] or ["  (none)"]
        why = d.get("explanation") or {}
        if why:
            out.append("explanation")
            if why.get("summary"):
                out.append(f"  {why['summary']}")
            for c in why.get("top_features", []):
                out.append("  " + ", ".join(f"{k} {v}" for k, v in c.items()))
            if why.get("drift_event"):
                out.append(f"  drift: {why['drift_event']}")
            if why.get("p_useful") is not None:
                out.append(f"  p(useful) {why['p_useful']:.2f}")
        trace = [RuleTrace.model_validate(t) for t in d.get("rule_trace", [])]
        out.append("rule trace")
        out += [f"  {'✔' if t.matched else '·'} {t.rule}: {t.reason}"
                for t in trace if t.guard is None] or ["  (no rules)"]
        out.append("guards")
        out += [f"  {'✘' if t.matched else '·'} {t.guard}: {t.reason}"
                for t in trace if t.guard is not None] or ["  (none intervened)"]
        action = d.get("action")
        out += ["decision",
                f"  mode {d['mode']}; action " + (
                    f"{action['type']} on {action['target']} {action.get('params') or {}}"
                    if action else "none") + f"; decided at {_when(d['decided_at'])}"]
    approvals_ = [r.data for r in records if r.kind == "approval"]
    out.append("approval")
    if not approvals_:
        out.append("  (none)")
    for a in approvals_:
        if a["status"] == "requested":
            out.append(f"  requested at {_when(a['requested_at'])} ({a['approval_id']}, "
                       f"expires {_when(a['expires_at'])}, on expiry {a['on_expiry']})")
        else:
            out.append(f"  {a['status']} by {a['by']} via {a['via']} at {_when(a['at'])}"
                       + (f": {a['reason']}" if a.get("reason") else ""))
    outcomes = [r.data for r in records if r.kind == "outcome"]
    out.append("outcome")
    if not outcomes:
        out.append("  (none yet)")
    for o in outcomes:
        extra = f"; approved by {o['approved_by']}" if o.get("approved_by") else ""
        err = f"; error: {o['error']}" if o.get("error") else ""
        out.append(f"  [{o.get('phase', 'action')}] {o['status']}: {o['action_type']} on "
                   f"{o['target']} at {_when(o['finished_at'])} ({o['duration_ms']:.0f} ms, "
                   f"{o['attempts']} attempt(s)){extra}: {o['detail']}{err}")
    return "\n".join(out)


# --------------------------------------------------------------------------- processes


@click.command("audit-writer")
@click.option("--metrics-port", type=int, default=None)
@click.option("--grace", "grace_s", type=float, default=300.0, show_default=True,
              help="Seconds a decision's record may stay incomplete before it counts as "
                   "overdue (after the approval's expiry for needs_approval).")
def audit_writer(metrics_port: int | None, grace_s: float) -> None:
    """Append every decision, approval and outcome to the hash-chained audit log."""
    from ia.streams.app import run_faust
    from ia.streams.audit import build_audit_writer

    s = _settings(metrics_port=metrics_port)
    run_faust(build_audit_writer(s, grace_s=grace_s), s)


@click.command("api")
@click.option("--host", default=None, help="Bind address (default: $IA_API_HOST or 127.0.0.1).")
@click.option("--port", type=int, default=None, help="Port (default: $IA_API_PORT or 8470).")
def api(host: str | None, port: int | None) -> None:
    """Serve the approval HTTP API (token from IA_API_TOKEN or IA_API_TOKEN_FILE)."""
    from ia.governance.api import serve

    s = _settings()
    try:
        serve(s, host, port)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from None


COMMANDS = [approvals, audit, audit_writer, api]
