"""Contracts: Avro schemas vs pydantic models, wire formats, and schema evolution.

No broker or Redis needed.  The compatibility checker is cross-checked against
real Avro resolution (avro's DatumReader reading data written with the old
schema), so a checker bug cannot silently approve a breaking change.
"""

from __future__ import annotations

import copy
import io
import json
import math
import pickle
import types
from collections.abc import Callable
from enum import Enum
from typing import Any, Union, get_args, get_origin

import avro.compatibility
import avro.errors
import avro.io
import avro.schema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, TypeAdapter

from ia.schemas import (
    CONTRACTS,
    DECODE_REASONS,
    FORMATS,
    Action,
    ActionOutcome,
    ApprovalEvent,
    ApprovalStatus,
    Codec,
    DeadLetter,
    Decision,
    DecodeError,
    DriftState,
    EncodeError,
    EventKind,
    Feedback,
    FeedbackLabel,
    Mode,
    ModelInfo,
    OutcomeStatus,
    RuleTrace,
    SchemaIds,
    TelemetryEvent,
    check_backward_compatible,
    compatibility_report,
    decode,
    detect_format,
    encode,
    load_schema,
    schema_name,
)
from ia.schemas.serde import AVRO_DIR, HISTORY_DIR, _SpecDatumReader, history_refs

T0 = 1_732_700_000_000  # a realistic epoch-millis timestamp

# --------------------------------------------------------------------------- samples


def _telemetry() -> TelemetryEvent:
    return TelemetryEvent(entity="checkout-api", metric="p99_latency_ms", value=812.5, ts=T0,
                          labels={"region": "eu-west-1", "pod": "checkout-7f9c", "ü": "√"})


def _deploy_event() -> TelemetryEvent:
    return TelemetryEvent(event_id="deploy-4711", entity="checkout-api", metric="deploy",
                          ts=T0 + 5, kind=EventKind.event)


def _decision(action: Action | None = None, mode: Mode = Mode.auto) -> Decision:
    return Decision(
        decision_id="dc-1", correlation_id="corr-9", event_id="ev-1", entity="checkout-api",
        metric="p99_latency_ms", value=812.5, ts=T0, decided_at=T0 + 12, anomaly_score=0.97,
        confidence=0.81, features={"z": 4.2, "ewma": 233.1, "delta": -1.5},
        model=ModelInfo(id="half-space-trees", version="1342"), drift=DriftState.warning,
        rule_trace=[RuleTrace(rule="high_latency", matched=True, reason="score 0.97 >= 0.9"),
                    RuleTrace(rule="cooldown", matched=False, reason="last action 31m ago")],
        action=action, mode=mode, policy_version="demo@3",
    )


def _action() -> Action:
    return Action(type="restart", target="checkout-api", params={"grace": "10s", "max": "1"})


SAMPLES: dict[str, BaseModel] = {
    "telemetry": _telemetry(),
    "telemetry_event_kind": _deploy_event(),
    "decision_with_action": _decision(_action()),
    "decision_without_action": Decision(
        decision_id="dc-2", correlation_id="corr-2", event_id="ev-2", entity="db-1",
        metric="cpu", value=0.2, ts=T0, decided_at=T0 + 1, anomaly_score=0.1, confidence=0.9,
        model=ModelInfo(id="hst", version="1")),
    "outcome_failed": ActionOutcome(
        decision_id="dc-1", entity="checkout-api", action_type="restart", target="checkout-api",
        status=OutcomeStatus.failed, actuator="webhook", started_at=T0, finished_at=T0 + 950,
        duration_ms=950.25, attempts=3, detail="HTTP 503 from control plane",
        error="ServiceUnavailable"),
    "outcome_defaults": ActionOutcome(
        decision_id="dc-1", entity="e", action_type="noop", target="t",
        status=OutcomeStatus.skipped_duplicate, actuator="log", started_at=T0,
        finished_at=T0, duration_ms=0.0),
    "feedback_full": Feedback(decision_id="dc-1", label=FeedbackLabel.false_positive,
                              by="alice@example.com", at=T0 + 60_000, entity="checkout-api",
                              comment="planned load test"),
    "feedback_minimal": Feedback(decision_id="dc-1", label=FeedbackLabel.useful, by="sre-bot",
                                 at=T0),
    "dead_letter": DeadLetter(reason="invalid_json", error="invalid_json: expected value",
                              source_topic="ia.telemetry", source_partition=3,
                              source_offset=1_234_567, failed_at=T0, original_b64="e30K"),
    "approval_requested": ApprovalEvent(
        approval_id="ap-1", decision_id="dc-1", status=ApprovalStatus.requested,
        entity="checkout-api", metric="p99_latency_ms", action=_action(), anomaly_score=0.97,
        confidence=0.6, requested_at=T0, expires_at=T0 + 900_000),
    "approval_rejected": ApprovalEvent(
        approval_id="ap-1", decision_id="dc-1", status=ApprovalStatus.rejected,
        entity="checkout-api", metric="p99_latency_ms", action=_action(), anomaly_score=0.97,
        confidence=0.6, requested_at=T0, expires_at=T0 + 900_000, rule="restart-slow",
        policy_version="abc", by="alice@example.com", via="cli", at=T0 + 5_000,
        reason="planned load test"),
}


