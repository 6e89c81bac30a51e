"""The audit log's single writer: the anchor beside the log, head, lease and
source offsets in Redis.

Protocol of one batch (so a crash at any point leaves a log that either
verifies or is repaired on restart without losing or duplicating records):

1. seal the batch in memory after the current head, with the audit key;
2. Redis ``pending`` := the batch's last ``seq:hash`` (only if the head is unchanged);
3. append the lines to the file and ``fsync``;
4. the anchor file := the new head (keyed, replaced atomically);
5. Redis, atomically: head := pending, delete pending, record the source offsets.

The anchor is the authority for the tail: a restart of Redis (the embedded one
keeps nothing across ``ia down``/``ia up``) loses the Redis head and offsets but
not the anchor, and the writer stores the head in Redis again on its next start.
On start, :func:`ia.governance.audit.recover` commits a batch that was written
completely and cuts off one that was not; its source records were not
acknowledged, so Kafka delivers them again.  Source offsets (topic/partition
→ last offset recorded) make redelivered records that *were* committed be
skipped, so nothing is recorded twice.  A lease (``SET NX`` with a TTL, renewed
by the writer) keeps a second writer from forking the chain, and every head
update is a compare-and-set as well.  When Redis goes away the writer waits:
the batch in hand stays unacknowledged, a batch is only appended while the
lease is known to be held, and a lease that vanished with a restarted Redis
is taken again (one held by another writer stops this one).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

from ia.core.clock import now_ms
from ia.core.keys import Keys
from ia.governance.audit import (
    EMPTY,
    AnchorFile,
    AuditError,
    AuditFile,
    Chain,
    Completeness,
    Head,
    Record,
    anchor_path,
    is_actionable,
    observations,
    recover,
    scan,
    tracking,
    verify,
)
from ia.governance.hashchain import ChainKey
from ia.schemas.models import ActionOutcome, ApprovalEvent, Decision
from ia.schemas.serde import DecodeError, decode

log = logging.getLogger("ia.audit")

LEASE_TTL_MS = 15_000
# How long after taking or renewing the lease this writer still appends: well
# inside the TTL, so it stops before the lease could expire and pass to another.
LEASE_SAFE_S = LEASE_TTL_MS / 1000 * 2 / 3

_BEGIN = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return cur end
redis.call('SET', KEYS[2], ARGV[2])
return 'OK'
"""

_COMMIT = """
local cur = redis.call('GET', KEYS[1]) or ''
if cur ~= ARGV[1] then return cur end
if ARGV[2] ~= '' then redis.call('SET', KEYS[1], ARGV[2]) end
redis.call('DEL', KEYS[2])
for i = 3, #ARGV, 2 do redis.call('HSET', KEYS[3], ARGV[i], ARGV[i + 1]) end
return 'OK'
"""

_RENEW = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

MODELS = {"decision": Decision, "approval": ApprovalEvent, "outcome": ActionOutcome}


@dataclass(frozen=True)
class SourceRecord:
    """One record consumed from a topic: ``kind`` is decision, approval or outcome."""

    kind: str
    topic: str
    partition: int
    offset: int
    value: bytes

    @property
    def src(self) -> str:
        return f"{self.topic}/{self.partition}/{self.offset}"



