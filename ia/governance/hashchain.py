"""One hash chain for every tamper-evident log (the audit log, the promotion log).

A log is JSON Lines, one record per line, written once and never rewritten::

    {"v":2,"seq":7,"prev":"<hash of record 6>",…,"hash":"<HMAC-SHA256>"}

``hash`` is computed over the line's exact bytes up to ``,"hash":`` with a
closing ``}`` (the *body*).  Hashing bytes rather than a re-serialised value
means any change to a line, even one that keeps the same JSON value (``1e-05``
written ``1E-05``, keys reordered), changes its hash.  ``prev`` links each record
to the one before it (record 1 links to :data:`GENESIS`), so removing, inserting
or reordering records breaks the chain.

Two versions of a line exist, told apart by their first bytes:

* **keyed** (``{"v":2,…``): ``hash`` is the HMAC-SHA256 of the body under a
  :class:`ChainKey`.  Whoever lacks the key cannot write a record that verifies,
  so records cannot be forged, and a log cannot be rewritten consistently.
* **unkeyed** (legacy, ``{"seq":…``): ``hash`` is the plain SHA-256 of the body.
  Anyone can recompute it; such a log is only as trustworthy as the head kept
  apart from it.  The promotion log and audit logs written before keyed audit
  records existed are unkeyed.

What a log keeps apart from its file (the audit log's signed anchor and its
Redis head) is the log's business; this module seals, opens, links and appends
lines, and writes a single sealed line atomically (:func:`write_sealed`).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ia.core.errors import ConfigError

GENESIS = "0" * 64
KEYED_VERSION = 2
MIN_KEY_BYTES = 32
_HASH_KEY = b',"hash":"'
_SUFFIX_LEN = len(_HASH_KEY) + 64 + len(b'"}')
_KEYED_PREFIX = b'{"v":%d,' % KEYED_VERSION
_VERSIONED_PREFIX = b'{"v":'


class SealError(ValueError):
    """A line that is not an intact sealed record (message says what is wrong)."""


class ChainKeyError(ConfigError):
    """A chain key that cannot be used (missing, unreadable or too short)."""


@dataclass(frozen=True)
class ChainKey:
    """The secret a keyed chain is sealed with.

    It comes from a file or the environment, never from the log, Kafka or
    Redis: a party that can write those must not be able to seal records.
    ``id`` names the key without revealing it, so a report can say "sealed
    with another key" instead of "modified".
    """

    secret: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if len(self.secret) < MIN_KEY_BYTES:
            raise ChainKeyError(f"a chain key needs at least {MIN_KEY_BYTES} bytes, "
                            f"this one has {len(self.secret)}")

    @property
    def id(self) -> str:
        return hmac.new(self.secret, b"ia chain key id", hashlib.sha256).hexdigest()[:16]

    def mac(self, body: bytes) -> str:
        return hmac.new(self.secret, body, hashlib.sha256).hexdigest()

    @classmethod
    def from_file(cls, path: Path) -> ChainKey:
        """The key stored in ``path`` (its text, surrounding whitespace removed)."""
        try:
            return cls(path.read_bytes().strip())
        except OSError as exc:
            raise ChainKeyError(f"cannot read the chain key {path}: {exc.strerror}") from None

    @classmethod
    def create(cls, path: Path) -> ChainKey:
        """Generate a random key into a new ``0600`` file; refuses to replace one."""
        path.parent.mkdir(parents=True, exist_ok=True)
        secret = secrets.token_hex(32).encode()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.write(fd, secret + b"\n")
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls(secret)


def seal(fields: dict[str, Any], key: ChainKey | None) -> tuple[bytes, str]:
    """The line (with its newline) that stores ``fields`` in order, and its hash.

    With ``key`` the line is keyed (``"v":2`` first, HMAC-SHA256); without, it
    is an unkeyed legacy line (SHA-256).  ``fields`` must not hold ``v`` or
    ``hash`` and should start with ``seq`` and ``prev``.
    """
    if key is not None:
        fields = {"v": KEYED_VERSION, **fields}
    body = json.dumps(fields, ensure_ascii=False, separators=(",", ":"),
                      allow_nan=False).encode()
    digest = key.mac(body) if key is not None else hashlib.sha256(body).hexdigest()
    return body[:-1] + _HASH_KEY + digest.encode() + b'"}\n', digest


def is_keyed(line: bytes) -> bool:
    """Whether ``line`` claims to be keyed (its hash is only checked by :func:`unseal`)."""
    return line.startswith(_KEYED_PREFIX)


def unseal(line: bytes, key: ChainKey | None) -> tuple[dict[str, Any], str]:
    """The fields of one line (without its newline) and its hash, checking the hash.

    A keyed line needs ``key``; an unkeyed (legacy) line is checked as SHA-256.
    The returned fields never include ``v``.
    """
    if len(line) <= _SUFFIX_LEN or not line.endswith(b'"}'):
        raise SealError("not a sealed record (truncated or altered)")
    cut = len(line) - _SUFFIX_LEN
    if line[cut:cut + len(_HASH_KEY)] != _HASH_KEY:
        raise SealError("not a sealed record (hash field missing or altered)")
    stored = line[cut + len(_HASH_KEY):-2]
    body = line[:cut] + b"}"
    if is_keyed(line):
        if key is None:
            raise SealError("a keyed record, and no key to check it with")
        expected = key.mac(body)
    elif line.startswith(_VERSIONED_PREFIX):
        raise SealError("unknown record version")
    else:
        expected = hashlib.sha256(body).hexdigest()
    if not hmac.compare_digest(expected.encode(), stored):
        raise SealError("hash mismatch: the record was modified"
                        + (" (or sealed with another key)" if is_keyed(line) else ""))
    try:
        fields = json.loads(body)
    except ValueError as exc:
        raise SealError(f"malformed record: {exc}") from None
    if not isinstance(fields, dict):
        raise SealError("malformed record: not a JSON object")
    fields.pop("v", None)
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


def write_sealed(path: Path, fields: dict[str, Any], key: ChainKey) -> None:
    """Replace ``path`` by one keyed line holding ``fields``, atomically and durably.

    A reader sees the old line or the new one, never half of one, and a crash
    leaves one of the two (the rename and its directory are fsynced).
    """
    line, _digest = seal(fields, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def read_sealed(path: Path, key: ChainKey) -> dict[str, Any] | None:
    """The fields of the keyed line in ``path`` (None if there is no such file).

    Raises :class:`SealError` if the line is not keyed or fails its HMAC.
    """
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    line = raw[:-1] if raw.endswith(b"\n") else raw
    if not is_keyed(line):
        raise SealError("not a keyed record")
    fields, _digest = unseal(line, key)
    return fields