def test_samples_cover_every_contract() -> None:
    assert {type(m) for m in SAMPLES.values()} == set(CONTRACTS.values())


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("key", SAMPLES)
def test_round_trip(key: str, fmt: str) -> None:
    model = SAMPLES[key]
    data = encode(model, fmt)
    assert isinstance(data, bytes)
    back = decode(data, type(model), fmt)
    assert back == model
    assert encode(back, fmt) == data  # canonical: re-encoding is byte-identical


@pytest.mark.parametrize("key", SAMPLES)
def test_json_is_compact_model_dump(key: str) -> None:
    model = SAMPLES[key]
    data = encode(model, "json")
    compact = json.dumps(model.model_dump(mode="json"), separators=(",", ":"),
                         ensure_ascii=False)
    assert data == compact.encode("utf-8")


def test_json_keeps_non_ascii_as_utf8() -> None:
    assert "√".encode() in encode(_telemetry(), "json")


def test_confluent_header_and_configured_ids() -> None:
    model = _decision(_action())
    data = encode(model, "confluent")
    assert data[0] == 0
    assert int.from_bytes(data[1:5], "big") == SchemaIds().id_for("decision")
    assert data[5:] == encode(model, "avro")

    codec = Codec({"decision": 4242, "telemetry_event": 17})
    custom = codec.encode(model, "confluent")
    assert int.from_bytes(custom[1:5], "big") == 4242
    assert codec.decode(custom, Decision, "confluent") == model
    with pytest.raises(DecodeError) as err:  # the default ids do not know 4242
        decode(custom, Decision, "confluent")
    assert err.value.reason == "unknown_schema_id"


def test_schema_ids_validation_and_parse() -> None:
    assert SchemaIds.parse(" decision=12, decision.v1=7 ,").ref_for(7) == "decision.v1"
    with pytest.raises(ValueError, match="used for"):
        SchemaIds({"decision": 1, "feedback": 1})
    with pytest.raises(ValueError):
        SchemaIds({"../etc/passwd": 1})
    with pytest.raises(ValueError, match="out of range"):
        SchemaIds({"decision": 2**31})
    with pytest.raises(ValueError, match="name=id"):
        SchemaIds.parse("decision")


def test_telemetry_event_id_is_deterministic() -> None:
    a = TelemetryEvent(entity="web-1", metric="cpu", value=0.5, ts=T0)
    b = TelemetryEvent(entity="web-1", metric="cpu", value=0.5, ts=T0)
    later = TelemetryEvent(entity="web-1", metric="cpu", value=0.5, ts=T0 + 1)
    assert a.event_id and a.event_id.startswith("ev-")
    assert a.event_id == b.event_id
    assert later.event_id != a.event_id
    assert TelemetryEvent(entity="web-1", metric="cpu", value=0.6, ts=T0).event_id != a.event_id
    # a record on the wire without event_id gets the same id after decoding
    wire = b'{"entity":"web-1","metric":"cpu","value":0.5,"ts":%d}' % T0
    assert decode(wire, TelemetryEvent, "json").event_id == a.event_id
    # and an explicit id is kept
    assert _deploy_event().event_id == "deploy-4711"


