"""Shadow mode: a candidate policy/model beside production, compared, then promoted.

* ``ia worker --shadow --policy CANDIDATE`` runs the worker's pipeline on the
  same telemetry with its own consumer group (``<IA_APP_ID>-shadow``), its own
  Redis namespace (``<IA_REDIS_PREFIX>.shadow``: production feature and guard
  keys are never read or written) and pipeline id ``shadow`` (so its decision
  ids differ from production's), and publishes only to
  ``<prefix>.decisions.shadow``, which no actuator reads; its decisions carry
  ``mode: shadow`` (:mod:`ia.decisions.shadow`).
* ``ia shadow report`` compares the two decision topics over a time range.
* ``ia shadow promote`` copies the candidate over the production policy file
  (the worker and actuator reload it within a second) after keeping the
  current version; ``ia shadow rollback`` puts the kept version back.  Both
  append to a hash-chained promotion log (:class:`PromotionLog`).

The promotion log is its own file beside the audit log rather than records in
it: the audit log has a single leased writer fed from Kafka topics
(``ia audit-writer``) and a fixed set of record kinds, and a CLI appending to it
would break that writer's head check.  The log uses the same idea (each line
carries the SHA-256 of the previous one) and ``ia shadow history`` verifies it.
"""

from __future__ import annotations

import getpass
import hashlib
import json
import os
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ia.core.clock import now_ms
from ia.core.settings import Settings
from ia.decisions.policy import Policy
from ia.decisions.shadow import PIPELINE_ID
from ia.offline.backtest import Labels, Row, compare, guard_interventions, quality, volume
from ia.offline.recording import Partitions
from ia.schemas.models import Decision
from ia.schemas.serde import DecodeError, decode

GENESIS = "0" * 64


class PromotionError(RuntimeError):
    """A promotion or rollback that must not happen (message says why)."""


# --------------------------------------------------------------------------- the shadow worker


def shadow_settings(s: Settings) -> Settings:
    """Settings of the shadow worker: own consumer group and Redis namespace."""
    return s.with_overrides(worker={"app_id": f"{s.worker.app_id}-{PIPELINE_ID}"},
                            redis={"prefix": f"{s.redis.prefix}.{PIPELINE_ID}"})


# --------------------------------------------------------------------------- report


def decisions_of(partitions: Partitions, fmt: str) -> tuple[list[Decision], int]:
    """Decoded decisions, first delivery of each decision id kept; and how many
    records could not be decoded."""
    seen: set[str] = set()
    out, bad = [], 0
    for p in sorted(partitions):
        for rec in partitions[p]:
            try:
                d = decode(rec.value or b"", Decision, fmt)
            except DecodeError:
                bad += 1
                continue
            if d.decision_id not in seen:
                seen.add(d.decision_id)
                out.append(d)
    return out, bad


def pair_rows(production: Iterable[Decision], shadow: Iterable[Decision]
              ) -> tuple[list[Row], list[Row], int, int]:
    """Rows of the events both sides decided, in (event time, event id) order, and
    the numbers decided by one side only (e.g. before the shadow started)."""
    prod = {d.event_id: Row.of(d) for d in production}
    shad = {d.event_id: Row.of(d) for d in shadow}
    both = sorted(set(prod) & set(shad), key=lambda e: (prod[e].ts, e))
    return ([prod[e] for e in both], [shad[e] for e in both], len(set(prod) - set(shad)),
            len(set(shad) - set(prod)))


def _side(rows: Sequence[Row], decisions: Sequence[Decision], labels: Labels | None
          ) -> dict[str, Any]:
    out: dict[str, Any] = {"decisions": len(decisions), "volume": volume(rows),
                           "guard_interventions": guard_interventions(rows),
                           "policy_versions": sorted({d.policy_version for d in decisions})}
    if labels is not None:
        out["quality"] = quality(rows, labels)
    return out


def compare_topics(production: Sequence[Decision], shadow: Sequence[Decision],
                   labels: Labels | None = None, examples: int = 50) -> dict[str, Any]:
    prod_rows, shad_rows, only_prod, only_shadow = pair_rows(production, shadow)
    changes = compare(prod_rows, shad_rows)
    kinds = {k: sum(c.kind == k for c in changes) for k in ("added", "removed", "changed")}
    return {"events_compared": len(prod_rows), "only_production": only_prod,
            "only_shadow": only_shadow,
            "production": _side(prod_rows, production, labels),
            "shadow": _side(shad_rows, shadow, labels),
            "diff": {**kinds, "examples": [c.to_json() for c in changes[:examples]]}}


def format_report(r: dict[str, Any]) -> str:
    d = r["diff"]
    lines = [f"events decided by both: {r['events_compared']} (production only "
             f"{r['only_production']}, shadow only {r['only_shadow']})",
             f"shadow vs production: {d['added']} actions added, {d['removed']} removed, "
             f"{d['changed']} changed"]
    for side in ("production", "shadow"):
        s = r[side]
        line = (f"{side:10} policy {','.join(s['policy_versions']) or '-'}: "
                f"{s['volume']['actions']} actions {s['volume']['by_mode']}, guard "
                f"interventions {s['guard_interventions']}")
        if "quality" in s:
            q = s["quality"]
            line += f"; precision {q['precision']}, recall {q['recall']}"
        lines.append(line)
    for ex in d["examples"][:10]:
        lines.append(f"  {ex['kind']:8} {ex['entity']}/{ex['metric']} ts={ex['ts']}: "
                     f"production {ex['baseline']['mode']} {ex['baseline']['action']} -> "
                     f"shadow {ex['candidate']['mode']} {ex['candidate']['action']}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- promotion log


def _digest(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":"),
                                     ensure_ascii=False).encode()).hexdigest()


class PromotionLog:
    """Append-only JSON Lines; each record holds the hash of the one before it."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def records(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        with self.path.open(encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]

    def verify(self) -> list[str]:
        """Problems found (empty if every record is intact and chained)."""
        problems, prev = [], GENESIS
        for i, rec in enumerate(self.records(), start=1):
            body = {k: v for k, v in rec.items() if k != "hash"}
            if rec.get("seq") != i or rec.get("prev") != prev:
                problems.append(f"record {i}: broken chain (removed, inserted or reordered)")
            if _digest(body) != rec.get("hash"):
                problems.append(f"record {i}: modified")
            prev = rec.get("hash", "?")
        return problems

    def append(self, entry: dict[str, Any]) -> dict[str, Any]:
        problems = self.verify()
        if problems:
            raise PromotionError(f"{self.path}: refusing to extend a log that fails "
                                 f"verification: {problems[0]}")
        recs = self.records()
        body = {"seq": len(recs) + 1, "prev": recs[-1]["hash"] if recs else GENESIS,
                "at": now_ms(), **entry}
        rec = {**body, "hash": _digest(body)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, (json.dumps(rec, sort_keys=True, ensure_ascii=False) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        return rec


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


def default_by() -> str:
    return f"{getpass.getuser()}@{socket.gethostname()}"


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
