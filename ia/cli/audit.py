"""``ia audit``: verify the hash-chained audit log and tell a decision's story."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from pathlib import Path

import click

from ia.cli.common import redis_client, settings, when
from ia.core.clock import now_ms
from ia.core.settings import Settings
from ia.schemas.models import RuleTrace


@click.group()
def audit() -> None:
    """The tamper-evident audit log."""


def _heads(s: Settings):
    from ia.governance.audit_store import RedisAuditState

    async def run():
        client = redis_client(s)
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

    s = settings()
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
                   f"{stats['pending']} pending, {stats['overdue']} overdue, "
                   f"{stats['interrupted']} interrupted")
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

    s = settings()
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
            f"  {d['entity']} {d['metric']} = {d['value']:g} at {when(d['ts'])} "
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
                    if action else "none") + f"; decided at {when(d['decided_at'])}"]
    approvals_ = [r.data for r in records if r.kind == "approval"]
    out.append("approval")
    if not approvals_:
        out.append("  (none)")
    for a in approvals_:
        if a["status"] == "requested":
            out.append(f"  requested at {when(a['requested_at'])} ({a['approval_id']}, "
                       f"expires {when(a['expires_at'])}, on expiry {a['on_expiry']})")
        else:
            out.append(f"  {a['status']} by {a['by']} via {a['via']} at {when(a['at'])}"
                       + (f": {a['reason']}" if a.get("reason") else ""))
    outcomes = [r.data for r in records if r.kind == "outcome"]
    out.append("outcome")
    if not outcomes:
        out.append("  (none yet)")
    for o in outcomes:
        extra = f"; approved by {o['approved_by']}" if o.get("approved_by") else ""
        err = f"; error: {o['error']}" if o.get("error") else ""
        out.append(f"  [{o.get('phase', 'action')}] {o['status']}: {o['action_type']} on "
                   f"{o['target']} at {when(o['finished_at'])} ({o['duration_ms']:.0f} ms, "
                   f"{o['attempts']} attempt(s)){extra}: {o['detail']}{err}")
    return "\n".join(out)
