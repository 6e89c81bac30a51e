"""``ia audit``: verify and re-anchor the keyed audit chain, and tell a decision's story."""

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


def _check(s: Settings, path: Path, key, no_head: bool, legacy: bool, tracker):
    """One verification pass: the Redis head, then the anchor, then the file (the
    writer updates them in the opposite order, so each read is at least as new)."""
    from ia.governance.audit import AnchorFile, AuditError, anchor_path, scan, tracking, verify

    if no_head:
        return scan(path, key, tracking(tracker))
    head, _pending = _heads(s)
    try:
        anchor = AnchorFile(anchor_path(path), key).read()
    except AuditError as exc:
        result = scan(path, key, tracking(tracker))
        result.problem(str(exc))
        return result
    return verify(path, key, anchor, head, legacy=legacy, on_record=tracking(tracker))


@audit.command("verify")
@click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The log file (default: from the settings).")
@click.option("--no-head", is_flag=True,
              help="Check only the chain itself (cannot detect a cut tail).")
@click.option("--legacy", is_flag=True,
              help="Accept a wholly unkeyed log without an anchor, checked against the "
                   "Redis head alone (logs written before records were keyed).")
@click.option("--json", "as_json", is_flag=True)
def audit_verify(log_file: Path | None, no_head: bool, legacy: bool, as_json: bool) -> None:
    """Check every record's HMAC, the chain, the anchor and the Redis head (exit 1 on any
    problem).  Needs the audit key (IA_AUDIT_KEY_FILE or IA_AUDIT_KEY)."""
    from ia.governance.audit import Completeness, load_key

    s = settings()
    path = log_file or s.audit_log
    key = load_key(s)
    for attempt in range(10):
        tracker = Completeness()
        result = _check(s, path, key, no_head, legacy, tracker)
        # A batch being written right now is beyond the anchor for a moment.
        if result.ok or not result.uncommitted or attempt == 9:
            break
        time.sleep(0.3)
    stats = tracker.stats(now_ms())
    report = {"log": str(path), "ok": result.ok, "records": result.records,
              "keyed_records": result.keyed, "legacy_records": result.legacy,
              "head": result.last.seq, "head_checked": not no_head,
              "problems": result.problems, "notes": result.notes, "completeness": stats}
    if as_json:
        click.echo(json.dumps(report))
    elif result.ok:
        kind = "keyed chain intact" if not result.legacy else (
            f"keyed chain intact (its first {result.legacy} records unkeyed, legacy)"
            if result.keyed else "UNKEYED (legacy) chain intact")
        click.echo(f"ok: {path}: {result.records} records, {kind}, head seq "
                   f"{result.last.seq}" + ("" if not no_head else " (head not checked)"))
        for note in result.notes:
            click.echo(f"  note: {note}")
        click.echo(f"completeness {stats['ratio']:.2%}: {stats['complete']} complete, "
                   f"{stats['pending']} pending, {stats['overdue']} overdue, "
                   f"{stats['interrupted']} interrupted, {stats['undecodable']} undecodable, "
                   f"{stats['skipped']} skipped offsets")
    else:
        click.echo(f"FAILED: {path}", err=True)
        for p in result.problems:
            click.echo(f"  {p}", err=True)
    sys.exit(0 if result.ok else 1)


@audit.command("reanchor")
@click.option("--by", required=True, help="Who vouches for the log (recorded).")
@click.option("--reason", required=True, help="Why (recorded).")
@click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path), default=None)
def audit_reanchor(by: str, reason: str, log_file: Path | None) -> None:
    """Vouch for the log as it is when its anchor or Redis head was lost: append a keyed
    re-anchor record naming the old and new head, then anchor it.  Stop the writer first."""
    from ia.governance.audit import load_key
    from ia.governance.audit_store import reanchor

    s = settings()
    path = log_file or s.audit_log
    key = load_key(s)

    async def run():
        client = redis_client(s)
        try:
            return await reanchor(client, path, key, prefix=s.redis.prefix, by=by,
                                  reason=reason)
        finally:
            await client.aclose()

    rec = asyncio.run(run())
    anchor = rec.data["anchor_problem"] or _seq(rec.data["anchor"])
    click.echo(f"re-anchored {path}: record {rec.seq} vouches for the log up to seq "
               f"{rec.data['log_head']['seq']} (anchor found: {anchor}; Redis head found: "
               f"{_seq(rec.data['redis_head'])}; by {by}: {reason})")


def _seq(head: dict | None) -> str:
    return f"seq {head['seq']}" if head else "none"


@audit.command("show")
@click.argument("decision_id")
@click.option("--log", "log_file", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--json", "as_json", is_flag=True)
def audit_show(decision_id: str, log_file: Path | None, as_json: bool) -> None:
    """The full story of one decision: event, features, model, score, rule trace,
    guards, approval and outcome."""
    from ia.governance.audit import AuditError, find, load_key

    s = settings()
    path = log_file or s.audit_log
    try:
        records = find(path, decision_id, load_key(s))
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
        if a["status"] == "requested" and a.get("by"):  # an approval short of required
            out.append(f"  approval {len(a.get('approvals') or [])} of {a.get('required', 1)} "
                       f"by {a['by']} via {a['via']} at {when(a['at'])}"
                       + (f": {a['reason']}" if a.get("reason") else ""))
        elif a["status"] == "requested":
            terms = (f", approvers {', '.join(a['approvers'])}" if a.get("approvers") else "") \
                + (f", {a['required']} required" if a.get("required", 1) > 1 else "")
            out.append(f"  requested at {when(a['requested_at'])} ({a['approval_id']}, "
                       f"expires {when(a['expires_at'])}, on expiry {a['on_expiry']}{terms})")
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
