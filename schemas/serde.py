"""Wire formats of the topic contracts: JSON, schemaless Avro and Confluent Avro.

Every consumer decodes untrusted bytes, so :func:`decode` has one job beyond
parsing: whatever the input, it either returns a validated model or raises
:class:`DecodeError` with a short machine-readable ``reason`` (suitable for a
dead-letter record and a metrics label) and a human-readable message.  No other
exception type escapes it, so a consumer loop needs exactly one ``except``.

Formats:

``json``
    Compact UTF-8 JSON of ``model.model_dump(mode="json")``.
``avro``
    Schemaless Avro binary written with the *current* schema (no header); the
    reader must know which schema wrote it.
``confluent``
    Confluent wire format: magic byte ``0``, 4-byte big-endian schema id, Avro
    binary.  The id selects the writer schema through :class:`SchemaIds`, so
    records written with an older (history) schema are resolved into the
    current one.
"""

from __future__ import annotations

import io
import re
from collections.abc import Iterable, Mapping
from functools import cache
from pathlib import Path
from typing import Final, Literal, TypeVar, get_args

import avro.errors
import avro.io
import avro.schema
from pydantic import BaseModel, ValidationError
from pydantic_core import PydanticSerializationError

from ia.schemas.models import (
    ActionOutcome,
    ApprovalEvent,
    DeadLetter,
    Decision,
    Feedback,
    TelemetryEvent,
)

Format = Literal["json", "avro", "confluent"]
FORMATS: Final[tuple[str, ...]] = get_args(Format)

M = TypeVar("M", bound=BaseModel)

AVRO_DIR: Final = Path(__file__).resolve().parent / "avro"
HISTORY_DIR: Final = AVRO_DIR / "history"

#: Schema (file) name of each contract model.
SCHEMA_NAMES: Final[dict[type[BaseModel], str]] = {
    TelemetryEvent: "telemetry_event",
    Decision: "decision",
    ActionOutcome: "action_outcome",
    Feedback: "feedback",
    DeadLetter: "dead_letter",
    ApprovalEvent: "approval_event",
}

#: Ids used for the Confluent format when none are configured.  Deployments with
#: a real schema registry register the .avsc files and pass the ids it assigned.
DEFAULT_SCHEMA_IDS: Final[Mapping[str, int]] = {
    "telemetry_event": 1,
    "decision": 2,
    "action_outcome": 3,
    "feedback": 4,
    "dead_letter": 5,
    "approval_event": 6,
}

MAGIC_BYTE: Final = 0
_HEADER_LEN: Final = 5
_LONG_MIN: Final = -(2**63)
_LONG_MAX: Final = 2**63 - 1
_MAX_SCHEMA_ID: Final = 2**31 - 1  # registries use signed 32-bit ids
_MAX_MESSAGE: Final = 600  # keeps hostile input from bloating DLQ records and logs
_MAX_LISTED_ERRORS: Final = 5
# "decision" (current) or "decision.v1" (history); also keeps names out of other paths.
_REF_RE: Final = re.compile(r"^(?P<name>[a-z][a-z0-9_]*)(?:\.v(?P<version>[1-9][0-9]*))?$")

#: Every ``DecodeError.reason``; stable, so they can be used as metric labels.
DECODE_REASONS: Final = frozenset(
    {
        "empty",  # None (a tombstone) or zero bytes
        "not_bytes",  # not bytes, bytearray or memoryview
        "invalid_utf8",
        "invalid_json",
        "schema_validation",  # well-formed, but the model rejects it
        "avro_decode",  # malformed or truncated Avro, or trailing bytes
        "bad_magic_byte",
        "truncated_header",
        "unknown_schema_id",
        "schema_mismatch",  # a known schema id, but of another contract
    }
)


class _ReasonError(ValueError):
    """A ValueError with a stable machine-readable ``reason`` and a bounded message."""

    def __init__(self, reason: str, message: str) -> None:
        message = _clip(message)
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.message = message

    def __reduce__(self) -> tuple[type[_ReasonError], tuple[str, str]]:
        # default pickling would call cls(str(self)); keep it working across processes
        return type(self), (self.reason, self.message)


class DecodeError(_ReasonError):
    """Bytes that cannot be turned into a valid contract model (see ``DECODE_REASONS``)."""


class EncodeError(_ReasonError):
    """A model that cannot be written in the requested format.

    Validated models always encode; this happens for models built with
    ``model_construct`` or mutated after validation (e.g. an int beyond Avro's
    64-bit long, or a string with a lone surrogate), or for a contract without
    a configured Confluent schema id.  Reasons: ``json_encode``,
    ``avro_encode``, ``no_schema_id``.
    """


