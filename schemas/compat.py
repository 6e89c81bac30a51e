"""Backward-compatibility checks between Avro schemas.

A published schema (``schemas/avro/history/*.avsc``) is a promise: data written
with it sits in topics and must stay readable.  :func:`check_backward_compatible`
answers the question a schema registry's BACKWARD check answers -- can a
reader using the *new* schema resolve every datum written with the *old* one?
-- following the Avro specification's schema resolution rules:

* records match by unqualified name (or a reader alias); reader fields are
  matched to writer fields by name (or reader field alias); a reader field the
  writer lacks needs a default; writer-only fields are skipped;
* enums: every writer symbol must be in the reader, unless the reader enum
  declares a default;
* primitives are equal or a legal promotion: int -> long -> float -> double,
  string <-> bytes;
* arrays and maps resolve their items and values;
* a writer union: every branch must be readable; a reader union: the first
  reader branch that matches the writer type is used and must resolve.

``python_avro=True`` (the default) additionally reports resolutions that the
spec allows but avro-python's ``DatumReader`` -- the reader ``ia.schemas.serde``
uses -- does not perform (a changed namespace, field aliases, string <-> bytes,
promotions inside arrays and maps, a writer union read as a non-union),
because an incompatibility discovered in a consumer at runtime is the thing
this check exists to prevent.  (The reader enum default, which avro-python
also ignores, is honoured by ``serde``'s reader, so it is not reported.)
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import avro.schema

from ia.schemas.serde import SCHEMA_NAMES, history_refs, load_schema

SchemaLike = avro.schema.Schema | Mapping[str, object] | str

# writer type -> reader types that can read it (besides the same type)
_PROMOTIONS: dict[str, frozenset[str]] = {
    "int": frozenset({"long", "float", "double"}),
    "long": frozenset({"float", "double"}),
    "float": frozenset({"double"}),
    "string": frozenset({"bytes"}),
    "bytes": frozenset({"string"}),
}
_NAMED = (avro.schema.RecordSchema, avro.schema.EnumSchema, avro.schema.FixedSchema)


def check_backward_compatible(
    reader_schema: SchemaLike, writer_schema: SchemaLike, *, python_avro: bool = True
) -> list[str]:
    """Why ``reader_schema`` cannot read data written with ``writer_schema`` (empty: it can).

    Schemas may be parsed avro schemas, JSON text or JSON-like mappings.
    """
    checker = _Checker(python_avro=python_avro)
    reader, writer = _parse(reader_schema), _parse(writer_schema)
    checker.check(reader, writer, _label(reader))
    return checker.problems


def compatibility_report(*, python_avro: bool = True) -> dict[str, list[str]]:
    """Check every current schema against each of its published history versions.

    Keys are history refs (``"decision.v1"``); an empty list means compatible.
    """
    report: dict[str, list[str]] = {}
    for name in SCHEMA_NAMES.values():
        for ref in history_refs(name):
            report[ref] = check_backward_compatible(
                load_schema(name), load_schema(ref), python_avro=python_avro
            )
    return report


def _parse(schema: SchemaLike) -> avro.schema.Schema:
    if isinstance(schema, avro.schema.Schema):
        return schema
    return avro.schema.parse(schema if isinstance(schema, str) else json.dumps(schema))


def _label(schema: avro.schema.Schema) -> str:
    return schema.name if isinstance(schema, _NAMED) else schema.type


def _describe(schema: avro.schema.Schema) -> str:
    """A short type description for messages: ``string``, ``record Action``, ``array<long>``."""
    if isinstance(schema, _NAMED):
        return f"{schema.type} {schema.name}"
    if isinstance(schema, avro.schema.ArraySchema):
        return f"array<{_describe(schema.items)}>"
    if isinstance(schema, avro.schema.MapSchema):
        return f"map<{_describe(schema.values)}>"
    if isinstance(schema, avro.schema.UnionSchema):
        return "union[" + ", ".join(_describe(s) for s in schema.schemas) + "]"
    return str(schema.type)


class _Checker:
    """Walks a reader/writer pair, collecting problems with their field paths."""

    def __init__(self, *, python_avro: bool) -> None:
        self.python_avro = python_avro
        self.problems: list[str] = []
        self._in_progress: set[tuple[int, int]] = set()  # recursive named types

    def check(self, reader: avro.schema.Schema, writer: avro.schema.Schema, path: str) -> None:
        if isinstance(writer, avro.schema.UnionSchema):
            if self.python_avro and not isinstance(reader, avro.schema.UnionSchema):
                self.problems.append(f"{path}: writer {_describe(writer)} read as non-union "
                                     f"{_describe(reader)} (avro-python cannot resolve this)")
            for branch in writer.schemas:
                self.check(reader, branch, path)
        elif isinstance(reader, avro.schema.UnionSchema):
            self._check_reader_union(reader, writer, path)
        elif not self._matches(reader, writer):
            self.problems.append(f"{path}: reader type {_describe(reader)} cannot read "
                                 f"writer type {_describe(writer)}")
        else:
            self._check_matched(reader, writer, path)

    def _check_reader_union(
        self, reader: avro.schema.UnionSchema, writer: avro.schema.Schema, path: str
    ) -> None:
        """Resolve against the first matching branch, as the spec and avro readers do."""
        for branch in reader.schemas:
            if self._matches(branch, writer):
                self.check(branch, writer, path)
                return
        self.problems.append(f"{path}: no branch of reader {_describe(reader)} can read "
                             f"writer type {_describe(writer)}")

    def _matches(self, reader: avro.schema.Schema, writer: avro.schema.Schema) -> bool:
        """Shallow match: same kind (and name), or a legal primitive promotion."""
        if reader.type != writer.type:
            return reader.type in _PROMOTIONS.get(writer.type, frozenset())
        if isinstance(reader, _NAMED):
            aliases = [str(a).rsplit(".", 1)[-1] for a in reader.get_prop("aliases") or []]
            return reader.name == writer.name or writer.name in aliases
        return True

    def _check_matched(
        self, reader: avro.schema.Schema, writer: avro.schema.Schema, path: str
    ) -> None:
        if self.python_avro:
            self._check_python_avro_limits(reader, writer, path)
        if isinstance(reader, avro.schema.RecordSchema):
            self._check_record(reader, writer, path)
        elif isinstance(reader, avro.schema.EnumSchema):
            self._check_enum(reader, writer, path)
        elif isinstance(reader, avro.schema.FixedSchema):
            if reader.size != writer.size:
                self.problems.append(f"{path}: fixed {reader.name} size changed from "
                                     f"{writer.size} to {reader.size}")
        elif isinstance(reader, avro.schema.ArraySchema):
            self.check(reader.items, writer.items, f"{path}[]")
        elif isinstance(reader, avro.schema.MapSchema):
            self.check(reader.values, writer.values, f"{path}{{}}")

    def _check_python_avro_limits(
        self, reader: avro.schema.Schema, writer: avro.schema.Schema, path: str
    ) -> None:
        if isinstance(reader, _NAMED) and reader.fullname != writer.fullname:
            self.problems.append(f"{path}: {reader.type} renamed from {writer.fullname} to "
                                 f"{reader.fullname} (avro-python matches full names only)")
        if {reader.type, writer.type} == {"string", "bytes"}:
            self.problems.append(f"{path}: {writer.type} -> {reader.type} promotion is not "
                                 f"supported by avro-python")
        for kind, attr in (("array", "items"), ("map", "values")):
            if reader.type == kind and getattr(reader, attr).type != getattr(writer, attr).type:
                self.problems.append(f"{path}: {kind} {attr} changed from {_describe(writer)} to "
                                     f"{_describe(reader)} (avro-python needs the same type)")

    def _check_record(
        self, reader: avro.schema.RecordSchema, writer: avro.schema.RecordSchema, path: str
    ) -> None:
        key = (id(reader), id(writer))
        if key in self._in_progress:
            return
        self._in_progress.add(key)
        for field in reader.fields:
            field_path = f"{path}.{field.name}"
            writer_field = self._writer_field(writer, field, field_path)
            if writer_field is not None:
                self.check(field.type, writer_field.type, field_path)
            elif not field.has_default:
                self.problems.append(f"{field_path}: reader field has no default and the "
                                     f"writer does not write it")
        self._in_progress.discard(key)

    def _writer_field(
        self, writer: avro.schema.RecordSchema, field: avro.schema.Field, path: str
    ) -> avro.schema.Field | None:
        fields = writer.fields_dict
        if field.name in fields:
            return fields[field.name]
        for alias in field.get_prop("aliases") or []:
            if alias in fields:
                if self.python_avro:
                    self.problems.append(f"{path}: read from writer field {alias!r} through an "
                                         f"alias (avro-python ignores field aliases)")
                return fields[alias]
        return None

    def _check_enum(
        self, reader: avro.schema.EnumSchema, writer: avro.schema.EnumSchema, path: str
    ) -> None:
        missing = [s for s in writer.symbols if s not in reader.symbols]
        if missing and reader.default is None:
            self.problems.append(f"{path}: reader enum {reader.name} lacks writer symbols "
                                 f"{missing} and has no default")
