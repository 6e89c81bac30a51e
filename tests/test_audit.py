"""The audit hash chain: tamper detection, crash recovery and completeness.

The chain itself is plain files (no Redis, no Kafka); the writer's head,
lease and offsets are checked against the real Redis.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from ia.governance.audit import (
    EMPTY,
    AuditError,
    AuditFile,
    Chain,
    Completeness,
    Head,
    find,
    parse,
    recover,
    scan,
    seal,
    verify,
)
from ia.governance.audit_store import AuditWriter, RedisAuditState, SourceRecord
from ia.governance.hashchain import GENESIS, SealError
from ia.schemas.models import (
    Action,
    ActionOutcome,
    ApprovalEvent,
    ApprovalStatus,
    Decision,
    Mode,
    ModelInfo,
    OutcomeStatus,
    RuleTrace,
)
from ia.schemas.serde import encode

T0 = 1_732_700_000_000


def _entries(n: int) -> list[tuple[int, str, str, str, dict]]:
    return [(T0 + i, "outcome", f"dc-{i % 3}", f"t/0/{i}",
             {"decision_id": f"dc-{i % 3}", "status": "succeeded", "detail": "é ∑ \"q\" 1e-05",
              "n": i, "x": 0.1 * i})
            for i in range(n)]


def _write_log(path: Path, n: int = 6) -> Head:
    chain = Chain()
    AuditFile(path).append(chain.extend(_entries(n)))
    return chain.head


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, Head]:
    path = tmp_path / "audit.jsonl"
    return path, _write_log(path)


# --------------------------------------------------------------------------- records


def test_seal_and_parse_round_trip() -> None:
    rec = seal(1, GENESIS, at=T0, kind="decision", id="dc-1", src="t/0/1",
               data={"a": [1, 2.5, None], "ü": "∑"})
    assert rec.line.endswith(b"\n") and rec.line.count(b"\n") == 1
    back = parse(rec.line[:-1])
    assert (back.seq, back.prev, back.data, back.hash) == (1, GENESIS, rec.data, rec.hash)
    with pytest.raises(ValueError):
        seal(1, GENESIS, at=T0, kind="bogus", id="", src="", data={})
    with pytest.raises(SealError):
        parse(b'{"seq":1}')


def test_untouched_log_verifies(log) -> None:
    path, head = log
    result = verify(path, head)
    assert result.ok, result.problems
    assert result.records == 6 and result.last == head


def test_every_single_byte_change_is_detected(tmp_path: Path) -> None:
    path = tmp_path / "small.jsonl"
    head = _write_log(path, 2)
    original = path.read_bytes()
    for i in range(len(original)):
        for flip in (0x01, 0x20) if i % 7 == 0 else (0x01,):
            changed = bytearray(original)
            changed[i] ^= flip
            path.write_bytes(bytes(changed))
            assert not verify(path, head).ok, f"byte {i} ^ {flip:#x} went unnoticed"
    path.write_bytes(original)
    assert verify(path, head).ok


def test_semantically_equal_byte_change_is_detected(log) -> None:
    """1e-05 and 1E-05 are the same JSON number; the chain hashes bytes, not values."""
    path, head = log
    text = path.read_bytes()
    assert b"1e-05" in text
    path.write_bytes(text.replace(b"1e-05", b"1E-05", 1))
    assert any("modified" in p for p in verify(path, head).problems)


@pytest.mark.parametrize("index", [0, 2, 5])
def test_removed_record_is_detected(log, index: int) -> None:
    path, head = log
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[index]
    path.write_bytes(b"".join(lines))
    problems = verify(path, head).problems
    assert problems
    if index == 5:  # the last one: only the stored head can tell
        assert any("removed from the tail" in p for p in problems)
        assert scan(path).ok


def test_inserted_record_is_detected(log) -> None:
    path, head = log
    lines = path.read_bytes().splitlines(keepends=True)
    forged = seal(3, parse(lines[1][:-1]).hash, at=T0, kind="outcome", id="dc-x", src="",
                  data={"forged": True})
    path.write_bytes(b"".join([*lines[:2], forged.line, *lines[2:]]))
    assert any("removed or inserted" in p for p in verify(path, head).problems)


def test_duplicated_record_is_detected(log) -> None:
    path, head = log
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:3], lines[2], *lines[3:]]))
    assert not verify(path, head).ok


@pytest.mark.parametrize("cut", ["mid_line", "whole_lines", "everything"])
def test_truncated_tail_is_detected(log, cut: str) -> None:
    path, head = log
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    keep = {"mid_line": data[: len(data) - 40],
            "whole_lines": b"".join(lines[:-2]),
            "everything": b""}[cut]
    path.write_bytes(keep)
    problems = verify(path, head).problems
    assert problems, cut
    assert any("tail" in p for p in problems)


def test_rewritten_log_with_recomputed_hashes_is_detected(log) -> None:
    """Rewriting history consistently still cannot match the head stored apart."""
    path, head = log
    forged = [parse(line) for line in path.read_bytes().splitlines()]
    forged[1].data["status"] = "failed"
    chain = Chain()
    path.write_bytes(b"".join(r.line for r in chain.extend(
        (r.at, r.kind, r.id, r.src, r.data) for r in forged)))
    assert scan(path).ok
    assert any("does not match the stored head" in p for p in verify(path, head).problems)


def test_records_beyond_head_are_detected_unless_in_flight(log) -> None:
    path, head = log
    chain = Chain(head)
    AuditFile(path).append(chain.extend(_entries(1)))
    assert any("beyond the stored head" in p for p in verify(path, head).problems)
    assert verify(path, head, pending=chain.head).ok
    assert not verify(path, None).ok


def test_find_returns_the_records_of_one_decision(log) -> None:
    path, _ = log
    assert [r.seq for r in find(path, "dc-1")] == [2, 5]
    assert find(path, "dc-nope") == []


# --------------------------------------------------------------------------- recovery


def test_recover_commits_a_complete_batch_and_cuts_a_partial_one(log) -> None:
    path, head = log
    clean = path.read_bytes()
    chain = Chain(head)
    batch = chain.extend(_entries(3))
    AuditFile(path).append(batch)
    # written completely, head not yet committed: roll forward
    new_head, finished = recover(path, head, chain.head)
    assert new_head == chain.head and [r.seq for r in finished] == [7, 8, 9]
    # written in part (crash mid-append): cut back to the committed head
    path.write_bytes(clean + batch[0].line + batch[1].line[:10])
    assert recover(path, head, chain.head) == (head, [])
    assert path.read_bytes() == clean
    # nothing announced but records beyond the head: refuse
    AuditFile(path).append(batch[:1])
    with pytest.raises(AuditError, match="beyond the stored head"):
        recover(path, head, None)


def test_recover_refuses_a_tampered_log(log) -> None:
    path, head = log
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))
    with pytest.raises(AuditError, match="removed from the tail"):
        recover(path, head, None)
    path.write_bytes(b"".join(lines).replace(b"succeeded", b"succeedeD", 1))
    with pytest.raises(AuditError, match="modified"):
        recover(path, head, None)


# --------------------------------------------------------------------------- completeness


def _rec(seq: int, kind: str, did: str, at: int = T0, **data) -> object:
    return seal(seq, GENESIS, at=at, kind=kind, id=did, src="", data=data)


def test_completeness_counts_complete_pending_and_overdue() -> None:
    c = Completeness(grace_ms=1000)
    c.add(_rec(1, "decision", "a", action={"type": "log"}, mode="auto"))
    c.add(_rec(2, "outcome", "a", phase="action"))
    c.add(_rec(3, "decision", "b", action={"type": "log"}, mode="needs_approval"))
    c.add(_rec(4, "approval", "b", status="requested", expires_at=T0 + 60_000))
    c.add(_rec(5, "outcome", "c", phase="action"))  # its decision came later
    c.add(_rec(6, "decision", "c", action={"type": "log"}, mode="blocked"))
    c.add(_rec(7, "decision", "d", action={"type": "log"}, mode="auto"))
    c.add(_rec(8, "observations", "", count=40))
    s = c.stats(T0 + 5000)
    assert (s["complete"], s["pending"], s["overdue"]) == (42, 1, 1)  # b waits, d is late
    assert s["ratio"] == pytest.approx(42 / 43)
    assert c.overdue(T0 + 5000) == [("d", ["outcome"])]
    c.add(_rec(9, "outcome", "d", phase="verification"))  # not the action's outcome
    assert c.stats(T0 + 5000)["overdue"] == 1
    c.add(_rec(10, "outcome", "d", phase="action"))
    c.add(_rec(11, "approval", "b", status="rejected", expires_at=T0 + 60_000))
    c.add(_rec(12, "outcome", "b", phase="action"))
    # later records of a complete decision neither reopen it nor count it twice
    c.add(_rec(13, "outcome", "a", phase="verification"))
    c.add(_rec(14, "outcome", "a", phase="compensation"))
    c.add(_rec(15, "decision", "a", action={"type": "log"}, mode="auto"))
    c.add(_rec(16, "outcome", "a", phase="action"))
    assert c.stats(T0 + 10**9) == {"complete": 44, "pending": 0, "overdue": 0, "interrupted": 0,
                                   "summarised": 40, "ratio": 1.0}


# --------------------------------------------------------------------------- writer + Redis


def _decision(i: int, action: bool) -> Decision:
    return Decision(
        decision_id=f"dc-{i}", correlation_id="c", event_id=f"ev-{i}", entity="svc-1",
        metric="latency_ms", value=float(i), ts=T0 + i, decided_at=T0 + i, anomaly_score=0.9,
        confidence=0.8, features={"zscore": 9.5}, model=ModelInfo(id="m", version="1"),
        rule_trace=[RuleTrace(rule="r", matched=True, reason="why")],
        action=Action(type="log", target="svc-1") if action else None,
        mode=Mode.auto if action else Mode.none)


def _outcome(i: int) -> ActionOutcome:
    return ActionOutcome(decision_id=f"dc-{i}", entity="svc-1", action_type="log",
                         target="svc-1", status=OutcomeStatus.succeeded, actuator="log",
                         started_at=T0, finished_at=T0 + 1, duration_ms=1.0)


@pytest.mark.integration
async def test_writer_records_once_and_survives_a_crash(aredis, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    path = tmp_path / "audit.jsonl"
    items = [SourceRecord("decision", "p.decisions", 0, i, encode(_decision(i, i % 5 == 0)))
             for i in range(20)]
    items.append(SourceRecord("outcome", "p.outcomes", 1, 0, encode(_outcome(0))))
    items.append(SourceRecord("outcome", "p.outcomes", 1, 1, b"not json"))
    w = AuditWriter(aredis, path, prefix=prefix)
    await w.start()
    recs = await w.write(items)
    # 4 actionable decisions, 1 digest of the 16 others, 1 outcome (1 undecodable skipped)
    assert [r.kind for r in recs].count("decision") == 4
    assert [r.kind for r in recs].count("observations") == 1 and w.undecodable == 1
    digest = next(r for r in recs if r.kind == "observations").data
    assert digest["count"] == 16 and digest["offsets"] == {"p.decisions/0": [1, 19]}
    # redelivery of the same offsets records nothing
    assert await w.write(items) == []
    state = RedisAuditState(aredis, prefix)
    head, pending = await state.heads()
    assert head == recs[-1].head and pending is None
    assert verify(path, head).ok

    # a second writer cannot take over while the lease is held
    with pytest.raises(AuditError, match="lease"):
        await AuditWriter(aredis, path, prefix=prefix, owner="other").start()

    # crash mid-batch: pending announced, half a record written, no commit
    chain = Chain(head)
    batch = chain.extend([(T0, "outcome", "dc-5", "p.outcomes/1/2", {"phase": "action"})])
    await state.begin(head, chain.head)
    path.write_bytes(path.read_bytes() + batch[0].line[:25])
    await w.close()
    w2 = AuditWriter(aredis, path, prefix=prefix, owner="restarted")
    await w2.start()
    assert verify(path, head).ok  # the partial record was cut off
    more = await w2.write([SourceRecord("outcome", "p.outcomes", 1, 2, encode(_outcome(5)))])
    assert [r.seq for r in more] == [head.seq + 1]
    head2, _ = await state.heads()
    assert verify(path, head2).ok and head2.seq == head.seq + 1
    stats = w2.completeness.stats(T0)
    assert stats["complete"] == 16 + 2 and stats["pending"] == 2  # dc-0, dc-5 done
    await w2.close()
    # the log's text is plain JSON lines
    assert all(json.loads(line)["hash"] for line in path.read_text().splitlines())
    assert EMPTY.seq == 0


@pytest.mark.integration
async def test_approval_events_are_recorded(aredis, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    path = tmp_path / "audit.jsonl"
    ev = ApprovalEvent(approval_id="ap-1", decision_id="dc-1", status=ApprovalStatus.requested,
                       entity="svc-1", metric="m", action=Action(type="log", target="svc-1"),
                       anomaly_score=0.9, confidence=0.5, requested_at=T0, expires_at=T0 + 1)
    w = AuditWriter(aredis, path, prefix=prefix)
    await w.start()
    recs = await w.write([SourceRecord("approval", "p.approvals", 0, 0, encode(ev))])
    assert recs[0].kind == "approval" and recs[0].id == "dc-1"
    assert recs[0].data["status"] == "requested"
    await w.close()


def test_story_tells_event_features_models_rules_guards_approval_and_outcomes() -> None:
    from ia.cli.audit import story

    d = _decision(7, True).model_dump(mode="json")
    d["mode"] = "needs_approval"
    d["rule_trace"].append({"rule": "guard:cooldown", "matched": True, "reason": "in cooldown"})
    d["explanation"] = {"summary": "latency far above its baseline",
                        "top_features": [{"name": "zscore", "value": 9.5, "weight": 0.8}],
                        "models": [{"id": "ewma", "version": "3"}], "drift_event": None,
                        "p_useful": 0.7}
    req = {"approval_id": "ap-7", "status": "requested", "requested_at": T0,
           "expires_at": T0 + 1, "on_expiry": "reject"}
    done = {**req, "status": "approved", "by": "ann", "via": "cli", "at": T0 + 1,
            "reason": "ok"}
    out = _outcome(7).model_dump(mode="json") | {"approved_by": "ann"}
    recs = Chain().extend([(T0, "decision", "dc-7", "", d), (T0, "approval", "dc-7", "", req),
                           (T0, "approval", "dc-7", "", done), (T0, "outcome", "dc-7", "", out)])
    text = story("dc-7", recs)
    for part in ("svc-1 latency_ms = 7", "m version 1", "component ewma version 3",
                 "zscore = 9.5", "latency far above its baseline", "p(useful) 0.70",
                 "✔ r: why", "✘ cooldown: in cooldown", "mode needs_approval",
                 "requested at", "approved by ann via cli", ": ok",
                 "[action] succeeded: log on svc-1", "approved by ann"):
        assert part in text, (part, text)


@pytest.mark.integration
async def test_all_decisions_can_be_recorded_in_full(aredis, tmp_path: Path) -> None:
    w = AuditWriter(aredis, tmp_path / "audit.jsonl", prefix=f"t{uuid.uuid4().hex[:8]}",
                    all_decisions=True)
    await w.start()
    recs = await w.write([SourceRecord("decision", "p.decisions", 0, i,
                                       encode(_decision(i, False))) for i in range(3)])
    assert [r.kind for r in recs] == ["decision"] * 3
    assert w.completeness.stats(T0)["complete"] == 3
    await w.close()