def _clip(message: str) -> str:
    return message if len(message) <= _MAX_MESSAGE else message[: _MAX_MESSAGE - 3] + "..."


# --------------------------------------------------------------------------- schemas


def _schema_path(ref: str) -> Path:
    match = _REF_RE.match(ref)
    if match is None:
        raise ValueError(f"invalid schema name {ref!r}: expected e.g. 'decision' or 'decision.v1'")
    if match["version"] is None:
        return AVRO_DIR / f"{ref}.avsc"
    return HISTORY_DIR / f"{ref}.avsc"


@cache
def load_schema(name: str) -> avro.schema.Schema:
    """Parse ``schemas/avro/<name>.avsc`` (or ``history/<name>.avsc`` for ``x.vN``), cached.

    Parsing is slow-ish and schemas never change at runtime, hence the cache;
    every writer and reader of one schema shares the same object.
    """
    path = _schema_path(name)
    if not path.is_file():
        raise FileNotFoundError(f"no Avro schema {name!r} at {path}")
    return avro.schema.parse(path.read_text(encoding="utf-8"))


def history_refs(name: str) -> list[str]:
    """Published versions of ``name`` (e.g. ``["decision.v1"]``), oldest first."""
    refs = [p.stem for p in HISTORY_DIR.glob(f"{name}.v*.avsc")]
    refs = [r for r in refs if (m := _REF_RE.match(r)) and m["name"] == name]
    return sorted(refs, key=lambda r: int(r.rsplit(".v", 1)[1]))


def schema_name(model_cls: type[BaseModel]) -> str:
    """The schema name of a contract class (or of a subclass of one)."""
    for cls in model_cls.__mro__:
        name = SCHEMA_NAMES.get(cls)
        if name is not None:
            return name
    raise TypeError(f"{model_cls.__name__} is not a topic contract")


class SchemaIds:
    """Confluent schema ids by schema ref, in both directions.

    Keys are ``"decision"`` for the current schema (used when encoding) or
    ``"decision.v1"`` for a published history version (so data written by old
    producers under that id can still be decoded).  Ids must be unique.
    """

    def __init__(self, ids: Mapping[str, int] | None = None) -> None:
        self._by_ref: dict[str, int] = dict(DEFAULT_SCHEMA_IDS if ids is None else ids)
        self._by_id: dict[int, str] = {}
        for ref, schema_id in self._by_ref.items():
            _schema_path(ref)  # validates the ref's spelling
            if isinstance(schema_id, bool) or not isinstance(schema_id, int):
                raise TypeError(f"schema id for {ref!r} must be an int, got {schema_id!r}")
            if not 0 <= schema_id <= _MAX_SCHEMA_ID:
                raise ValueError(f"schema id for {ref!r} out of range: {schema_id}")
            if schema_id in self._by_id:
                raise ValueError(f"schema id {schema_id} used for {self._by_id[schema_id]!r} "
                                 f"and {ref!r}")
            self._by_id[schema_id] = ref

    @classmethod
    def parse(cls, text: str) -> SchemaIds:
        """Parse ``"telemetry_event=11,decision=12,decision.v1=7"`` (e.g. from a setting)."""
        ids: dict[str, int] = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            ref, sep, value = item.partition("=")
            if not sep:
                raise ValueError(f"expected name=id, got {item!r}")
            ids[ref.strip()] = int(value)
        return cls(ids)

    def id_for(self, ref: str) -> int:
        try:
            return self._by_ref[ref]
        except KeyError:
            raise KeyError(f"no Confluent schema id configured for {ref!r}") from None

    def ref_for(self, schema_id: int) -> str | None:
        return self._by_id.get(schema_id)

    def items(self) -> Iterable[tuple[str, int]]:
        return self._by_ref.items()

    def __repr__(self) -> str:
        return f"SchemaIds({self._by_ref!r})"


class _SpecDatumReader(avro.io.DatumReader):
    """DatumReader that applies the *reader's* enum default, as the Avro spec says.

    avro 1.12's reader raises for a writer symbol the reader lacks even when
    the reader enum declares a default; the compatibility checker follows the
    spec, so the runtime must as well.
    """

    def read_enum(
        self,
        writers_schema: avro.schema.EnumSchema,
        readers_schema: avro.schema.EnumSchema,
        decoder: avro.io.BinaryDecoder,
    ) -> str:
        index = decoder.read_int()
        if not 0 <= index < len(writers_schema.symbols):
            raise avro.errors.SchemaResolutionException(
                f"enum index {index} out of range for {len(writers_schema.symbols)} symbols"
            )
        symbol = writers_schema.symbols[index]
        if symbol in readers_schema.symbols:
            return symbol
        if readers_schema.default is not None:
            return readers_schema.default
        raise avro.errors.SchemaResolutionException(
            f"symbol {symbol!r} is not in the reader's enum {readers_schema.name}"
        )


