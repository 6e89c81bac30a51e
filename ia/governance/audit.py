"""The tamper-evident audit log: a SHA-256 hash chain in a JSONL file.

Every record is one line of UTF-8 JSON, written once and never rewritten::

    {"seq":7,"prev":"<hash of record 6>","at":1764230400123,"kind":"outcome",
     "id":"dc-…","src":"<digest of the source record>","data":{…},"hash":"<sha256>"}

``hash`` and ``prev`` follow :mod:`ia.governance.hashchain` (the SHA-256 of the
line's exact bytes, each record linked to the one before it), so changing any
byte of a record, or removing or inserting one, breaks the chain.  The
*head* (last ``seq`` and ``hash``) is stored apart from the file (in Redis,
see :class:`ia.streams.audit`), so cutting records off the tail, or rewriting
the whole file with freshly computed hashes, no longer matches the head.

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

Nothing here needs Kafka or Redis: the writer agent (``ia audit-writer``) and
the CLI (``ia audit verify|show``) use these functions on plain files.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ia.core.errors import IaError
from ia.governance import hashchain
from ia.governance.hashchain import GENESIS, SealError, read_lines

KINDS = frozenset({"decision", "observations", "approval", "outcome"})
_MAX_PROBLEMS = 50


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

    @property
    def head(self) -> Head:
        return Head(self.seq, self.hash)


def seal(seq: int, prev: str, *, at: int, kind: str, id: str, src: str,
         data: dict[str, Any]) -> Record:
    """Build record ``seq`` chained to ``prev``; ``record.line`` is what to append."""
    if kind not in KINDS:
        raise ValueError(f"unknown audit record kind {kind!r}")
    line, digest = hashchain.seal({"seq": seq, "prev": prev, "at": at, "kind": kind, "id": id,
                                   "src": src, "data": data})
    return Record(seq, prev, at, kind, id, src, data, digest, line)


def parse(line: bytes) -> Record:
    """One line (without its newline) back into a record, checking its own hash.

    Raises :class:`~ia.governance.hashchain.SealError` for a line that is not an
    intact audit record.
    """
    obj, digest = hashchain.unseal(line)
    try:
        rec = Record(int(obj["seq"]), str(obj["prev"]), int(obj["at"]), str(obj["kind"]),
                     str(obj["id"]), str(obj["src"]), dict(obj["data"]), digest, line)
    except (ValueError, KeyError, TypeError) as exc:
        raise SealError(f"malformed record: {exc}") from None
    if rec.kind not in KINDS:
        raise SealError(f"unknown kind {rec.kind!r}")
    return rec


# --------------------------------------------------------------------------- verification


@dataclass
class Scan:
    """What reading a whole log found."""

    records: int = 0
    last: Head = EMPTY
    problems: list[str] = field(default_factory=list)
    # Byte offset just after each record, by seq (for truncating an uncommitted tail).
    end_offsets: dict[int, int] = field(default_factory=dict)
    partial_tail_at: int | None = None  # offset of a last line without newline

    def problem(self, text: str) -> None:
        if len(self.problems) < _MAX_PROBLEMS:
            self.problems.append(text)
        elif len(self.problems) == _MAX_PROBLEMS:
            self.problems.append("… (more problems not shown)")

    @property
    def ok(self) -> bool:
        return not self.problems


def scan(path: Path, on_record=None) -> Scan:
    """Read ``path`` and check every record's hash and its link to the previous one."""
    out = Scan()
    prev = EMPTY
    for lineno, offset, line, complete in read_lines(path):
        if not complete:
            out.partial_tail_at = offset
            out.problem(f"line {lineno}: incomplete last record (the tail was cut)")
            break
        try:
            rec = parse(line)
        except SealError as exc:
            out.problem(f"line {lineno}: {exc}")
            prev = Head(prev.seq + 1, "?")  # keep counting; the next link cannot match
            continue
        for problem in hashchain.link_problems(rec.seq, rec.prev, prev.seq, prev.hash):
            out.problem(f"line {lineno}: {problem}")
        prev = rec.head
        out.records += 1
        out.last = rec.head
        out.end_offsets[rec.seq] = offset + len(line) + 1
        if on_record is not None:
            on_record(rec)
    return out


