"""The keyed audit chain: tamper detection, anchoring, crash recovery and completeness.

The chain and its anchor are plain files (no Redis, no Kafka); the writer's
head, lease and offsets are checked against the real Redis.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from ia.governance import hashchain
from ia.governance.audit import (
    EMPTY,
    AnchorFile,
    AuditError,
    AuditFile,
    Chain,
    Completeness,
    Head,
    anchor_path,
    find,
    parse,
    recover,
    scan,
    seal,
    verify,
)
from ia.governance.audit_store import AuditWriter, RedisAuditState, SourceRecord
from ia.governance.hashchain import GENESIS, ChainKey, SealError
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
KEY = ChainKey(b"k" * 32)
OTHER_KEY = ChainKey(b"x" * 32)


def _entries(n: int) -> list[tuple[int, str, str, str, dict]]:
    return [(T0 + i, "outcome", f"dc-{i % 3}", f"t/0/{i}",
             {"decision_id": f"dc-{i % 3}", "status": "succeeded", "detail": "é ∑ \"q\" 1e-05",
              "n": i, "x": 0.1 * i})
            for i in range(n)]


def _write_log(path: Path, n: int = 6) -> Head:
    chain = Chain(KEY)
    AuditFile(path).append(chain.extend(_entries(n)))
    return chain.head


@pytest.fixture
def log(tmp_path: Path) -> tuple[Path, Head]:
    path = tmp_path / "audit.jsonl"
    return path, _write_log(path)


# --------------------------------------------------------------------------- records


def test_seal_and_parse_round_trip() -> None:
    rec = seal(1, GENESIS, at=T0, kind="decision", id="dc-1", src="t/0/1",
               data={"a": [1, 2.5, None], "ü": "∑"}, key=KEY)
    assert rec.line.endswith(b"\n") and rec.line.count(b"\n") == 1
    assert rec.line.startswith(b'{"v":2,"seq":1,')
    back = parse(rec.line[:-1], KEY)
    assert (back.seq, back.prev, back.data, back.hash) == (1, GENESIS, rec.data, rec.hash)
    assert back.keyed
    with pytest.raises(ValueError):
        seal(1, GENESIS, at=T0, kind="bogus", id="", src="", data={}, key=KEY)
    with pytest.raises(SealError):
        parse(b'{"seq":1}', KEY)
    with pytest.raises(SealError, match="another key"):
        parse(rec.line[:-1], OTHER_KEY)
    with pytest.raises(SealError, match="no key"):
        parse(rec.line[:-1], None)


def test_untouched_log_verifies(log) -> None:
    path, head = log
    result = verify(path, KEY, head)
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
            assert not verify(path, KEY, head).ok, f"byte {i} ^ {flip:#x} went unnoticed"
    path.write_bytes(original)
    assert verify(path, KEY, head).ok


def test_semantically_equal_byte_change_is_detected(log) -> None:
    """1e-05 and 1E-05 are the same JSON number; the chain hashes bytes, not values."""
    path, head = log
    text = path.read_bytes()
    assert b"1e-05" in text
    path.write_bytes(text.replace(b"1e-05", b"1E-05", 1))
    assert any("modified" in p for p in verify(path, KEY, head).problems)


@pytest.mark.parametrize("index", [0, 2, 5])
def test_removed_record_is_detected(log, index: int) -> None:
    path, head = log
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[index]
    path.write_bytes(b"".join(lines))
    problems = verify(path, KEY, head).problems
    assert problems
    if index == 5:  # the last one: only the stored head can tell
        assert any("removed from the tail" in p for p in problems)
        assert scan(path, KEY).ok


def test_inserted_record_is_detected(log) -> None:
    path, head = log
    lines = path.read_bytes().splitlines(keepends=True)
    forged = seal(3, parse(lines[1][:-1], KEY).hash, at=T0, kind="outcome", id="dc-x",
                  src="", data={"forged": True}, key=KEY)
    path.write_bytes(b"".join([*lines[:2], forged.line, *lines[2:]]))
    assert any("removed or inserted" in p for p in verify(path, KEY, head).problems)


def test_duplicated_record_is_detected(log) -> None:
    path, head = log
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join([*lines[:3], lines[2], *lines[3:]]))
    assert not verify(path, KEY, head).ok


@pytest.mark.parametrize("cut", ["mid_line", "whole_lines", "everything"])
def test_truncated_tail_is_detected(log, cut: str) -> None:
    path, head = log
    data = path.read_bytes()
    lines = data.splitlines(keepends=True)
    keep = {"mid_line": data[: len(data) - 40],
            "whole_lines": b"".join(lines[:-2]),
            "everything": b""}[cut]
    path.write_bytes(keep)
    problems = verify(path, KEY, head).problems
    assert problems, cut
    assert any("tail" in p for p in problems)


def test_rewritten_log_with_recomputed_hashes_is_detected(log) -> None:
    """Rewriting history consistently still cannot match the anchor kept apart."""
    path, head = log
    forged = [parse(line, KEY) for line in path.read_bytes().splitlines()]
    forged[1].data["status"] = "failed"
    chain = Chain(KEY)
    path.write_bytes(b"".join(r.line for r in chain.extend(
        (r.at, r.kind, r.id, r.src, r.data) for r in forged)))
    assert scan(path, KEY).ok
    assert any("does not match the anchored head" in p for p in verify(path, KEY, head).problems)


def _forge_append(path: Path, head: Head, key: ChainKey | None) -> Head:
    """What an attacker who can write the log file appends: a record chained to the
    head, sealed with ``key`` (None: unkeyed, as anyone can compute it)."""
    line, digest = hashchain.seal({"seq": head.seq + 1, "prev": head.hash, "at": T0,
                                   "kind": "outcome", "id": "dc-x", "src": "",
                                   "data": {"forged": True}}, key)
    path.write_bytes((path.read_bytes() if path.exists() else b"") + line)
    return Head(head.seq + 1, digest)


def test_records_beyond_the_anchor_fail_verify_even_with_redis_pending_set(log) -> None:
    """S4: a ``pending`` head in Redis made appended records pass verify; only the
    writer's anchor commits records now."""
    path, head = log
    chain = Chain(KEY, head)
    AuditFile(path).append(chain.extend(_entries(1)))
    result = verify(path, KEY, head, redis_head=head)
    assert any("never committed" in p for p in result.problems)
    assert result.uncommitted == 1
    assert not verify(path, KEY, None).ok