class _ContractDatumWriter(avro.io.DatumWriter):
    """DatumWriter without avro's up-front ``validate`` pass, which costs half the time.

    The datum comes from a validated pydantic model, and ``write_data`` still
    type-checks every value it writes; the one thing pydantic does not bound,
    Python ints beyond Avro's 64-bit long, :class:`_RangeCheckedEncoder` rejects.
    """

    def write(self, datum: object, encoder: avro.io.BinaryEncoder) -> None:
        self.write_data(self.writers_schema, datum, encoder)

    def write_union(
        self, writers_schema: avro.schema.UnionSchema, datum: object,
        encoder: avro.io.BinaryEncoder,
    ) -> None:
        """Pick the branch of a ``["null", T]`` union without validating ``datum`` twice."""
        branches = writers_schema.schemas
        if len(branches) == 2 and branches[0].type == "null":
            index = 0 if datum is None else 1
            encoder.write_long(index)
            self.write_data(branches[index], datum, encoder)
        else:
            super().write_union(writers_schema, datum, encoder)


class _RangeCheckedEncoder(avro.io.BinaryEncoder):
    """BinaryEncoder that refuses ints outside Avro's long range (avro would wrap them)."""

    def write_long(self, datum: int) -> None:
        if not _LONG_MIN <= datum <= _LONG_MAX:
            raise OverflowError(f"{datum} does not fit in an Avro long")
        n = (datum << 1) ^ (datum >> 63)  # zig-zag, then base-128 varint in one write
        out = bytearray()
        while n & ~0x7F:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)
        self.write(bytes(out))


@cache
def _datum_writer(name: str) -> avro.io.DatumWriter:
    return _ContractDatumWriter(load_schema(name))


@cache
def _datum_reader(writer_ref: str, reader_name: str) -> avro.io.DatumReader:
    return _SpecDatumReader(load_schema(writer_ref), load_schema(reader_name))


# --------------------------------------------------------------------------- codec


class Codec:
    """Encodes and decodes contract models; holds the Confluent schema ids.

    Stateless apart from ``schema_ids`` (Avro readers and writers are cached
    per schema at module level), so one instance can be shared by a process.
    """

    def __init__(self, schema_ids: SchemaIds | Mapping[str, int] | None = None) -> None:
        if not isinstance(schema_ids, SchemaIds):
            schema_ids = SchemaIds(schema_ids)
        self.schema_ids = schema_ids

    def encode(self, model: BaseModel, fmt: Format = "json") -> bytes:
        """Serialize ``model``; raises :class:`EncodeError` if it cannot be written."""
        _check_format(fmt)
        name = schema_name(type(model))
        if fmt == "json":
            return _encode_json(model)
        payload = _encode_avro(model, name)
        if fmt == "avro":
            return payload
        try:
            schema_id = self.schema_ids.id_for(name)
        except KeyError as exc:
            raise EncodeError("no_schema_id", str(exc)) from None
        return bytes((MAGIC_BYTE,)) + schema_id.to_bytes(4, "big") + payload

    def decode(self, data: bytes, model_cls: type[M], fmt: Format = "json") -> M:
        """Parse and validate ``data``; raises only :class:`DecodeError` for bad input.

        (``TypeError``/``ValueError`` for a non-contract ``model_cls`` or an
        unknown ``fmt`` are programming errors, raised before ``data`` is read.)
        """
        _check_format(fmt)
        name = schema_name(model_cls)
        try:
            data = _as_bytes(data)
            if fmt == "json":
                return _decode_json(data, model_cls)
            if fmt == "avro":
                return _validate(_read_avro(data, name, name), model_cls)
            writer_ref = self._writer_ref(data, name)
            return _validate(_read_avro(data[_HEADER_LEN:], writer_ref, name), model_cls)
        except DecodeError:
            raise
        except Exception as exc:  # the contract: nothing but DecodeError escapes
            raise DecodeError("avro_decode" if fmt != "json" else "invalid_json",
                              f"{type(exc).__name__}: {exc}") from exc

    def _writer_ref(self, data: bytes, name: str) -> str:
        """The schema ref named by a Confluent header, checked against the expected contract."""
        if data[0] != MAGIC_BYTE:
            raise DecodeError("bad_magic_byte",
                              f"expected magic byte 0x00, got 0x{data[0]:02x} (not Confluent Avro)")
        if len(data) < _HEADER_LEN:
            raise DecodeError("truncated_header", f"{len(data)} bytes is shorter than the "
                                                  f"{_HEADER_LEN}-byte Confluent header")
        schema_id = int.from_bytes(data[1:_HEADER_LEN], "big")
        ref = self.schema_ids.ref_for(schema_id)
        if ref is None:
            raise DecodeError("unknown_schema_id", f"schema id {schema_id} is not configured")
        if ref.split(".", 1)[0] != name:
            raise DecodeError("schema_mismatch",
                              f"schema id {schema_id} is {ref!r}, expected a {name!r} schema")
        return ref


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {', '.join(FORMATS)}")


