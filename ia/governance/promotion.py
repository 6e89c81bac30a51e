"""Promoting a candidate policy to production, and rolling it back, on the record.

``ia shadow promote`` copies the candidate over the production policy file (the
worker and actuator reload it within a second) after keeping the current
version; ``ia shadow rollback`` puts the kept version back.  Both append to a
hash-chained promotion log (:class:`PromotionLog`, chained as
:mod:`ia.governance.hashchain` says, with unkeyed SHA-256 lines).

The promotion log is its own file beside the audit log rather than records in
it: the audit log has a single leased writer fed from Kafka topics
(``ia audit-writer``) and a fixed set of record kinds, and a CLI appending to it
would break that writer's head check.  ``ia shadow history`` verifies it.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ia.core.clock import now_ms
from ia.core.errors import IaError
from ia.core.settings import Settings
from ia.decisions.policy import Policy
from ia.governance import hashchain
from ia.governance.hashchain import GENESIS, SealError


class PromotionError(IaError):
    """A promotion or rollback that must not happen (message says why)."""


# --------------------------------------------------------------------------- promotion log


class PromotionLog:
    """Append-only JSON Lines; each record holds the hash of the one before it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        return [json.loads(line) for _n, _o, line, _c in hashchain.read_lines(self.path)
                if line.strip()]

    def verify(self) -> list[str]:
        """Problems found (empty if every record is intact and chained)."""
        problems: list[str] = []
        seq, last = 0, GENESIS
        for lineno, _offset, line, _complete in hashchain.read_lines(self.path):
            try:
                fields, digest = hashchain.unseal(line, None)
            except SealError as exc:
                problems.append(f"record {lineno}: {exc}")
                seq, last = seq + 1, "?"  # keep counting; the next link cannot match
                continue
            problems.extend(f"record {lineno}: {p}" for p in
                            hashchain.link_problems(fields.get("seq"), fields.get("prev"),
                                                    seq, last))
            seq, last = seq + 1, digest
        return problems

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        problems = self.verify()
        if problems:
            raise PromotionError(f"{self.path}: refusing to extend a log that fails "
                                 f"verification: {problems[0]}")
        recs = self.records()
        body = {"seq": len(recs) + 1, "prev": recs[-1]["hash"] if recs else GENESIS,
                "at": now_ms(), **entry}
        line, digest = hashchain.seal(body, None)
        hashchain.append(self.path, line)
        return {**body, "hash": digest}


# --------------------------------------------------------------------------- promote / rollback


@dataclass(frozen=True)
class Places:
    """Where promotions are recorded and superseded policy versions are kept."""

    log: Path
    versions: Path

    @classmethod
    def of(cls, s: Settings) -> Places:
        base = s.audit_log.parent
        return cls(base / f"{s.topic_prefix}.promotions.jsonl", base / "policy-versions")


def _write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` in one step: a reader (the worker's hot reload) sees the old
    file or the new one, never half of one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _keep(places: Places, text: bytes, version: str) -> Path:
    places.versions.mkdir(parents=True, exist_ok=True)
    kept = places.versions / f"{version}.yaml"
    if not kept.exists():
        _write_atomically(kept, text)
    return kept


def _evidence(files: Sequence[Path]) -> list[dict[str, str]]:
    return [{"file": str(f), "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
            for f in files]


def promote(candidate: Path, production: Path, places: Places, by: str, reason: str,
            evidence: Sequence[Path] = ()) -> dict[str, Any]:
    """Make ``candidate`` the production policy, keeping the current one for rollback."""
    if not reason.strip():
        raise PromotionError("a reason is required")
    new = Policy.from_file(candidate)  # a candidate that does not load is never promoted
    old_text = production.read_bytes()
    old = Policy.from_text(old_text.decode("utf-8"), str(production))
    if new.version == old.version:
        raise PromotionError(f"{candidate} is already the production policy "
                             f"(version {new.version})")
    kept = _keep(places, old_text, old.version)
    _keep(places, candidate.read_bytes(), new.version)
    _write_atomically(production, candidate.read_bytes())
    return PromotionLog(places.log).append({
        "action": "promote", "by": by, "reason": reason, "production": str(production),
        "candidate": str(candidate), "from_version": old.version, "to_version": new.version,
        "kept": str(kept), "evidence": _evidence(evidence)})


def _in_force(records: list[dict[str, Any]], production: Path) -> list[dict[str, Any]]:
    """Promotions of ``production`` not yet rolled back, oldest first."""
    stack: list[dict[str, Any]] = []
    for rec in records:
        if rec.get("production") != str(production):
            continue
        if rec["action"] == "promote":
            stack.append(rec)
        elif rec["action"] == "rollback" and stack:
            stack.pop()
    return stack


def rollback(production: Path, places: Places, by: str, reason: str,
             force: bool = False) -> dict[str, Any]:
    """Put back the policy the last promotion of ``production`` replaced."""
    if not reason.strip():
        raise PromotionError("a reason is required")
    log = PromotionLog(places.log)
    stack = _in_force(log.records(), production)
    if not stack:
        raise PromotionError(f"no promotion of {production} to roll back")
    last = stack[-1]
    current = Policy.from_file(production).version
    if current != last["to_version"] and not force:
        raise PromotionError(
            f"{production} is version {current}, not {last['to_version']} as promoted at "
            f"seq {last['seq']}: it was changed since; use --force to roll back anyway")
    kept = Path(last["kept"])
    restored = Policy.from_file(kept)  # the kept file must still be a valid policy
    _write_atomically(production, kept.read_bytes())
    return log.append({
        "action": "rollback", "by": by, "reason": reason, "production": str(production),
        "from_version": current, "to_version": restored.version, "undoes": last["seq"],
        "kept": str(kept)})