def test_encode_rejects_values_avro_cannot_hold() -> None:
    # model_construct skips validation: the encoder must still refuse, not wrap around
    bad = TelemetryEvent.model_construct(event_id="x", entity="e", metric="m", value=1.0,
                                         ts=2**64, labels={}, kind=EventKind.metric)
    with pytest.raises(EncodeError) as err:
        encode(bad, "avro")
    assert err.value.reason == "avro_encode"
    surrogate = _telemetry().model_copy(update={"entity": "bad\ud800"})
    for fmt in FORMATS:
        with pytest.raises(EncodeError):
            encode(surrogate, fmt)


def test_encode_without_configured_schema_id() -> None:
    with pytest.raises(EncodeError) as err:
        Codec({"decision": 9}).encode(_telemetry(), "confluent")
    assert err.value.reason == "no_schema_id"
    assert Codec({"decision": 9}).encode(_telemetry(), "avro")  # no id needed


def test_errors_pickle() -> None:
    err = pickle.loads(pickle.dumps(DecodeError("invalid_json", "boom")))
    assert (type(err), err.reason, err.message) == (DecodeError, "invalid_json", "boom")


def test_non_contract_and_unknown_format_are_programming_errors() -> None:
    with pytest.raises(TypeError):
        decode(b"{}", ModelInfo, "json")
    with pytest.raises(ValueError, match="unknown format"):
        decode(b"{}", TelemetryEvent, "xml")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- decode errors


def _avro_bytes(name: str, record: dict[str, Any]) -> bytes:
    """Write ``record`` with the raw avro writer, bypassing pydantic validation."""
    buf = io.BytesIO()
    avro.io.DatumWriter(load_schema(name)).write(record, avro.io.BinaryEncoder(buf))
    return buf.getvalue()


def _telemetry_record(**changes: Any) -> dict[str, Any]:
    record = _telemetry().model_dump(mode="json")
    record.update(changes)
    return record


def _confluent(schema_id: int, payload: bytes) -> bytes:
    return b"\x00" + schema_id.to_bytes(4, "big") + payload


BAD_INPUTS: list[tuple[str, Any, str, str]] = [
    # (case, data, fmt, expected reason)
    ("garbage json", b"\x13\x37garbage", "json", "invalid_json"),
    ("truncated json", b'{"entity":"a","metric":', "json", "invalid_json"),
    ("json array", b"[1,2]", "json", "schema_validation"),
    ("invalid utf8 json", b'{"entity":"caf\xe9","metric":"m","ts":1}', "json", "invalid_utf8"),
    ("NaN json", b'{"entity":"a","metric":"m","ts":1,"value":NaN}', "json", "schema_validation"),
    ("Infinity json", b'{"entity":"a","metric":"m","ts":1,"value":Infinity}', "json",
     "schema_validation"),
    ("negative ts json", b'{"entity":"a","metric":"m","ts":-5}', "json", "schema_validation"),
    ("huge ts json", b'{"entity":"a","metric":"m","ts":99999999999999999999}', "json",
     "schema_validation"),
    ("unknown field json", b'{"entity":"a","metric":"m","ts":1,"x":1}', "json",
     "schema_validation"),
    ("empty json", b"", "json", "empty"),
    ("tombstone", None, "json", "empty"),
    ("str instead of bytes", '{"entity":"a"}', "json", "not_bytes"),
    ("garbage avro", b"\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff\xff", "avro", "avro_decode"),
    ("truncated avro", encode(_telemetry(), "avro")[:-3], "avro", "avro_decode"),
    ("trailing avro", encode(_telemetry(), "avro") + b"\x00", "avro", "avro_decode"),
    ("invalid utf8 avro", _avro_bytes("telemetry_event", _telemetry_record())
     .replace(b"checkout-api", b"checkout-\xff\xfe\xfd"), "avro", "invalid_utf8"),
    ("NaN avro", _avro_bytes("telemetry_event", _telemetry_record(value=math.nan)), "avro",
     "schema_validation"),
    ("control chars avro", _avro_bytes("telemetry_event", _telemetry_record(entity="a\x07b")),
     "avro", "schema_validation"),
    ("wrong magic byte", b"\x01" + encode(_telemetry(), "confluent")[1:], "confluent",
     "bad_magic_byte"),
    ("json to confluent", encode(_telemetry(), "json"), "confluent", "bad_magic_byte"),
    ("truncated header", b"\x00\x00\x01", "confluent", "truncated_header"),
    ("unknown schema id", _confluent(999_999, encode(_telemetry(), "avro")), "confluent",
     "unknown_schema_id"),
    ("schema of another contract", _confluent(SchemaIds().id_for("decision"),
                                              encode(_telemetry(), "avro")), "confluent",
     "schema_mismatch"),
    ("header only", _confluent(SchemaIds().id_for("telemetry_event"), b""), "confluent",
     "avro_decode"),
]