class RedisAuditState:
    """Head, in-flight batch, source offsets and writer lease of one log."""

    def __init__(self, client, prefix: str = "ia") -> None:
        self.client = client
        self.keys = Keys(prefix)
        self._begin = client.register_script(_BEGIN)
        self._commit = client.register_script(_COMMIT)
        self._renew = client.register_script(_RENEW)
        self._release = client.register_script(_RELEASE)

    async def heads(self) -> tuple[Head | None, Head | None]:
        head, pending = await self.client.mget(self.keys.audit_head, self.keys.audit_pending)
        return Head.decode(head), Head.decode(pending)

    async def offsets(self) -> dict[str, int]:
        raw = await self.client.hgetall(self.keys.audit_offsets)
        return {k.decode(): int(v) for k, v in raw.items()}

    async def begin(self, expected: Head | None, pending: Head) -> None:
        res = await self._begin(keys=[self.keys.audit_head, self.keys.audit_pending],
                                args=[expected.encode() if expected else "", pending.encode()])
        if res not in (b"OK", "OK"):
            raise AuditError(f"the stored head moved ({res!r}): another writer is active")

    async def commit(self, expected: Head | None, new: Head | None,
                     offsets: dict[str, int]) -> None:
        """If the head is ``expected``: head := ``new`` (kept if None), record ``offsets``."""
        args: list[str | int] = [expected.encode() if expected else "",
                                 new.encode() if new else ""]
        for k, v in offsets.items():
            args += [k, v]
        res = await self._commit(keys=[self.keys.audit_head, self.keys.audit_pending,
                                       self.keys.audit_offsets],
                                 args=args)
        if res not in (b"OK", "OK"):
            raise AuditError(f"the stored head moved ({res!r}): another writer is active")

    async def acquire(self, owner: str, ttl_ms: int = LEASE_TTL_MS) -> bool:
        return bool(await self.client.set(self.keys.audit_lease, owner, nx=True, px=ttl_ms))

    async def renew(self, owner: str, ttl_ms: int = LEASE_TTL_MS) -> bool:
        return bool(await self._renew(keys=[self.keys.audit_lease], args=[owner, ttl_ms]))

    async def release(self, owner: str) -> None:
        await self._release(keys=[self.keys.audit_lease], args=[owner])


def _offsets_of(records: list[Record]) -> dict[str, int]:
    out: dict[str, int] = {}
    for rec in records:
        spans = [(k, hi) for k, (_lo, hi) in rec.data.get("offsets", {}).items()] \
            if rec.kind == "observations" else []
        if rec.src:
            topic, _, off = rec.src.rpartition("/")
            spans.append((topic, int(off)))
        for key, off in spans:
            out[key] = max(out.get(key, -1), int(off))
    return out


class LeaseUnconfirmed(RuntimeError):
    """The lease could not be confirmed lately (Redis unreachable): wait, then retry."""


def _merged(*maps: dict[str, int]) -> dict[str, int]:
    out: dict[str, int] = {}
    for m in maps:
        for k, v in m.items():
            out[k] = max(out.get(k, -1), v)
    return out


