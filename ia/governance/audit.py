"""The tamper-evident audit log: an HMAC-SHA256 hash chain in a JSONL file.

Every record is one line of UTF-8 JSON, written once and never rewritten::

    {"v":2,"seq":7,"prev":"<hash of record 6>","at":1764230400123,"kind":"outcome",
     "id":"dc-…","src":"<digest of the source record>","data":{…},"hash":"<HMAC-SHA256>"}

``hash`` and ``prev`` follow :mod:`ia.governance.hashchain`: the HMAC of the
line's exact bytes under the audit key (:class:`~ia.governance.hashchain.ChainKey`,
from ``IA_AUDIT_KEY_FILE`` or ``IA_AUDIT_KEY``), each record linked to the one
before it.  Without the key nobody can write a record that verifies, so
changing any byte, removing, inserting or forging a record breaks the chain.

The *head* (last ``seq`` and ``hash``) is kept apart from the records twice:

* the **anchor**, ``<log>.head``: one keyed line naming the last committed
  record, replaced atomically after every batch (:class:`AnchorFile`).  It lives
  beside the log, so it survives a restart of Redis (the embedded Redis keeps
  nothing), and only a holder of the key can write one that verifies;
* the **Redis head** (:mod:`ia.governance.audit_store`), a second witness kept
  by another system: it may lag the anchor by one batch, never lead it.

So a cut tail or a rewritten file no longer matches the anchor, records
appended behind the writer's back are reported as not committed, and
restoring an older anchor together with a cut log disagrees with the Redis
head.

Logs written before records were keyed (unkeyed SHA-256 lines, no ``"v"``)
still read: they verify with ``ia audit verify --legacy`` against the Redis
head alone, reported as *unkeyed (legacy)*.  The writer's first start with a
key anchors such a log (if the Redis head vouches for it) and seals every
later record with the key; from then on the legacy records are covered by the
keyed records that chain to them.

Kinds of record (``data`` is the record as published, in JSON form):

``decision``
    a :class:`~schemas.models.Decision` that carries an action or a mode
    other than ``none`` (or every decision with ``IA_AUDIT_ALL_DECISIONS``)
``observations``
    a digest of the non-actionable decisions of one batch: count, time range
    and the SHA-256 of their sorted ids (they are high-volume and say
    "nothing to do"; the digest makes their number tamper-evident)
``approval``
    an :class:`~schemas.models.ApprovalEvent`
``outcome``
    an :class:`~schemas.models.ActionOutcome` (all phases)
``reanchor``
    an operator's ``ia audit reanchor``: who, why, the anchor and Redis head
    found (or their absence) and the log's last record it vouches for

Nothing here needs Kafka or Redis: the writer agent (``ia audit-writer``) and
the CLI (``ia audit verify|show``) use these functions on plain files.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ia.core.clock import now_ms
from ia.core.errors import IaError
from ia.core.settings import Settings
from ia.governance import hashchain
from ia.governance.hashchain import GENESIS, ChainKey, ChainKeyError, SealError, read_lines

KINDS = frozenset({"decision", "observations", "approval", "outcome", "reanchor",
                   "undecodable", "skipped"})
_MAX_PROBLEMS = 50

log = logging.getLogger("ia.audit")


class AuditError(IaError):
    """The log cannot be appended to safely (broken chain, head mismatch)."""


@dataclass(frozen=True)
class Head:
    seq: int
    hash: str

    def encode(self) -> str:
        return f"{self.seq}:{self.hash}"

    @classmethod
    def decode(cls, raw: bytes | str | None) -> Head | None:
        if not raw:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        seq, _, h = text.partition(":")
        return cls(int(seq), h)


EMPTY = Head(0, GENESIS)


@dataclass(frozen=True)
class Record:
    seq: int
    prev: str
    at: int
    kind: str
    id: str
    src: str
    data: dict[str, Any]
    hash: str
    line: bytes = b""
    keyed: bool = True

    @property
    def head(self) -> Head:
        return Head(self.seq, self.hash)


def load_key(s: Settings, *, create: bool = False) -> ChainKey:
    """The audit key: ``IA_AUDIT_KEY``, else the file ``IA_AUDIT_KEY_FILE`` (default
    ``<IA_RUN_DIR>/keys/<prefix>.audit.key``).

    ``create`` (the writer) generates a missing key file, ``0600``; readers never
    do, since a fresh key cannot check records sealed with the lost one.
    """
    if s.audit.key is not None:
        return ChainKey(s.audit.key.get_secret_value().encode())
    path = s.audit_key_file
    if create and not path.exists():
        key = ChainKey.create(path)
        log.warning("audit: generated a new audit key in %s (key id %s)", path, key.id)
        return key
    if not path.exists():
        raise ChainKeyError(f"no audit key at {path}: set IA_AUDIT_KEY_FILE (or IA_AUDIT_KEY) "
                            "to the key the audit writer seals with; `ia audit-writer` "
                            "creates the file on its first start")
    return ChainKey.from_file(path)


def seal(seq: int, prev: str, *, at: int, kind: str, id: str, src: str,
         data: dict[str, Any], key: ChainKey) -> Record:
    """Build keyed record ``seq`` chained to ``prev``; ``record.line`` is what to append."""
    if kind not in KINDS:
        raise ValueError(f"unknown audit record kind {kind!r}")
    line, digest = hashchain.seal({"seq": seq, "prev": prev, "at": at, "kind": kind, "id": id,
                                   "src": src, "data": data}, key)
    return Record(seq, prev, at, kind, id, src, data, digest, line)


def parse(line: bytes, key: ChainKey | None) -> Record:
    """One line (without its newline) back into a record, checking its own hash.

    Raises :class:`~ia.governance.hashchain.SealError` for a line that is not an
    intact audit record (a keyed line whose HMAC fails under ``key`` included).
    """
    obj, digest = hashchain.unseal(line, key)
    try:
        rec = Record(int(obj["seq"]), str(obj["prev"]), int(obj["at"]), str(obj["kind"]),
                     str(obj["id"]), str(obj["src"]), dict(obj["data"]), digest, line,
                     hashchain.is_keyed(line))
    except (ValueError, KeyError, TypeError) as exc:
        raise SealError(f"malformed record: {exc}") from None
    if rec.kind not in KINDS:
        raise SealError(f"unknown kind {rec.kind!r}")
    return rec


# --------------------------------------------------------------------------- anchor


def anchor_path(log_path: Path) -> Path:
    """Where the anchor of ``log_path`` lives: beside it, so both survive together."""
    return log_path.with_name(log_path.name + ".head")


class AnchorFile:
    """The signed head of a log, outside Redis: one keyed line, replaced atomically."""

    def __init__(self, path: Path, key: ChainKey) -> None:
        self.path = Path(path)
        self.key = key

    def read(self) -> Head | None:
        """The anchored head (None if there is no anchor); :class:`AuditError` if the
        file is not an anchor sealed with this key."""
        try:
            fields = hashchain.read_sealed(self.path, self.key)
        except SealError as exc:
            claimed = self._claimed_key_id()
            if claimed and claimed != self.key.id:
                raise AuditError(f"the anchor {self.path} was sealed with key id {claimed}, "
                                 f"not with the configured key (id {self.key.id})") from None
            raise AuditError(f"the anchor {self.path} is not intact ({exc})") from None
        if fields is None:
            return None
        try:
            return Head(int(fields["seq"]), str(fields["head"]))
        except (KeyError, TypeError, ValueError):
            raise AuditError(f"the anchor {self.path} is malformed") from None

    def write(self, head: Head) -> None:
        hashchain.write_sealed(self.path, {"seq": head.seq, "head": head.hash, "at": now_ms(),
                                           "key_id": self.key.id}, self.key)

    def _claimed_key_id(self) -> str | None:
        try:
            fields = json.loads(self.path.read_bytes())
        except (OSError, ValueError):
            return None
        return str(fields.get("key_id")) if isinstance(fields, dict) else None


# --------------------------------------------------------------------------- verification


@dataclass
class Scan:
    """What reading a whole log found."""

    records: int = 0
    keyed: int = 0
    legacy: int = 0  # unkeyed (SHA-256) records, written before records were keyed
    last: Head = EMPTY
    problems: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    uncommitted: int = 0  # records beyond the anchored head
    # Byte offset just after each record, by seq (for truncating an uncommitted tail).
    end_offsets: dict[int, int] = field(default_factory=dict)
    partial_tail_at: int | None = None  # offset of a last line without newline
    watched: dict[int, str] = field(default_factory=dict)  # hash of each watched seq

    def problem(self, text: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(text)
        elif len(self.problems) == _MAX_PROBLEMS:
            self.problems.append("… (more problems not shown)")

    @property
    def ok(self) -> bool:
        return not self.problems

    def hash_at(self, seq: int) -> str | None:
        """The hash of record ``seq`` if it was watched (GENESIS for seq 0)."""
        return GENESIS if seq == 0 else self.watched.get(seq)


def scan(path: Path, key: ChainKey | None, on_record: Callable[[Record], None] | None = None,
         watch: Iterable[int] = ()) -> Scan:
    """Read ``path`` and check every record's hash and its link to the previous one.

    ``watch`` names seqs whose hashes to keep (heads to compare with).  An
    unkeyed record after a keyed one is a problem: the writer never goes back
    to unkeyed records, so it was forged or downgraded.
    """
    out = Scan()
    prev = EMPTY
    watched = set(watch)
    for lineno, offset, line, complete in read_lines(path):
        if not complete:
            out.partial_tail_at = offset
            out.problem(f"line {lineno}: incomplete last record (the tail was cut)")
            break
        try:
            rec = parse(line, key)
        except SealError as exc:
            out.problem(f"line {lineno}: {exc}")
            prev = Head(prev.seq + 1, "?")  # keep counting; the next link cannot match
            continue
        for problem in hashchain.link_problems(rec.seq, rec.prev, prev.seq, prev.hash):
            out.problem(f"line {lineno}: {problem}")
        if not rec.keyed and out.keyed:
            out.problem(f"line {lineno}: an unkeyed record after keyed ones "
                        "(forged, or downgraded to be recomputed without the key)")
        prev = rec.head
        out.records += 1
        out.keyed += rec.keyed
        out.legacy += not rec.keyed
        out.last = rec.head
        out.end_offsets[rec.seq] = offset + len(line) + 1
        if rec.seq in watched:
            out.watched[rec.seq] = rec.hash
        if on_record is not None:
            on_record(rec)
    return out


def check_head(result: Scan, head: Head | None, what: str = "stored") -> list[str]:
    """Problems of a scanned log whose last record should be ``head``."""
    if head is None:
        if result.records:
            return [f"no {what} head for a non-empty log (the head was lost or removed)"]
        return []
    last = result.last
    if last.seq < head.seq:
        return [f"the log ends at seq {last.seq} but the {what} head is seq {head.seq}: "
                f"{head.seq - last.seq} record(s) were removed from the tail"]
    if result.hash_at(head.seq) not in (None, head.hash):
        return [f"record {head.seq} does not match the {what} head (the log was rewritten)"]
    if last.seq > head.seq:
        result.uncommitted = last.seq - head.seq
        return [f"the log has {last.seq - head.seq} record(s) beyond the {what} head "
                f"(seq {head.seq}) that the writer never committed: appended outside the "
                "writer, or a batch cut short by a crash (the next writer start removes it)"]
    if last.hash != head.hash:
        return [f"record {last.seq} does not match the {what} head (the log was rewritten)"]
    return []


def witness_problems(result: Scan, anchor: Head, redis_head: Head | None) -> list[str]:
    """Problems of the Redis head as a second witness of the anchored head.

    The writer updates the anchor before Redis, so the Redis head may lag the
    anchor (a writer stopped in between) but never leads it: leading means the
    anchor was replaced by an older one, and the log cut to match.
    """
    if redis_head is None:
        result.notes.append("no audit head in Redis (Redis was restarted or flushed): the "
                            "anchor alone vouches for the tail; the writer's next start "
                            "stores it again")
        return []
    if redis_head.seq > anchor.seq:
        return [f"the Redis head (seq {redis_head.seq}) is ahead of the anchor (seq "
                f"{anchor.seq}): the anchor was replaced by an older one and the log cut"]
    if result.hash_at(redis_head.seq) != redis_head.hash:
        return [f"the Redis head (seq {redis_head.seq}) does not match record "
                f"{redis_head.seq} of the log: the log or the Redis head was rewritten"]
    if redis_head.seq < anchor.seq:
        result.notes.append(f"the Redis head (seq {redis_head.seq}) lags the anchor (seq "
                            f"{anchor.seq}): the writer stopped between the two updates; "
                            "its next start catches up")
    return []


_NO_ANCHOR = ("no anchor {path} for a non-empty log: it was removed, or the log predates "
              "keyed audit records (`ia audit verify --legacy` checks an unkeyed log against "
              "the Redis head; the writer's next start, or `ia audit reanchor`, anchors it)")


def verify(path: Path, key: ChainKey, anchor: Head | None, redis_head: Head | None = None, *,
           legacy: bool = False, on_record: Callable[[Record], None] | None = None) -> Scan:
    """Scan ``path`` and check it against its anchor and the Redis head.

    ``result.ok`` if untouched.  Without an anchor, a non-empty log passes only
    with ``legacy``, only if it is wholly unkeyed, and only against the Redis
    head (the trust model of logs written before keyed records).
    """
    watch = [h.seq for h in (anchor, redis_head) if h is not None]
    result = scan(path, key, on_record, watch)
    if anchor is not None:
        problems = check_head(result, anchor, "anchored")
        problems += witness_problems(result, anchor, redis_head)
    elif not result.records:
        problems = []
    elif not legacy or result.keyed:
        problems = [_NO_ANCHOR.format(path=anchor_path(path))]
    elif redis_head is None:
        problems = ["an unkeyed (legacy) log without an anchor, and Redis has no head for it "
                    "(Redis was restarted): its tail cannot be checked; re-anchor it with "
                    "`ia audit reanchor --by NAME --reason TEXT`"]
    else:
        problems = check_head(result, redis_head)
        result.notes.append(f"unkeyed (legacy): {result.legacy} SHA-256 record(s); their "
                            "tamper evidence rests on the Redis head alone")
    for problem in problems:
        result.problem(problem)
    return result


# --------------------------------------------------------------------------- completeness


@dataclass
class _Story:
    first_at: int
    deadline: int
    needs: set[str] = field(default_factory=set)
    has: set[str] = field(default_factory=set)
    decided: bool = False
    interrupted: bool = False


class Completeness:
    """Which decisions have a complete record in the log.

    A decision's record is complete when the log holds the decision and,
    if it carries an action, the outcome of that action (``phase`` action);
    for ``needs_approval`` decisions also the approval request and its
    resolution.  Non-actionable decisions summarised in ``observations``
    records are complete when summarised.  A decision whose record is not yet
    complete is *pending* until its deadline (first record + ``grace_ms``,
    or the approval's expiry + ``grace_ms``) and *overdue* afterwards::

        ratio = complete / (complete + overdue)

    Pending decisions are reported on their own rather than counted either
    way, so the ratio neither hides a missing outcome for long nor punishes
    an action that is still running.  Each decision counts once: later
    records of a complete decision (verification, compensation, a redelivery)
    are part of its story but do not reopen it.

    An action reported ``interrupted`` (its actuator died or failed after it
    may have started, so nobody knows what it did) is accounted for but not a
    complete story: it counts as ``interrupted``, not ``complete``, and
    lowers the ratio until a human has looked.  So does every record the audit writer
    could not decode (an ``undecodable`` record in the log: a decision, approval or
    outcome nobody can account for), and every offset its consumer went on past without
    reading (a ``skipped`` record names the range)::

        ratio = complete / (complete + overdue + interrupted + undecodable + skipped)
    """

    def __init__(self, grace_ms: int = 300_000, remember: int = 1_000_000) -> None:
        self.grace_ms = grace_ms
        self.complete = 0
        self.interrupted = 0
        self.undecodable = 0
        self.skipped = 0
        self.summarised = 0
        self._open: dict[str, _Story] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def add(self, rec: Record) -> None:
        if rec.kind == "undecodable":
            self.undecodable += 1
            return
        if rec.kind == "skipped":
            self.skipped += int(rec.data.get("offsets", 0))
            return
        if rec.kind == "observations":
            n = int(rec.data.get("count", 0))
            self.complete += n
            self.summarised += n
            return
        if rec.id in self._done:
            return
        story = self._open.get(rec.id)
        if story is None:
            story = _Story(rec.at, rec.at + self.grace_ms, needs={"decision"})
            self._open[rec.id] = story
        if rec.kind == "decision":
            story.decided = True
            story.has.add("decision")
            if rec.data.get("action"):
                story.needs.add("outcome")
            if rec.data.get("mode") == "needs_approval":
                story.needs |= {"approval_requested", "approval_resolved"}
        elif rec.kind == "approval":
            status = rec.data.get("status")
            story.has.add("approval_requested" if status == "requested" else "approval_resolved")
            expires = int(rec.data.get("expires_at", 0) or 0)
            story.deadline = max(story.deadline, expires + self.grace_ms)
        elif rec.kind == "outcome" and rec.data.get("phase", "action") == "action":
            story.has.add("outcome")
            story.interrupted = rec.data.get("status") == "interrupted"
        if story.decided and story.needs <= story.has:
            if story.interrupted:
                self.interrupted += 1
            else:
                self.complete += 1
            del self._open[rec.id]
            self._done[rec.id] = None
            if len(self._done) > self._remember:
                self._done.popitem(last=False)

    def stats(self, now_ms: int) -> dict[str, float]:
        overdue = sum(1 for s in self._open.values() if s.deadline < now_ms)
        pending = len(self._open) - overdue
        unaccounted = self.interrupted + self.undecodable + self.skipped
        denominator = self.complete + overdue + unaccounted
        return {"complete": self.complete, "pending": pending, "overdue": overdue,
                "interrupted": self.interrupted, "undecodable": self.undecodable,
                "skipped": self.skipped,
                "summarised": self.summarised,
                "ratio": self.complete / denominator if denominator else 1.0}

    def overdue(self, now_ms: int) -> list[tuple[str, list[str]]]:
        """``(decision id, missing parts)`` of every overdue decision."""
        return [(did, sorted(s.needs - s.has)) for did, s in self._open.items()
                if s.deadline < now_ms]


# --------------------------------------------------------------------------- writing


def is_actionable(decision: dict[str, Any]) -> bool:
    return bool(decision.get("action")) or decision.get("mode", "none") != "none"


def observations(decisions: Iterable[dict[str, Any]]) -> dict[str, Any]:
    """The digest record of a batch of non-actionable decisions."""
    ds = list(decisions)
    ids = sorted(d["decision_id"] for d in ds)
    return {"count": len(ds),
            "first_decided_at": min(d["decided_at"] for d in ds),
            "last_decided_at": max(d["decided_at"] for d in ds),
            "ids_sha256": hashlib.sha256("\n".join(ids).encode()).hexdigest()}


class AuditFile:
    """Appends sealed records to the log file; one writer at a time."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def append(self, records: list[Record]) -> None:
        """Write and fsync ``records``; they are durable when this returns."""
        if records:
            hashchain.append(self.path, b"".join(r.line for r in records))

    def truncate(self, offset: int) -> None:
        with open(self.path, "r+b") as fh:
            fh.truncate(offset)
            fh.flush()
            os.fsync(fh.fileno())


class Chain:
    """Builds the next records of a chain from its head (no I/O)."""

    def __init__(self, key: ChainKey, head: Head = EMPTY) -> None:
        self.key = key
        self.head = head

    def extend(self, entries: Iterable[tuple[int, str, str, str, dict[str, Any]]]
               ) -> list[Record]:
        """Seal ``(at, kind, id, src, data)`` entries after the head; advances the head."""
        out = []
        head = self.head
        for at, kind, rid, src, data in entries:
            rec = seal(head.seq + 1, head.hash, at=at, kind=kind, id=rid, src=src, data=data,
                       key=self.key)
            out.append(rec)
            head = rec.head
        self.head = head
        return out


def tracking(completeness: Completeness) -> Callable[[Record], None]:
    """Feed ``completeness`` the records that belong to decisions' stories (a
    re-anchor record belongs to none)."""
    def add(rec: Record) -> None:
        if rec.kind != "reanchor":
            completeness.add(rec)
    return add


def recover(path: Path, key: ChainKey, anchor: Head | None, redis_head: Head | None,
            pending: Head | None, known: Head | None = None) -> tuple[Head, list[Record]]:
    """Make ``path`` agree with its anchor before appending to it again.

    Returns the head to continue from and the records after the last head
    whose source offsets are recorded (``redis_head``, else ``known``, what this
    process committed itself): their offsets must be recorded now.  A
    complete batch announced by ``pending`` that the anchor does not cover yet
    is kept (its records are keyed, so the writer wrote them); any other keyed
    tail beyond the anchor is cut off: its source records were not acknowledged
    and will be delivered again.  Without an anchor, an unkeyed (legacy) log is
    adopted if the Redis head vouches for it.  Anything else raises
    :class:`AuditError`: the writer refuses to extend a log that fails verification.
    """
    trusted = anchor if anchor is not None else _legacy_head(path, key, redis_head)
    base = redis_head or known or trusted
    since = min(base.seq, trusted.seq)
    beyond: list[Record] = []
    result = scan(path, key, lambda r: beyond.append(r) if r.seq > since else None,
                  watch=[h.seq for h in (trusted, redis_head) if h is not None])
    partial = result.partial_tail_at is not None
    problems = [p for p in result.problems if "incomplete last record" not in p]
    tail = check_head(result, trusted, "anchored")
    if result.uncommitted:
        tail = []  # a tail beyond the anchor is judged below
    if redis_head is not None:
        tail += witness_problems(result, trusted, redis_head)
    if problems or tail:
        raise AuditError("; ".join(problems + tail))
    uncommitted = [r for r in beyond if r.seq > trusted.seq]
    if any(not r.keyed for r in uncommitted):
        raise AuditError(f"unkeyed records beyond the anchored head (seq {trusted.seq}): "
                         "appended outside the writer")
    new_head = trusted
    if uncommitted and pending is not None and result.last == pending and not partial:
        new_head = pending  # the batch was written completely: commit it
    elif uncommitted or partial:
        AuditFile(path).truncate(result.end_offsets.get(trusted.seq, 0))
    return new_head, [r for r in beyond if base.seq < r.seq <= new_head.seq]


def _legacy_head(path: Path, key: ChainKey, redis_head: Head | None) -> Head:
    """The head of a log without an anchor: empty, or an unkeyed log that ends
    at the Redis head (a partly written last line aside, which is cut off)."""
    result = scan(path, key, watch=[redis_head.seq] if redis_head else [])
    if not result.records and result.partial_tail_at is None:
        return EMPTY
    if result.keyed:
        raise AuditError(_NO_ANCHOR.format(path=anchor_path(path)))
    if redis_head is None:
        raise AuditError(f"{path} has no anchor and Redis has no head for it (Redis was "
                         "restarted before the log was ever anchored): check the log and "
                         "re-anchor it with `ia audit reanchor --by NAME --reason TEXT`")
    problems = [p for p in result.problems if "incomplete last record" not in p]
    problems += check_head(result, redis_head)
    if problems:
        raise AuditError("; ".join(problems))
    log.warning("audit: anchoring the unkeyed (legacy) log %s at seq %d, as its Redis head "
                "vouches; later records are keyed", path, redis_head.seq)
    return redis_head


def find(path: Path, decision_id: str, key: ChainKey) -> list[Record]:
    """Every record about ``decision_id``, in log order (each one's own hash checked)."""
    needle = json.dumps(decision_id).encode()
    out = []
    for lineno, _off, line, complete in read_lines(path):
        if not complete or needle not in line:
            continue
        try:
            rec = parse(line, key)
        except SealError as exc:
            raise AuditError(f"line {lineno}: {exc}") from None
        if rec.id == decision_id:
            out.append(rec)
    return out