@pytest.mark.parametrize(("data", "fmt", "reason"), [c[1:] for c in BAD_INPUTS],
                         ids=[c[0] for c in BAD_INPUTS])
def test_decode_errors_have_reasons(data: Any, fmt: str, reason: str) -> None:
    with pytest.raises(DecodeError) as err:
        decode(data, TelemetryEvent, fmt)  # type: ignore[arg-type]
    assert err.value.reason == reason
    assert err.value.reason in DECODE_REASONS
    assert str(err.value).startswith(f"{reason}: ") and err.value.message


def test_validation_errors_name_the_fields() -> None:
    data = b'{"entity":"","metric":"m","ts":-1,"labels":{"k":1}}'
    with pytest.raises(DecodeError) as err:
        decode(data, TelemetryEvent, "json")
    message = err.value.message
    assert "entity:" in message and "ts:" in message and "labels.k:" in message


def test_decode_error_messages_are_bounded() -> None:
    data = json.dumps({f"extra{i}": "x" * 1000 for i in range(100)}).encode()
    with pytest.raises(DecodeError) as err:
        decode(data, Feedback, "json")
    assert "more)" in err.value.message
    assert len(str(err.value)) < 700


@pytest.mark.parametrize(
    ("data", "expected"),
    [(b"\x00\x00\x00\x00\x01\x02", "confluent"), (b'{"a":1}', "json"),
     (b' \n\t{"a":1}', "json"), (b"\x02abc", "json"), (b"", "json")],
)
def test_detect_format(data: bytes, expected: str) -> None:
    assert detect_format(data) == expected


def test_detect_format_default_and_round_trip() -> None:
    assert detect_format(b"\x02abc", default="avro") == "avro"
    for fmt in ("json", "confluent"):
        data = encode(_telemetry(), fmt)
        assert decode(data, TelemetryEvent, detect_format(data)) == _telemetry()


# --------------------------------------------------------------------------- fuzzing


def _valid_encodings() -> list[tuple[bytes, type[BaseModel], str]]:
    return [(encode(m, fmt), type(m), fmt) for m in SAMPLES.values() for fmt in FORMATS]


@st.composite
def _mutated(draw: st.DrawFn) -> tuple[bytes, type[BaseModel], str]:
    """A valid encoding with a few bytes flipped, inserted, or cut off: reaches deep paths."""
    data, model_cls, fmt = draw(st.sampled_from(_valid_encodings()))
    buf = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        op = draw(st.sampled_from(["flip", "insert", "truncate", "delete"]))
        pos = draw(st.integers(0, max(len(buf) - 1, 0)))
        if op == "flip" and buf:
            buf[pos] = draw(st.integers(0, 255))
        elif op == "insert":
            buf[pos:pos] = draw(st.binary(min_size=1, max_size=8))
        elif op == "truncate":
            del buf[pos:]
        elif buf:
            del buf[pos]
    return bytes(buf), model_cls, fmt


def _assert_decodes_or_raises_decode_error(
    data: bytes, model_cls: type[BaseModel], fmt: str
) -> None:
    try:
        model = decode(data, model_cls, fmt)  # type: ignore[arg-type]
    except DecodeError as exc:
        assert exc.reason in DECODE_REASONS
        return
    assert isinstance(model, model_cls)
    for out_fmt in FORMATS:  # anything accepted can be passed on in every format
        assert decode(encode(model, out_fmt), model_cls, out_fmt) == model  # type: ignore[arg-type]