def _as_bytes(data: object) -> bytes:
    if data is None:
        raise DecodeError("empty", "no value (null or tombstone record)")
    if isinstance(data, bytearray | memoryview):
        data = bytes(data)
    if not isinstance(data, bytes):
        raise DecodeError("not_bytes", f"expected bytes, got {type(data).__name__}")
    if not data:
        raise DecodeError("empty", "zero-length value")
    return data


def _encode_json(model: BaseModel) -> bytes:
    try:
        # Straight to UTF-8 bytes (model_dump_json would build a str to encode again).
        return model.__pydantic_serializer__.to_json(model)
    except (PydanticSerializationError, UnicodeError) as exc:
        raise EncodeError("json_encode", str(exc)) from exc


def _encode_avro(model: BaseModel, name: str) -> bytes:
    buf = io.BytesIO()
    try:
        _datum_writer(name).write(model.model_dump(mode="json"), _RangeCheckedEncoder(buf))
    except Exception as exc:  # avro raises many types for data it cannot write
        raise EncodeError("avro_encode", f"{type(exc).__name__}: {exc}") from exc
    return buf.getvalue()


def _decode_json(data: bytes, model_cls: type[M]) -> M:
    try:
        return model_cls.model_validate_json(data)
    except ValidationError as exc:
        if any(err["type"] == "json_invalid" for err in exc.errors()):
            raise _json_syntax_error(data, exc) from None
        raise _validation_error(exc) from None


def _json_syntax_error(data: bytes, exc: ValidationError) -> DecodeError:
    """Tell invalid UTF-8 apart from bad JSON; checked only on failure to keep decoding fast."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        return DecodeError("invalid_utf8", f"invalid UTF-8 at byte {err.start}: {err.reason}")
    return DecodeError("invalid_json", exc.errors()[0]["msg"])


def _read_avro(payload: bytes, writer_ref: str, reader_name: str) -> object:
    buf = io.BytesIO(payload)
    try:
        record = _datum_reader(writer_ref, reader_name).read(avro.io.BinaryDecoder(buf))
    except UnicodeDecodeError as exc:
        message = f"invalid UTF-8 in an Avro string: {exc.reason}"
        raise DecodeError("invalid_utf8", message) from None
    except Exception as exc:  # avro raises a zoo of types on malformed input
        raise DecodeError("avro_decode", f"{type(exc).__name__}: {exc}") from None
    trailing = len(payload) - buf.tell()
    if trailing:
        raise DecodeError("avro_decode", f"{trailing} trailing bytes after the record")
    return record


def _validate(record: object, model_cls: type[M]) -> M:
    try:
        return model_cls.model_validate(record)
    except ValidationError as exc:
        raise _validation_error(exc) from None


def _validation_error(exc: ValidationError) -> DecodeError:
    """Name every offending field (``labels.foo: ...``) so a DLQ record is actionable."""
    errors = exc.errors(include_url=False, include_input=False)
    parts = [f"{'.'.join(map(str, err['loc'])) or '<root>'}: {err['msg']}"
             for err in errors[:_MAX_LISTED_ERRORS]]
    if len(errors) > _MAX_LISTED_ERRORS:
        parts.append(f"(+{len(errors) - _MAX_LISTED_ERRORS} more)")
    return DecodeError("schema_validation", "; ".join(parts))


# --------------------------------------------------------------------------- module API

_DEFAULT_CODEC: Final = Codec()


def encode(model: BaseModel, fmt: Format = "json") -> bytes:
    """Serialize ``model`` with the default :class:`Codec` (default schema ids)."""
    return _DEFAULT_CODEC.encode(model, fmt)


def decode(data: bytes, model_cls: type[M], fmt: Format = "json") -> M:
    """Decode with the default :class:`Codec`; raises only :class:`DecodeError` for bad data."""
    return _DEFAULT_CODEC.decode(data, model_cls, fmt)


def detect_format(data: bytes, default: Format = "json") -> Format:
    """Guess the format of ``data``: ``confluent`` if it starts with 0x00, ``json`` if with ``{``.

    Schemaless Avro has no marker and cannot be told apart (it may even start
    with 0x00: a null first union field), so anything else yields ``default``;
    producers of schemaless Avro must be configured explicitly, not detected.
    """
    if data[:1] == b"\x00":
        return "confluent"
    if data.lstrip(b" \t\r\n")[:1] == b"{":
        return "json"
    return default