@pytest.mark.parametrize("forger_key", [None, OTHER_KEY], ids=["unkeyed", "wrong-key"])
def test_forged_records_with_a_consistent_redis_head_fail_verify(log, forger_key) -> None:
    """S4: whoever can write the file and Redis, but has no key, cannot extend the
    chain: the forged record fails its HMAC and the anchor disagrees."""
    path, head = log
    forged_head = _forge_append(path, head, forger_key)
    problems = verify(path, KEY, head, redis_head=forged_head).problems
    assert any("after keyed ones" in p or "another key" in p for p in problems), problems
    assert any("ahead of the anchor" in p for p in problems), problems


def test_consistent_rewrite_of_log_and_redis_head_fails_against_the_anchor(log) -> None:
    """S4: a whole log recomputed as unkeyed SHA-256 with a matching Redis head (all
    the old tamper evidence had) no longer verifies: the anchor is keyed."""
    path, head = log
    path.write_bytes(b"")
    forged = EMPTY
    for _ in range(head.seq):
        forged = _forge_append(path, forged, None)
    assert forged.seq == head.seq and forged.hash != head.hash
    assert any("does not match the anchored head" in p
               for p in verify(path, KEY, head, redis_head=forged).problems)
    # with the anchor removed as well it fails by default, and passes only as legacy
    assert any("no anchor" in p for p in verify(path, KEY, None, redis_head=forged).problems)


def test_anchor_file_is_keyed_and_replaced_atomically(tmp_path: Path) -> None:
    anchor = AnchorFile(tmp_path / "a.head", KEY)
    assert anchor.read() is None
    anchor.write(Head(7, "ab" * 32))
    anchor.write(Head(8, "cd" * 32))
    assert anchor.read() == Head(8, "cd" * 32)
    assert [p.name for p in tmp_path.iterdir()] == ["a.head"]  # no temporary left behind
    with pytest.raises(AuditError, match="sealed with key id"):
        AnchorFile(tmp_path / "a.head", OTHER_KEY).read()
    text = (tmp_path / "a.head").read_bytes()
    (tmp_path / "a.head").write_bytes(text.replace(b'"seq":8', b'"seq":9'))
    with pytest.raises(AuditError, match="not intact"):
        anchor.read()
    assert "k" * 32 not in repr(KEY)