_FUZZ = settings(max_examples=400, deadline=None,
                 suppress_health_check=[HealthCheck.too_slow])


@_FUZZ
@given(data=st.binary(max_size=300), model_cls=st.sampled_from(list(CONTRACTS.values())),
       fmt=st.sampled_from(FORMATS), header=st.sampled_from([b"", b"\x00\x00\x00\x00"]))
def test_decode_arbitrary_bytes(data: bytes, model_cls: type[BaseModel], fmt: str,
                                header: bytes) -> None:
    # the header variant gets past the magic byte into the id and Avro paths
    _assert_decodes_or_raises_decode_error(header + data, model_cls, fmt)


@_FUZZ
@given(case=_mutated())
def test_decode_mutated_valid_records(case: tuple[bytes, type[BaseModel], str]) -> None:
    _assert_decodes_or_raises_decode_error(*case)


_json_leaf = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20))
_json_values = st.recursive(
    _json_leaf,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=8,
)


@st.composite
def _json_records(draw: st.DrawFn) -> tuple[bytes, type[BaseModel]]:
    """JSON objects using the contract's own field names with arbitrary values."""
    model_cls = draw(st.sampled_from(list(CONTRACTS.values())))
    names = list(model_cls.model_fields)
    base = draw(st.sampled_from([m for m in SAMPLES.values() if type(m) is model_cls]))
    record = base.model_dump(mode="json")
    for name in draw(st.lists(st.sampled_from(names), max_size=3)):
        record[name] = draw(_json_values)
    return json.dumps(record).encode(), model_cls


@_FUZZ
@given(case=_json_records())
def test_decode_structured_json(case: tuple[bytes, type[BaseModel]]) -> None:
    data, model_cls = case
    _assert_decodes_or_raises_decode_error(data, model_cls, "json")


# --------------------------------------------------------------------------- models vs .avsc


