"""The audit writer: decisions, approvals and outcomes -> the hash-chained audit log.

One agent consumes the three topics as one stream and appends each batch
through :class:`ia.governance.audit_store.AuditWriter` (the chain needs a single
writer: a Redis lease makes a second ``ia audit-writer`` wait as a standby).
A batch is acknowledged only after its records are fsynced and anchored and the
head is committed; a timer renews the lease and exports the completeness
metrics.  A Redis outage, at start or mid-stream, is waited out: the batch in
hand is retried with backoff and stays unacknowledged, so nothing is lost.
Only an :class:`~ia.governance.audit.AuditError` (a log that fails
verification, the lease held by another writer) stops the writer.
"""

from __future__ import annotations

import logging

import faust

from ia.core import metrics
from ia.core.clock import now_ms
from ia.core.redis import client as redis_client
from ia.core.settings import Settings
from ia.governance.audit import AuditError, load_key
from ia.governance.audit_store import AuditWriter, SourceRecord
from ia.streams.app import announce_ready, endpoints, make_app, with_retry

log = logging.getLogger("ia.audit")


def build_audit_writer(settings: Settings, *, grace_s: float = 300.0,
                       standby_s: float = 3600.0) -> faust.App:
    app = make_app(settings, settings.audit.app_id)
    topics = settings.topics
    kinds = {topics.decisions: "decision", topics.approvals: "approval",
             topics.outcomes: "outcome"}
    source = app.topic(*kinds, key_type=bytes, value_type=bytes, key_serializer="raw",
                       value_serializer="raw")
    ctx: dict = {}

    settings.require_endpoints()
    client = redis_client(settings.redis)
    writer = AuditWriter(client, settings.audit_log, load_key(settings, create=True),
                         prefix=settings.redis.prefix,
                         fmt=settings.wire_format, all_decisions=settings.audit.all_decisions,
                         grace_ms=int(grace_s * 1000))
    metrics.serve(settings.metrics_port, settings.metrics_host, role="audit")

    async def _start() -> None:
        if ctx.get("started"):
            return
        await with_retry("audit start", lambda: writer.start(wait_s=standby_s), app,
                         fatal=(AuditError,))
        ctx["started"] = True
        log.warning("audit writer %s appending to %s (head seq %d)", writer.owner,
                    writer.file.path, writer.chain.head.seq)
        _export()

    def _export() -> None:
        stats = writer.completeness.stats(now_ms())
        metrics.AUDIT_COMPLETENESS.set(stats["ratio"])
        for state in ("complete", "pending", "overdue", "interrupted", "undecodable",
                      "skipped"):
            metrics.AUDIT_DECISIONS.labels(state).set(stats[state])
        metrics.AUDIT_HEAD_SEQ.set(writer.chain.head.seq)

    async def _fatal(exc: AuditError) -> None:
        """The chain cannot be extended safely: stop (offsets stay uncommitted)."""
        log.critical("audit writer stopping: %s (check the log with: ia audit verify)", exc)
        ctx["fatal"] = exc
        await app.crash(exc)

    @app.agent(source)
    async def record(stream: faust.StreamT) -> None:
        try:
            await _start()  # take the lease and repair the log before consuming anything
            async for events in stream.take_events(1000, within=0.2):
                items = [SourceRecord(kinds[ev.message.topic], ev.message.topic,
                                      ev.message.partition, ev.message.offset, ev.message.value)
                         for ev in events if ev.message.topic in kinds]
                written = await with_retry("audit", lambda i=items: writer.write(i), app,
                                           fatal=(AuditError,))
                for rec in written:
                    metrics.AUDIT_RECORDS.labels(rec.kind).inc()
        except AuditError as exc:
            await _fatal(exc)

    @app.timer(interval=1.0)
    async def keep_lease() -> None:
        if not ctx.get("started") or ctx.get("fatal"):
            return
        try:
            await writer.renew()  # the lease lost means another writer may be active
        except AuditError as exc:
            await _fatal(exc)
            return
        except Exception as exc:  # Redis away: appending pauses until the lease is renewed
            log.warning("audit: cannot renew the writer lease (%s: %s); retrying",
                        type(exc).__name__, exc)
        _export()

    @app.on_before_shutdown.connect
    async def _release(app_: faust.App, **_kw) -> None:
        if ctx.get("started"):
            await writer.close()

    async def ready() -> str:
        return (f"audit writer ready: group {app.conf.id}, reading "
                f"{', '.join(kinds)}, log {settings.audit_log}, {endpoints(settings)}")

    announce_ready(app, ready)
    return app
