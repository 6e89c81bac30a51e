"""One hash chain for every tamper-evident log (the audit log, the promotion log).

A log is JSON Lines, one record per line, written once and never rewritten::

    {"seq":7,"prev":"<hash of record 6>",…,"hash":"<sha256>"}

``hash`` is the SHA-256 of the line's exact bytes up to ``,"hash":`` with a
closing ``}`` (the *body*).  Hashing bytes rather than a re-serialised value
means any change to a line, even one that keeps the same JSON value (``1e-05``
written ``1E-05``, keys reordered), changes its hash.  ``prev`` links each record
to the one before it (record 1 links to :data:`GENESIS`), so removing, inserting
or reordering records breaks the chain.

What a log keeps apart from its file (the audit log's head in Redis) is the
log's business; this module only seals, opens, links and appends lines.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

GENESIS = "0" * 64
_HASH_KEY = b',"hash":"'
_SUFFIX_LEN = len(_HASH_KEY) + 64 + len(b'"}')


class SealError(ValueError):
    """A line that is not an intact sealed record (message says what is wrong)."""


def seal(fields: dict[str, Any]) -> tuple[bytes, str]:
    """The line (with its newline) that stores ``fields`` in order, and its hash.

    ``fields`` must not hold ``hash`` and should start with ``seq`` and ``prev``.
    """
    body = json.dumps(fields, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode()
    digest = hashlib.sha256(body).hexdigest()
    return body[:-1] + _HASH_KEY + digest.encode() + b'"}\n', digest


def unseal(line: bytes) -> tuple[dict[str, Any], str]:
    """The fields of one line (without its newline) and its hash, checking the hash."""
    if len(line) <= _SUFFIX_LEN or not line.endswith(b'"}'):
        raise SealError("not a sealed record (truncated or altered)")
    cut = len(line) - _SUFFIX_LEN
    if line[cut:cut + len(_HASH_KEY)] != _HASH_KEY:
        raise SealError("not a sealed record (hash field missing or altered)")
    stored = line[cut + len(_HASH_KEY):-2]
    body = line[:cut] + b"}"
    if hashlib.sha256(body).hexdigest().encode() != stored:
        raise SealError("hash mismatch: the record was modified")
    try:
        fields = json.loads(body)
    except ValueError as exc:
        raise SealError(f"malformed record: {exc}") from None
    if not isinstance(fields, dict):
        raise SealError("malformed record: not a JSON object")
    return fields, stored.decode()


def link_problems(seq: object, prev: object, after_seq: int, after_hash: str) -> list[str]:
    """What is wrong with record ``seq`` (linked to ``prev``) following record
    ``after_seq`` whose hash is ``after_hash``; empty if it follows correctly."""
    out = []
    if seq != after_seq + 1:
        out.append(f"seq {seq} follows seq {after_seq} (a record was removed or inserted)")
    if prev != after_hash:
        out.append(f"seq {seq} does not chain to the record before it "
                   "(a record was removed, inserted or modified)")
    return out


def read_lines(path: Path) -> Iterator[tuple[int, int, bytes, bool]]:
    """``(line number, byte offset, line without newline, complete)`` of every line;
    nothing if ``path`` does not exist."""
    try:
        fh = open(path, "rb")  # noqa: SIM115
    except FileNotFoundError:
        return
    with fh:
        offset = 0
        for lineno, raw in enumerate(fh, start=1):
            complete = raw.endswith(b"\n")
            yield lineno, offset, raw[:-1] if complete else raw, complete
            offset += len(raw)


def append(path: Path, data: bytes) -> None:
    """Append ``data`` to ``path`` and fsync; the lines are durable when this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)