def _compare(annotation: Any, schema: avro.schema.Schema, path: str) -> list[str]:
    """Differences between a pydantic annotation and the Avro type at ``path``."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, types.UnionType):
        non_null = [a for a in args if a is not type(None)]
        if len(non_null) != 1 or len(args) != 2:
            return [f"{path}: only T | None unions are supported"]
        if not isinstance(schema, avro.schema.UnionSchema) or [
            s.type for s in schema.schemas][:1] != ["null"] or len(schema.schemas) != 2:
            return [f"{path}: optional field must be ['null', T] in Avro"]
        return _compare(non_null[0], schema.schemas[1], path)
    if isinstance(schema, avro.schema.UnionSchema):
        return [f"{path}: Avro union but the model field is not optional"]
    if origin is dict:
        if args[0] is not str or not isinstance(schema, avro.schema.MapSchema):
            return [f"{path}: dict[str, V] must be an Avro map"]
        return _compare(args[1], schema.values, f"{path}{{}}")
    if origin is list:
        if not isinstance(schema, avro.schema.ArraySchema):
            return [f"{path}: list must be an Avro array"]
        return _compare(args[0], schema.items, f"{path}[]")
    if isinstance(annotation, type) and issubclass(annotation, Enum):
        if not isinstance(schema, avro.schema.EnumSchema) or schema.name != annotation.__name__:
            return [f"{path}: enum {annotation.__name__} must be an Avro enum of that name"]
        if list(schema.symbols) != [m.value for m in annotation]:
            return [f"{path}: symbols {schema.symbols} != {[m.value for m in annotation]}"]
        return []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        if not isinstance(schema, avro.schema.RecordSchema) or schema.name != annotation.__name__:
            return [f"{path}: {annotation.__name__} must be an Avro record of that name"]
        return _compare_record(annotation, schema, path)
    expected = {str: {"string"}, float: {"double"}, int: {"long", "int"}, bool: {"boolean"}}
    if schema.type not in expected.get(annotation, set()):
        return [f"{path}: {annotation} cannot be Avro {schema.type}"]
    return []


def _compare_record(model_cls: type[BaseModel], schema: avro.schema.RecordSchema,
                    path: str) -> list[str]:
    problems: list[str] = []
    model_names = list(model_cls.model_fields)
    avro_names = [f.name for f in schema.fields]
    if model_names != avro_names:
        return [f"{path}: fields {model_names} != Avro fields {avro_names}"]
    for name, info in model_cls.model_fields.items():
        field = schema.fields_dict[name]
        field_path = f"{path}.{name}"
        problems += _compare(info.annotation, field.type, field_path)
        if info.is_required():
            if field.has_default:
                problems.append(f"{field_path}: required in the model, default in Avro")
            continue
        if not field.has_default:
            problems.append(f"{field_path}: default in the model, none in Avro")
            continue
        default = TypeAdapter(info.annotation).dump_python(
            info.get_default(call_default_factory=True), mode="json")
        if default != field.default or type(default) is not type(field.default):
            problems.append(f"{field_path}: default {default!r} != Avro {field.default!r}")
    return problems


@pytest.mark.parametrize("model_cls", list(CONTRACTS.values()), ids=list(CONTRACTS))
def test_model_agrees_with_avsc(model_cls: type[BaseModel]) -> None:
    schema = load_schema(schema_name(model_cls))
    assert schema.namespace == "io.intelligentautomation.contracts"
    assert _compare(model_cls, schema, model_cls.__name__) == []


def test_comparator_catches_drift() -> None:
    """The comparator itself must notice a disagreement, or the test above proves nothing."""
    raw = _schema_json("action_outcome")
    for field in raw["fields"]:
        if field["name"] == "attempts":
            field["default"] = 1
        if field["name"] == "error":
            field["type"] = "string"
            del field["default"]
    problems = _compare(ActionOutcome, avro.schema.parse(json.dumps(raw)), "ActionOutcome")
    assert any("attempts: default" in p for p in problems)
    assert any("error: optional field" in p for p in problems)


def test_every_field_is_documented() -> None:
    for name in CONTRACTS.values():
        raw = _schema_json(schema_name(name))
        undocumented = [p for p in _walk_fields(raw, raw["name"]) if p[1] is None]
        assert undocumented == []


def _walk_fields(record: dict[str, Any], path: str) -> list[tuple[str, str | None]]:
    found: list[tuple[str, str | None]] = []
    for field in record["fields"]:
        found.append((f"{path}.{field['name']}", field.get("doc")))
        for typ in _nested_types(field["type"]):
            if isinstance(typ, dict) and typ.get("type") == "record":
                found += _walk_fields(typ, f"{path}.{field['name']}")
    return found


def _nested_types(typ: Any) -> list[Any]:
    if isinstance(typ, list):
        return [t for branch in typ for t in _nested_types(branch)]
    if isinstance(typ, dict) and typ.get("type") == "array":
        return [typ, *_nested_types(typ["items"])]
    return [typ]


# --------------------------------------------------------------------------- history


def test_every_contract_has_a_published_v1() -> None:
    for name in map(schema_name, CONTRACTS.values()):
        assert f"{name}.v1" in history_refs(name)
        assert (HISTORY_DIR / f"{name}.v1.avsc").is_file()
        assert (AVRO_DIR / f"{name}.avsc").is_file()


def test_current_schemas_are_backward_compatible_with_history() -> None:
    report = compatibility_report()
    assert set(report) >= {f"{schema_name(c)}.v1" for c in CONTRACTS.values()}
    assert {ref: problems for ref, problems in report.items() if problems} == {}


@pytest.mark.parametrize("key", SAMPLES)
def test_v1_records_decode_with_current_reader(key: str) -> None:
    """Data written by a v1 producer (Confluent id of the v1 schema) reads as a current model."""
    model = SAMPLES[key]
    name = schema_name(type(model))
    # A v1 producer writes only the fields v1 knows; later additions read as their defaults.
    v1_fields = {f["name"] for f in _schema_json(f"{name}.v1")["fields"]}
    v1_payload = _avro_bytes(f"{name}.v1", {k: v for k, v in model.model_dump(mode="json").items()
                                           if k in v1_fields})
    codec = Codec({name: 100, f"{name}.v1": 7})
    assert codec.decode(_confluent(7, v1_payload), type(model), "confluent") == model


def _schema_json(ref: str) -> dict[str, Any]:
    path = (HISTORY_DIR if ".v" in ref else AVRO_DIR) / f"{ref}.avsc"
    return json.loads(path.read_text())


def _field(record: dict[str, Any], name: str) -> dict[str, Any]:
    return next(f for f in record["fields"] if f["name"] == name)


def _nested_record(record: dict[str, Any], field_name: str) -> dict[str, Any]:
    typ = _field(record, field_name)["type"]
    if isinstance(typ, list):
        typ = typ[1]
    return typ["items"] if typ["type"] == "array" else typ


def _mode_enum(record: dict[str, Any]) -> dict[str, Any]:
    return _field(record, "mode")["type"]


# Each evolution: (id, schema, mutation of the v1 schema JSON, sample written with v1,
# compatible by the spec, compatible for avro-python, reader used for the real read)
Mutation = Callable[[dict[str, Any]], None]
EVOLUTIONS: list[tuple[str, str, Mutation, BaseModel, bool, bool, str]] = [
    ("add required field", "telemetry_event",
     lambda s: s["fields"].append({"name": "region", "type": "string"}),
     _telemetry(), False, False, "avro"),
    ("add field with default", "telemetry_event",
     lambda s: s["fields"].append({"name": "region", "type": "string", "default": "eu"}),
     _telemetry(), True, True, "avro"),
    ("add optional field", "decision",
     lambda s: s["fields"].append({"name": "note", "type": ["null", "string"],
                                   "default": None}),
     _decision(_action()), True, True, "avro"),
    ("remove field", "decision",
     lambda s: s["fields"].remove(_field(s, "policy_version")),
     _decision(_action()), True, True, "avro"),
    ("string to long", "telemetry_event",
     lambda s: _field(s, "entity").update(type="long"),
     _telemetry(), False, False, "avro"),
    ("double to long", "telemetry_event",
     lambda s: _field(s, "value").update(type="long"),
     _telemetry(), False, False, "avro"),
    ("long to double promotion", "telemetry_event",
     lambda s: _field(s, "ts").update(type="double"),
     _telemetry(), True, True, "avro"),
    ("required to optional", "telemetry_event",
     lambda s: _field(s, "entity").update(type=["null", "string"]),
     _telemetry(), True, True, "avro"),
    ("optional to required", "telemetry_event",
     lambda s: _field(s, "event_id").update(type="string", default=""),
     _telemetry(), False, False, "avro"),
    ("remove enum symbol without default", "decision",
     lambda s: (_mode_enum(s)["symbols"].remove("shadow"), _mode_enum(s).pop("default")),
     _decision(_action(), Mode.shadow), False, False, "avro"),
    ("remove enum symbol with default", "decision",
     lambda s: _mode_enum(s)["symbols"].remove("shadow"),
     _decision(_action(), Mode.shadow), True, True, "serde"),
    ("add enum symbol", "decision",
     lambda s: _mode_enum(s)["symbols"].append("canary"),
     _decision(_action()), True, True, "avro"),
    ("nested record: required field", "decision",
     lambda s: _nested_record(s, "rule_trace")["fields"].append(
         {"name": "weight", "type": "double"}),
     _decision(_action()), False, False, "avro"),
    ("nested union record: map values string to long", "decision",
     lambda s: _field(_nested_record(s, "action"), "params").update(
         type={"type": "map", "values": "long"}),
     _decision(_action()), False, False, "avro"),
    ("nested record: type change", "decision",
     lambda s: _field(_field(s, "model")["type"], "version").update(type="int"),
     _decision(_action()), False, False, "avro"),
    ("record renamed", "decision",
     lambda s: _field(s, "model")["type"].update(name="ModelRef"),
     _decision(_action()), False, False, "avro"),
    ("namespace changed", "telemetry_event",
     lambda s: s.update(namespace="io.intelligentautomation.v2"),
     _telemetry(), True, False, "avro"),
    ("field renamed with alias", "telemetry_event",
     lambda s: _field(s, "entity").update(name="host", aliases=["entity"]),
     _telemetry(), True, False, "avro"),
    ("field renamed without alias", "telemetry_event",
     lambda s: _field(s, "entity").update(name="host"),
     _telemetry(), False, False, "avro"),
]


def _evolve(name: str, mutate: Mutation) -> avro.schema.Schema:
    raw = copy.deepcopy(_schema_json(f"{name}.v1"))
    mutate(raw)
    return avro.schema.parse(json.dumps(raw))


def _read_old_data(writer: avro.schema.Schema, reader: avro.schema.Schema, sample: BaseModel,
                   runtime: str) -> object:
    """Write ``sample`` with the old schema and resolve it with the new one, for real."""
    buf = io.BytesIO()
    # Old data has only the old fields (avro rejects a datum with unknown keys).
    old_fields = {f.name for f in writer.fields}
    datum = {k: v for k, v in sample.model_dump(mode="json").items() if k in old_fields}
    avro.io.DatumWriter(writer).write(datum, avro.io.BinaryEncoder(buf))
    buf.seek(0)
    reader_cls = _SpecDatumReader if runtime == "serde" else avro.io.DatumReader
    return reader_cls(writer, reader).read(avro.io.BinaryDecoder(buf))


@pytest.mark.parametrize(("name", "mutate", "sample", "spec_ok", "python_ok", "runtime"),
                         [e[1:] for e in EVOLUTIONS], ids=[e[0] for e in EVOLUTIONS])
def test_checker_agrees_with_real_avro_resolution(
    name: str, mutate: Mutation, sample: BaseModel, spec_ok: bool, python_ok: bool,
    runtime: str,
) -> None:
    writer = load_schema(f"{name}.v1")
    reader = _evolve(name, mutate)

    problems = check_backward_compatible(reader, writer)
    assert (problems == []) is python_ok, problems
    assert all(isinstance(p, str) and p for p in problems)
    spec_problems = check_backward_compatible(reader, writer, python_avro=False)
    assert (spec_problems == []) is spec_ok, spec_problems
    # avro's own (spec-level) checker must agree with ours
    reference = avro.compatibility.ReaderWriterCompatibilityChecker().get_compatibility(
        reader, writer)
    assert (reference.compatibility
            is avro.compatibility.SchemaCompatibilityType.compatible) is spec_ok

    if python_ok:
        record = _read_old_data(writer, reader, sample, runtime)
        assert isinstance(record, dict)
    else:
        with pytest.raises((avro.errors.AvroException, ValueError)):
            _read_old_data(writer, reader, sample, runtime)


def test_reader_enum_default_is_applied() -> None:
    reader = _evolve("decision", lambda s: _mode_enum(s)["symbols"].remove("shadow"))
    record = _read_old_data(load_schema("decision.v1"), reader,
                            _decision(_action(), Mode.shadow), "serde")
    assert isinstance(record, dict) and record["mode"] == "blocked"


def test_added_default_is_filled_in_on_read() -> None:
    reader = _evolve("telemetry_event", lambda s: s["fields"].append(
        {"name": "region", "type": "string", "default": "eu"}))
    record = _read_old_data(load_schema("telemetry_event.v1"), reader, _telemetry(), "avro")
    assert isinstance(record, dict) and record["region"] == "eu"


def test_checker_messages_name_the_path() -> None:
    reader = _evolve("decision", lambda s: _nested_record(s, "rule_trace")["fields"].append(
        {"name": "weight", "type": "double"}))
    (problem,) = check_backward_compatible(reader, load_schema("decision.v1"))
    assert problem.startswith("Decision.rule_trace[].weight:")
    reader = _evolve("telemetry_event", lambda s: _field(s, "entity").update(type="long"))
    (problem,) = check_backward_compatible(reader, load_schema("telemetry_event.v1"))
    assert "TelemetryEvent.entity" in problem and "long" in problem and "string" in problem


def test_checker_accepts_json_and_handles_recursion() -> None:
    linked = {"type": "record", "name": "Node", "fields": [
        {"name": "value", "type": "int"},
        {"name": "next", "type": ["null", "Node"], "default": None}]}
    evolved = copy.deepcopy(linked)
    evolved["fields"][0]["type"] = "long"
    assert check_backward_compatible(evolved, json.dumps(linked)) == []
    assert check_backward_compatible(linked, evolved) != []  # long -> int narrows