def check_head(result: Scan, head: Head | None, pending: Head | None = None) -> list[str]:
    """Problems of a scanned log against its stored head (and an in-flight batch)."""
    if head is None:
        if result.records:
            return ["no stored head for a non-empty log (the head was lost or removed)"]
        return []
    last = result.last
    if last.seq < head.seq:
        return [f"the log ends at seq {last.seq} but the stored head is seq {head.seq}: "
                f"{head.seq - last.seq} record(s) were removed from the tail"]
    if last.seq > head.seq:
        if pending is not None and last.seq <= pending.seq:
            return []  # a batch is being written right now
        return [f"the log has {last.seq - head.seq} record(s) beyond the stored head "
                f"(seq {head.seq}): records were appended outside the writer"]
    if last.hash != head.hash:
        return [f"record {last.seq} does not match the stored head (the log was rewritten)"]
    return []


def verify(path: Path, head: Head | None, pending: Head | None = None,
           on_record=None) -> Scan:
    """Scan ``path`` and check it against its stored head; ``result.ok`` if untouched."""
    result = scan(path, on_record)
    for problem in check_head(result, head, pending):
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
    lowers the ratio until a human has looked::

        ratio = complete / (complete + overdue + interrupted)
    """

    def __init__(self, grace_ms: int = 300_000, remember: int = 1_000_000) -> None:
        self.grace_ms = grace_ms
        self.complete = 0
        self.interrupted = 0
        self.summarised = 0
        self._open: dict[str, _Story] = {}
        self._done: OrderedDict[str, None] = OrderedDict()
        self._remember = remember

    def add(self, rec: Record) -> None:
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
        denominator = self.complete + overdue + self.interrupted
        return {"complete": self.complete, "pending": pending, "overdue": overdue,
                "interrupted": self.interrupted, "summarised": self.summarised,
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

    def __init__(self, head: Head = EMPTY) -> None:
        self.head = head

    def extend(self, entries: Iterable[tuple[int, str, str, str, dict[str, Any]]]
               ) -> list[Record]:
        """Seal ``(at, kind, id, src, data)`` entries after the head; advances the head."""
        out = []
        head = self.head
        for at, kind, rid, src, data in entries:
            rec = seal(head.seq + 1, head.hash, at=at, kind=kind, id=rid, src=src, data=data)
            out.append(rec)
            head = rec.head
        self.head = head
        return out


def recover(path: Path, head: Head | None, pending: Head | None) -> tuple[Head, list[Record]]:
    """Make ``path`` agree with its stored head before appending to it again.

    Returns the head to continue from and the records of an interrupted batch
    that turned out complete (their head must now be committed).  An
    uncommitted, partly written batch (announced by ``pending``) is cut off:
    its source records were not acknowledged and will be delivered again.
    Anything else that does not match the head raises :class:`AuditError`:
    the writer refuses to extend a log that fails verification.
    """
    head = head or EMPTY
    beyond: list[Record] = []
    result = scan(path, on_record=lambda r: beyond.append(r) if r.seq > head.seq else None)
    partial = result.partial_tail_at is not None
    problems = [p for p in result.problems if "incomplete last record" not in p]
    if problems:
        raise AuditError("; ".join(problems))
    last = result.last
    if last.seq < head.seq or (last.seq == head.seq and last.hash != head.hash):
        raise AuditError("; ".join(check_head(result, head)))
    if last.seq == head.seq and not partial:
        return head, []
    if pending is None:
        raise AuditError("; ".join(check_head(result, head)) or
                         "an incomplete record follows the stored head")
    if last == pending and not partial:
        return last, beyond  # the batch was written completely: commit it
    AuditFile(path).truncate(result.end_offsets.get(head.seq, 0))
    return head, []


def find(path: Path, decision_id: str) -> list[Record]:
    """Every record about ``decision_id``, in log order (each one's own hash checked)."""
    needle = json.dumps(decision_id).encode()
    out = []
    for lineno, _off, line, complete in read_lines(path):
        if not complete or needle not in line:
            continue
        try:
            rec = parse(line)
        except SealError as exc:
            raise AuditError(f"line {lineno}: {exc}") from None
        if rec.id == decision_id:
            out.append(rec)
    return out