def test_redis_head_may_lag_the_anchor_but_not_lead_it(log) -> None:
    path, head = log
    lagging = parse(path.read_bytes().splitlines()[2], KEY).head
    result = verify(path, KEY, head, redis_head=lagging)
    assert result.ok and any("lags the anchor" in n for n in result.notes)
    missing = verify(path, KEY, head, redis_head=None)
    assert missing.ok and any("no audit head in Redis" in n for n in missing.notes)
    # an old anchor restored together with a cut log: the Redis head tells
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:3]))
    assert verify(path, KEY, lagging).ok
    assert any("ahead of the anchor" in p for p in verify(path, KEY, lagging, head).problems)


def _write_legacy_log(path: Path, n: int = 4) -> Head:
    """A log as written before records were keyed (plain SHA-256 lines)."""
    head = EMPTY
    for i in range(n):
        line, digest = hashchain.seal({"seq": i + 1, "prev": head.hash, "at": T0 + i,
                                       "kind": "outcome", "id": f"dc-{i}", "src": f"t/0/{i}",
                                       "data": {"decision_id": f"dc-{i}"}}, None)
        path.write_bytes((path.read_bytes() if path.exists() else b"") + line)
        head = Head(i + 1, digest)
    return head


def test_a_legacy_unkeyed_log_verifies_only_as_legacy(tmp_path: Path) -> None:
    path = tmp_path / "old.jsonl"
    head = _write_legacy_log(path)
    assert not verify(path, KEY, None, head).ok  # by default: no anchor is a failure
    legacy = verify(path, KEY, None, head, legacy=True)
    assert legacy.ok and legacy.legacy == 4 and legacy.keyed == 0
    assert any("unkeyed (legacy)" in n for n in legacy.notes)
    assert not verify(path, KEY, None, Head(3, head.hash), legacy=True).ok
    # the writer's recovery adopts it as its Redis head vouches; later records are keyed
    assert recover(path, KEY, None, head, None) == (head, [])
    chain = Chain(KEY, head)
    AuditFile(path).append(chain.extend(_entries(2)))
    result = verify(path, KEY, chain.head, chain.head)
    assert result.ok and (result.legacy, result.keyed) == (4, 2)
    # a legacy record changed after keyed ones were chained to it: detected
    data = path.read_bytes()
    path.write_bytes(data.replace(b'"dc-1"}', b'"dc-9"}', 1))
    assert not verify(path, KEY, chain.head, chain.head).ok


def test_find_returns_the_records_of_one_decision(log) -> None:
    path, _ = log
    assert [r.seq for r in find(path, "dc-1", KEY)] == [2, 5]
    assert find(path, "dc-nope", KEY) == []


# --------------------------------------------------------------------------- recovery


def test_recover_commits_a_complete_batch_and_cuts_a_partial_one(log) -> None:
    path, head = log
    clean = path.read_bytes()
    chain = Chain(KEY, head)
    batch = chain.extend(_entries(3))
    AuditFile(path).append(batch)
    # written completely, not yet anchored: roll forward
    new_head, finished = recover(path, KEY, head, head, chain.head)
    assert new_head == chain.head and [r.seq for r in finished] == [7, 8, 9]
    # anchored, Redis head behind (stopped between the two): the batch's offsets are due
    new_head, finished = recover(path, KEY, chain.head, head, chain.head)
    assert new_head == chain.head and [r.hash for r in finished] == [r.hash for r in batch]
    # written in part (crash mid-append): cut back to the anchored head
    path.write_bytes(clean + batch[0].line + batch[1].line[:10])
    assert recover(path, KEY, head, head, chain.head) == (head, [])
    assert path.read_bytes() == clean
    # a keyed tail nothing announced (Redis lost its pending): cut, it was never committed
    AuditFile(path).append(batch[:1])
    assert recover(path, KEY, head, None, None) == (head, [])
    assert path.read_bytes() == clean