class AuditWriter:
    """Appends decisions, approvals and outcomes to the chain, once each."""

    def __init__(self, client, path: Path, key: ChainKey, *, prefix: str = "ia",
                 fmt: str = "json", all_decisions: bool = False, grace_ms: int = 300_000,
                 owner: str | None = None) -> None:
        self.state = RedisAuditState(client, prefix)
        self.file = AuditFile(path)
        self.anchor = AnchorFile(anchor_path(path), key)
        self.key = key
        self.fmt = fmt
        self.all_decisions = all_decisions
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.completeness = Completeness(grace_ms)
        self.chain = Chain(key)
        self.offsets: dict[str, int] = {}
        self.committed: Head | None = None
        self.written = {"decision": 0, "observations": 0, "approval": 0, "outcome": 0,
                        "undecodable": 0, "skipped": 0}
        self.undecodable = 0
        self._dirty = True
        self._started = False
        self._lease_until = 0.0

    async def start(self, wait_s: float = 0.0) -> None:
        """Take the lease (waiting up to ``wait_s``), then repair and load the log."""
        deadline = time.monotonic() + wait_s
        # renew(): a start retried after a Redis error may find the lease already its own
        while not (await self.state.acquire(self.owner) or await self.state.renew(self.owner)):
            if time.monotonic() >= deadline:
                raise AuditError("another audit writer holds the lease "
                                 f"({self.state.keys.audit_lease}); only one may write the chain")
            await asyncio.sleep(0.5)
        self._lease_until = time.monotonic() + LEASE_SAFE_S
        try:
            await self._recover()
            self.completeness = Completeness(self.completeness.grace_ms)
            result = await asyncio.to_thread(scan, self.file.path, self.key,
                                             tracking(self.completeness))
            if not result.ok:  # pragma: no cover - recover() verified it just now
                raise AuditError("; ".join(result.problems))
        except BaseException:
            await self.state.release(self.owner)
            raise
        self._started = True

    async def _recover(self) -> None:
        if self._started:
            await self.renew()  # the lease may have vanished with the Redis state
        head, pending = await self.state.heads()
        anchor = await asyncio.to_thread(self.anchor.read)
        known = (self.committed or EMPTY) if self._started else None
        new_head, finished = await asyncio.to_thread(
            recover, self.file.path, self.key, anchor, head, pending, known)
        offsets = _merged(await self.state.offsets(), self.offsets, _offsets_of(finished))
        if new_head != anchor and new_head.seq:
            await asyncio.to_thread(self.anchor.write, new_head)
        if new_head != (head or EMPTY) or pending is not None or finished:
            await self.state.commit(head, new_head if new_head.seq else None, offsets)
            if head is None and new_head.seq:
                log.warning("audit: the Redis head was missing (Redis restarted?); "
                            "restored it from the anchor at seq %d", new_head.seq)
            elif finished:
                log.warning("audit: committed an interrupted batch up to seq %d", new_head.seq)
        self.chain = Chain(self.key, new_head)
        self.committed = new_head if new_head.seq else None
        self.offsets = offsets
        self._dirty = False

    async def renew(self) -> None:
        """Renew the lease; take it again if it vanished (a restarted Redis).

        Raises :class:`AuditError` if another writer holds it: this one must stop.
        """
        if not await self.state.renew(self.owner):
            if not await self.state.acquire(self.owner):
                raise AuditError("lost the audit writer lease to another writer; stopping "
                                 "so the chain cannot fork")
            log.warning("audit: the writer lease had vanished (Redis restarted?); took it "
                        "again, re-checking the log before the next batch")
            self._dirty = True
        self._lease_until = time.monotonic() + LEASE_SAFE_S

    async def close(self) -> None:
        await self.state.release(self.owner)

    def _entries(self, items: list[SourceRecord], now: int) -> tuple[list, dict[str, int]]:
        entries: list[tuple[int, str, str, str, dict]] = []
        quiet: list[dict] = []
        quiet_offsets: dict[str, list[int]] = {}
        offsets: dict[str, int] = {}
        for item in items:
            key = f"{item.topic}/{item.partition}"
            last = offsets.get(key, self.offsets.get(key))
            if last is not None and item.offset <= last:
                continue  # already recorded (redelivery after a crash)
            if last is not None and item.offset > last + 1:
                # The consumer went on past offsets it never delivered (a gap it gave up
                # on): whatever they held is unaccounted for, and the chain says so.
                log.error("audit: offsets %d..%d of %s were never read", last + 1,
                          item.offset - 1, key)
                entries.append((now, "skipped", "", "", {
                    "topic": item.topic, "partition": item.partition, "first": last + 1,
                    "last": item.offset - 1, "offsets": item.offset - last - 1}))
            offsets[key] = item.offset
            try:
                model = decode(item.value, MODELS[item.kind], self.fmt)
            except DecodeError as exc:
                self.undecodable += 1
                log.warning("audit: undecodable %s at %s: %s", item.kind, item.src, exc)
                entries.append((now, "undecodable", "", item.src, {
                    "kind": item.kind, "error": str(exc)[:500], "bytes": len(item.value),
                    "sha256": hashlib.sha256(item.value).hexdigest()}))
                continue
            data = model.model_dump(mode="json")
            if item.kind == "decision" and not (self.all_decisions or is_actionable(data)):
                quiet.append(data)
                span = quiet_offsets.setdefault(key, [item.offset, item.offset])
                span[0], span[1] = min(span[0], item.offset), max(span[1], item.offset)
                continue
            entries.append((now, item.kind, data["decision_id"], item.src, data))
        if quiet:
            summary = observations(quiet)
            summary["offsets"] = quiet_offsets
            entries.append((now, "observations", "", "", summary))
        return entries, offsets

    async def write(self, items: list[SourceRecord]) -> list[Record]:
        """Record a batch; returns the sealed records (empty if all were seen before).

        Redis errors propagate (the caller retries the same batch later); so does
        :class:`LeaseUnconfirmed` when the lease could not be renewed in time.
        """
        if time.monotonic() >= self._lease_until:
            await self.renew()
        if self._dirty:
            await self._recover()
        entries, offsets = self._entries(items, now_ms())
        if not offsets:
            return []
        expected = self.committed
        chain = Chain(self.key, self.chain.head)
        records = chain.extend(entries)
        try:
            if records:
                await self.state.begin(expected, chain.head)
                if time.monotonic() >= self._lease_until:
                    raise LeaseUnconfirmed("the audit writer lease was not renewed in time")
                await asyncio.to_thread(self.file.append, records)
                await asyncio.to_thread(self.anchor.write, chain.head)
            await self.state.commit(expected, chain.head if records else None, offsets)
        except BaseException:
            self._dirty = True  # a partial append must be repaired before the next batch
            raise
        self.chain = chain
        self.committed = chain.head if chain.head.seq else None
        self.offsets.update(offsets)
        for rec in records:
            self.completeness.add(rec)
            self.written[rec.kind] += 1
        return records


