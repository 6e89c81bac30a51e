"""The ``interrupted`` outcome status: in the contract, on the wire and in the audit count.

An action whose actuator died (or failed) after it may have started is
reported ``interrupted``, never hidden behind ``skipped_duplicate``.  The
status is a new symbol of the ``OutcomeStatus`` enum: the schema before it is
frozen as ``action_outcome.v2``, current readers read v2 data, and a v2 reader
maps the new symbol to ``failed`` (the enum default, the conservative reading).
"""

from __future__ import annotations

import io
import json

import avro.io

from ia.governance.audit import Completeness, seal
from ia.governance.hashchain import GENESIS, ChainKey
from ia.schemas.compat import compatibility_report
from ia.schemas.models import ActionOutcome, OutcomeStatus
from ia.schemas.serde import HISTORY_DIR, _SpecDatumReader, encode, history_refs, load_schema

T0 = 1_732_700_000_000


def _interrupted() -> ActionOutcome:
    return ActionOutcome(
        decision_id="dc-1", entity="web-1", action_type="restart", target="web-1",
        status=OutcomeStatus.interrupted, actuator="restart", started_at=T0, finished_at=T0,
        duration_ms=0.0, detail="interrupted: result unknown", error="interrupted")


def test_interrupted_is_a_status_of_the_model_and_of_the_current_schema() -> None:
    enum = load_schema("action_outcome").fields_dict["status"].type
    assert "interrupted" in enum.symbols and enum.default == "failed"
    assert [s.value for s in OutcomeStatus] == list(enum.symbols)


def test_the_schema_before_interrupted_is_frozen_as_v2_and_still_readable() -> None:
    assert history_refs("action_outcome")[:2] == ["action_outcome.v1", "action_outcome.v2"]
    v2 = json.loads((HISTORY_DIR / "action_outcome.v2.avsc").read_text())
    status = next(f for f in v2["fields"] if f["name"] == "status")["type"]
    assert "interrupted" not in status["symbols"]
    report = compatibility_report()
    assert report["action_outcome.v2"] == [] and report["action_outcome.v1"] == []


def test_a_v2_reader_reads_interrupted_as_failed() -> None:
    data = encode(_interrupted(), "avro")
    reader = _SpecDatumReader(load_schema("action_outcome"), load_schema("action_outcome.v2"))
    record = reader.read(avro.io.BinaryDecoder(io.BytesIO(data)))
    assert record["status"] == "failed" and record["error"] == "interrupted"


def _rec(seq: int, kind: str, did: str, **data) -> object:
    return seal(seq, GENESIS, at=T0, kind=kind, id=did, src="", data=data, key=KEY)


KEY = ChainKey(b"k" * 32)


def test_audit_counts_an_interrupted_action_on_its_own_not_as_complete() -> None:
    c = Completeness(grace_ms=1000)
    for seq, did, status in [(1, "ok", "succeeded"), (3, "cut", "interrupted")]:
        c.add(_rec(seq, "decision", did, action={"type": "log"}, mode="auto"))
        c.add(_rec(seq + 1, "outcome", did, phase="action", status=status))
    c.add(_rec(5, "outcome", "cut", phase="action", status="interrupted"))  # a redelivery
    stats = c.stats(T0 + 10**9)
    assert (stats["complete"], stats["interrupted"], stats["pending"], stats["overdue"]) == \
        (1, 1, 0, 0)
    assert stats["ratio"] == 0.5  # accounted for, but not a complete story