def test_recover_refuses_a_tampered_log(log) -> None:
    path, head = log
    lines = path.read_bytes().splitlines(keepends=True)
    path.write_bytes(b"".join(lines[:-1]))
    with pytest.raises(AuditError, match="removed from the tail"):
        recover(path, KEY, head, head, None)
    path.write_bytes(b"".join(lines).replace(b"succeeded", b"succeedeD", 1))
    with pytest.raises(AuditError, match="modified"):
        recover(path, KEY, head, head, None)
    path.write_bytes(b"".join(lines))
    forged = _forge_append(path, head, None)
    with pytest.raises(AuditError, match="after keyed ones"):
        recover(path, KEY, head, head, forged)
    path.write_bytes(b"".join(lines))
    with pytest.raises(AuditError, match="no anchor"):
        recover(path, KEY, None, head, None)


# --------------------------------------------------------------------------- completeness


def _rec(seq: int, kind: str, did: str, at: int = T0, **data) -> object:
    return seal(seq, GENESIS, at=at, kind=kind, id=did, src="", data=data, key=KEY)


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
                                   "undecodable": 0, "skipped": 0, "summarised": 40, "ratio": 1.0}
    # a record nobody could decode is accounted for, against the ratio
    c.add(_rec(17, "undecodable", ""))
    assert c.stats(T0 + 10**9)["undecodable"] == 1
    assert c.stats(T0 + 10**9)["ratio"] == pytest.approx(44 / 45)


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
    w = AuditWriter(aredis, path, KEY, prefix=prefix)
    await w.start()
    recs = await w.write(items)
    # 4 actionable decisions, 1 digest of the 16 others, 1 outcome (1 undecodable skipped)
    assert [r.kind for r in recs].count("decision") == 4
    assert [r.kind for r in recs].count("observations") == 1 and w.undecodable == 1
    [bad] = [r for r in recs if r.kind == "undecodable"]  # in the chain, with its source
    assert bad.src == "p.outcomes/1/1" and bad.data["kind"] == "outcome" and bad.data["bytes"] == 8
    assert w.completeness.stats(T0)["undecodable"] == 1
    digest = next(r for r in recs if r.kind == "observations").data
    assert digest["count"] == 16 and digest["offsets"] == {"p.decisions/0": [1, 19]}
    # redelivery of the same offsets records nothing
    assert await w.write(items) == []
    state = RedisAuditState(aredis, prefix)
    head, pending = await state.heads()
    assert head == recs[-1].head and pending is None
    assert AnchorFile(anchor_path(path), KEY).read() == head
    assert verify(path, KEY, head, head).ok

    # a second writer cannot take over while the lease is held
    with pytest.raises(AuditError, match="lease"):
        await AuditWriter(aredis, path, KEY, prefix=prefix, owner="other").start()

    # crash mid-batch: pending announced, half a record written, no commit
    chain = Chain(KEY, head)
    batch = chain.extend([(T0, "outcome", "dc-5", "p.outcomes/1/2", {"phase": "action"})])
    await state.begin(head, chain.head)
    path.write_bytes(path.read_bytes() + batch[0].line[:25])
    await w.close()
    w2 = AuditWriter(aredis, path, KEY, prefix=prefix, owner="restarted")
    await w2.start()
    assert verify(path, KEY, head, head).ok  # the partial record was cut off
    more = await w2.write([SourceRecord("outcome", "p.outcomes", 1, 2, encode(_outcome(5)))])
    assert [r.seq for r in more] == [head.seq + 1]
    head2, _ = await state.heads()
    assert verify(path, KEY, head2, head2).ok and head2.seq == head.seq + 1
    stats = w2.completeness.stats(T0)
    assert stats["complete"] == 16 + 2 and stats["pending"] == 2  # dc-0, dc-5 done
    assert stats["undecodable"] == 1  # read back from the log after the restart
    # offsets 3..5 never delivered: the chain says so, and they count against the ratio
    gap = await w2.write([SourceRecord("outcome", "p.outcomes", 1, 6, encode(_outcome(6)))])
    assert [r.kind for r in gap] == ["skipped", "outcome"]
    assert (gap[0].data["first"], gap[0].data["last"], gap[0].data["offsets"]) == (3, 5, 3)
    assert w2.completeness.stats(T0)["skipped"] == 3
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
    w = AuditWriter(aredis, path, KEY, prefix=prefix)
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
    recs = Chain(KEY).extend([(T0, "decision", "dc-7", "", d), (T0, "approval", "dc-7", "", req),
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
    w = AuditWriter(aredis, tmp_path / "audit.jsonl", KEY, prefix=f"t{uuid.uuid4().hex[:8]}",
                    all_decisions=True)
    await w.start()
    recs = await w.write([SourceRecord("decision", "p.decisions", 0, i,
                                       encode(_decision(i, False))) for i in range(3)])
    assert [r.kind for r in recs] == ["decision"] * 3
    assert w.completeness.stats(T0)["complete"] == 3
    await w.close()


# --------------------------------------------------------------------------- Redis lost or away


def _actions(first: int, n: int) -> list[SourceRecord]:
    return [SourceRecord("decision", "p.decisions", 0, i, encode(_decision(i, True)))
            for i in range(first, first + n)]


@pytest.mark.integration
async def test_writer_restarts_on_a_redis_that_lost_everything(aredis, tmp_path: Path) -> None:
    """Finding 11.9: a Redis that lost everything (one without persistence, restarted)
    has no head, no offsets and no lease; the anchor beside the log carries the chain on."""
    prefix = f"t{uuid.uuid4().hex[:8]}"
    path = tmp_path / "audit.jsonl"
    w = AuditWriter(aredis, path, KEY, prefix=prefix)
    await w.start()
    first = await w.write(_actions(0, 4))
    await w.close()
    await aredis.delete(*[k async for k in aredis.scan_iter(f"{prefix}:*")])  # a fresh Redis

    assert verify(path, KEY, AnchorFile(anchor_path(path), KEY).read(), None).ok
    w2 = AuditWriter(aredis, path, KEY, prefix=prefix, owner="after-restart")
    await w2.start()
    assert w2.chain.head == first[-1].head
    state = RedisAuditState(aredis, prefix)
    assert (await state.heads())[0] == first[-1].head  # the Redis head is restored
    # a fresh broker starts its offsets at 0 again: nothing is skipped
    more = await w2.write(_actions(0, 2))
    assert [r.seq for r in more] == [5, 6]
    head, _ = await state.heads()
    assert verify(path, KEY, AnchorFile(anchor_path(path), KEY).read(), head).ok
    assert head == more[-1].head
    await w2.close()


@pytest.mark.integration
async def test_writer_waits_out_a_redis_outage(tmp_path: Path) -> None:
    """Finding 11.9: a Redis that goes away (and comes back empty, as one without
    persistence does) neither stops the writer nor loses or doubles a record."""
    from redis.exceptions import ConnectionError as RedisConnectionError

    from ia.core.redis import client as redis_client
    from ia.core.settings import RedisSettings
    from ia.runtime.embedded import start_redis

    svc = start_redis(tmp_path / "redis", durable=False)  # the password is kept across its restart
    client = redis_client(RedisSettings(url=svc.address, password_file=svc.password_file))
    path = tmp_path / "audit.jsonl"
    w = AuditWriter(client, path, KEY, prefix="p")
    try:
        await w.start()
        await w.write(_actions(0, 3))
        svc.stop()
        with pytest.raises(RedisConnectionError):  # the agent retries this batch later
            await w.write(_actions(3, 3))
        with pytest.raises(RedisConnectionError):  # the timer logs this and tries again
            await w.renew()
        assert verify(path, KEY, AnchorFile(anchor_path(path), KEY).read()).ok
        svc = start_redis(tmp_path / "redis", port=svc.port, durable=False)  # back, empty
        await w.renew()  # the vanished lease is taken again
        retried = await w.write(_actions(3, 3))
        assert [r.seq for r in retried] == [4, 5, 6]
        assert await w.write(_actions(0, 6)) == []  # a redelivery is still recorded once
        head, pending = await RedisAuditState(client, "p").heads()
        assert head == retried[-1].head and pending is None
        assert verify(path, KEY, AnchorFile(anchor_path(path), KEY).read(), head).ok
        assert [r.id for r in find(path, "dc-4", KEY)] == ["dc-4"]
    finally:
        await client.aclose()
        svc.stop()


@pytest.mark.integration
async def test_a_lease_taken_by_another_writer_stops_this_one(aredis, tmp_path: Path) -> None:
    prefix = f"t{uuid.uuid4().hex[:8]}"
    w = AuditWriter(aredis, tmp_path / "audit.jsonl", KEY, prefix=prefix, owner="one")
    await w.start()
    await aredis.set(f"{prefix}:audit:lease", "two")
    with pytest.raises(AuditError, match="another writer"):
        await w.renew()


@pytest.mark.integration
async def test_reanchor_records_who_why_and_the_heads_it_replaces(aredis, tmp_path: Path
                                                                   ) -> None:
    """An unkeyed log whose Redis head was lost (the state ``ia down``/``ia up`` left
    before this change) is refused by the writer until an operator re-anchors it."""
    from ia.governance.audit_store import reanchor

    prefix = f"t{uuid.uuid4().hex[:8]}"
    path = tmp_path / "audit.jsonl"
    legacy_head = _write_legacy_log(path)
    w = AuditWriter(aredis, path, KEY, prefix=prefix)
    with pytest.raises(AuditError, match="ia audit reanchor"):
        await w.start()
    rec = await reanchor(aredis, path, KEY, prefix=prefix, by="ann", reason="Redis restarted")
    assert rec.kind == "reanchor" and rec.keyed and rec.seq == legacy_head.seq + 1
    assert rec.data["by"] == "ann" and rec.data["reason"] == "Redis restarted"
    assert rec.data["log_head"] == {"seq": legacy_head.seq, "hash": legacy_head.hash}
    assert rec.data["anchor"] is None and rec.data["redis_head"] is None
    assert rec.data["legacy_records"] == 4 and rec.data["key_id"] == KEY.id
    head, _ = await RedisAuditState(aredis, prefix).heads()
    assert head == rec.head
    assert verify(path, KEY, AnchorFile(anchor_path(path), KEY).read(), head).ok
    with pytest.raises(AuditError, match="nothing to re-anchor"):
        await reanchor(aredis, path, KEY, prefix=prefix, by="ann", reason="again")
    await w.start()  # the writer extends the re-anchored chain
    assert w.chain.head == rec.head and w.completeness.stats(T0)["overdue"] == 0
    with pytest.raises(AuditError, match="writer holds the lease"):
        await reanchor(aredis, path, KEY, prefix=prefix, by="ann", reason="busy")
    await w.close()
    # a changed record is never re-anchored away
    path.write_bytes(path.read_bytes().replace(b'"dc-1"}', b'"dc-7"}', 1))
    with pytest.raises(AuditError, match="broken"):
        await reanchor(aredis, path, KEY, prefix=prefix, by="ann", reason="cover up")


@pytest.mark.integration
def test_cli_reanchors_a_legacy_log_whose_redis_head_was_lost(infra, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from ia.cli import main

    prefix = f"t{uuid.uuid4().hex[:8]}"
    path = tmp_path / "audit" / f"{prefix}.audit.jsonl"
    path.parent.mkdir()
    _write_legacy_log(path)
    (tmp_path / "key").write_bytes(KEY.secret)
    env = {**infra.env, "IA_TOPIC_PREFIX": prefix, "IA_REDIS_PREFIX": prefix,
           "IA_AUDIT_DIR": str(path.parent), "IA_AUDIT_KEY_FILE": str(tmp_path / "key")}

    def ia(*args: str):
        return CliRunner().invoke(main, ["audit", *args], env=env)

    assert ia("verify").exit_code == 1
    legacy = ia("verify", "--legacy")
    assert legacy.exit_code == 1 and "ia audit reanchor" in legacy.output
    done = ia("reanchor", "--by", "ann", "--reason", "Redis restarted")
    assert done.exit_code == 0, done.output
    assert "record 5 vouches for the log up to seq 4" in done.output
    ok = ia("verify")
    assert ok.exit_code == 0 and "first 4 records unkeyed" in ok.output, ok.output
    assert parse(path.read_bytes().splitlines()[-1], KEY).kind == "reanchor"