async def reanchor(client, path: Path, key: ChainKey, *, prefix: str, by: str,
                   reason: str) -> Record:
    """Vouch for ``path`` as it is: append a keyed ``reanchor`` record and anchor it.

    For a log whose anchor or Redis head was lost or disagrees (an unkeyed log
    whose Redis head went with a Redis restart, an anchor removed, another
    key).  The record names who and why, the anchor and the Redis head found
    (or why they could not be used) and the last record it vouches for, so
    the re-anchoring is itself on the record.  Refused while a writer holds the
    lease, when the chain itself is broken (re-anchoring cannot mend a changed
    record), and when the log already verifies.
    """
    if not by.strip() or not reason.strip():
        raise AuditError("a re-anchor needs --by and --reason")
    state = RedisAuditState(client, prefix)
    owner = f"reanchor:{socket.gethostname()}:{os.getpid()}"
    if not await state.acquire(owner):
        raise AuditError("an audit writer holds the lease: stop it before re-anchoring")
    try:
        redis_head, _pending = await state.heads()
        anchor_file = AnchorFile(anchor_path(path), key)
        try:
            anchor, anchor_problem = anchor_file.read(), None
        except AuditError as exc:
            anchor, anchor_problem = None, str(exc)
        result = await asyncio.to_thread(scan, path, key)
        if not result.ok:
            raise AuditError("the chain itself is broken, which re-anchoring cannot mend: "
                             + "; ".join(result.problems))
        if anchor_problem is None and (await asyncio.to_thread(
                verify, path, key, anchor, redis_head)).ok:
            raise AuditError(f"{path} verifies against its anchor: nothing to re-anchor")
        rec = Chain(key, result.last).extend([(now_ms(), "reanchor", "", "", {
            "by": by, "reason": reason, "log_head": _head_json(result.last),
            "anchor": _head_json(anchor), "anchor_problem": anchor_problem,
            "redis_head": _head_json(redis_head), "legacy_records": result.legacy,
            "key_id": key.id})])[0]
        await asyncio.to_thread(AuditFile(path).append, [rec])
        await asyncio.to_thread(anchor_file.write, rec.head)
        await state.commit(redis_head, rec.head, {})
        log.warning("audit: %s re-anchored %s at seq %d: %s", by, path, rec.seq, reason)
        return rec
    finally:
        await state.release(owner)


def _head_json(head: Head | None) -> dict[str, object] | None:
    return None if head is None else {"seq": head.seq, "hash": head.hash}
