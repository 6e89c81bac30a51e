"""HMAC signatures of action decisions: only a worker's decisions are executed.

The decisions topic is a command channel that anyone with access to the broker can
write to.  The worker signs every decision that carries an action; the actuator
verifies the signature before anything else and never executes one it cannot verify.

What is signed (:data:`SIGNED_FIELDS`) is what makes the decision do something and
identifies it: ``decision_id`` (it names the pipeline and the event, and it is the
executor's idempotency claim), ``event_id``, ``correlation_id``, ``entity``,
``metric``, ``ts``, ``decided_at`` (bounded by a maximum age, so an old genuine
decision cannot be held back and released later), ``action`` (type, target and
every parameter, the webhook URL included), ``mode``, ``policy_version`` and
``rule_trace`` (its last matched rule step names the rule the actuator re-authorises
the action against, whose guards apply and whose approvers answer).  The scores,
features and explanation are what humans read; changing them cannot make anything
run.  The canonical encoding is sorted-key compact JSON of those
fields, so the worker and the actuator agree on the bytes without sharing code paths.

Feedback labels are signed the same way with their own keys (``IA_FEEDBACK_KEY_FILE``,
:data:`FEEDBACK_FIELDS`): whoever may label decisions (``ia feedback``) need not be able
to sign decisions, and the worker counts only labels it can verify.

The signature is ``"<key id>:<hex HMAC-SHA256>"``.  Keys come from a file (never
from Kafka or Redis) of ``key_id secret_hex`` lines: the first line signs, every
line verifies, so a key is rotated by putting the new one first and dropping the
old one once no decision signed with it is still in flight.  Secrets are never
logged or put in error messages.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from ia.core.errors import ConfigError
from ia.core.settings import ApprovalSettings, SigningSettings

SIGNED_FIELDS = ("decision_id", "event_id", "correlation_id", "entity", "metric", "ts",
                 "decided_at", "action", "mode", "policy_version", "rule_trace")
# What a label's signature covers: everything it says (ia feedback signs, the worker checks).
FEEDBACK_FIELDS = ("decision_id", "label", "by", "at", "entity", "comment")
# Shorter secrets are refused: HMAC-SHA256 wants at least its output size of key.
MIN_SECRET_BYTES = 32


class Rejection(StrEnum):
    """Why a decision is not executed (the ``reason`` label of ``ia_decisions_rejected_total``)."""

    unsigned = "unsigned"
    malformed = "malformed"
    unknown_key = "unknown_key"
    bad_signature = "bad_signature"
    too_old = "too_old"


def canonical(decision: Mapping[str, Any], fields: tuple[str, ...] = SIGNED_FIELDS) -> bytes:
    """The bytes signed for ``decision`` (its JSON form, ``model_dump(mode="json")``), or
    for another record with its ``fields``."""
    content = {name: decision.get(name) for name in fields}
    return json.dumps(content, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=False).encode()


@dataclass(frozen=True)
class KeyRing:
    """Signing keys by id; ``signing_id`` names the one new signatures use."""

    keys: Mapping[str, bytes]
    signing_id: str

    def __repr__(self) -> str:  # never show a secret
        return f"KeyRing(ids={sorted(self.keys)}, signing_id={self.signing_id!r})"

    def sign(self, decision: Mapping[str, Any], fields: tuple[str, ...] = SIGNED_FIELDS) -> str:
        return self.sign_bytes(canonical(decision, fields))

    def check(self, decision: Mapping[str, Any], now_ms: int,
              max_age_ms: int) -> Rejection | None:
        """Why ``decision`` must not be executed (None: it is a worker's and fresh)."""
        refused = self.verify(decision)
        if refused is not None:
            return refused
        if now_ms - int(decision.get("decided_at") or 0) > max_age_ms:
            return Rejection.too_old
        return None

    def verify(self, record: Mapping[str, Any],
               fields: tuple[str, ...] = SIGNED_FIELDS) -> Rejection | None:
        """Why ``record``'s signature over ``fields`` is not one of these keys' (None: it is)."""
        return self.verify_bytes(canonical(record, fields), record.get("signature"))

    def sign_bytes(self, data: bytes) -> str:
        """``"<key id>:<hex HMAC-SHA256>"`` of ``data`` with the signing key.

        Callers other than decisions put a domain prefix in ``data`` (approval
        records: :data:`ia.actuators.approvers.DOMAIN`), so no signature made for
        one kind of record can ever verify as another kind.
        """
        mac = hmac.new(self.keys[self.signing_id], data, hashlib.sha256)
        return f"{self.signing_id}:{mac.hexdigest()}"

    def verify_bytes(self, data: bytes, signature: object) -> Rejection | None:
        """Why ``signature`` is not a valid signature of ``data`` (None: it is)."""
        if not signature:
            return Rejection.unsigned
        key_id, sep, mac = str(signature).partition(":")
        if not sep or not mac:
            return Rejection.malformed
        key = self.keys.get(key_id)
        if key is None:
            return Rejection.unknown_key
        expected = hmac.new(key, data, hashlib.sha256).hexdigest()
        if not hmac.compare_digest(expected, mac):
            return Rejection.bad_signature
        return None


def parse_keys(text: str, source: str) -> KeyRing:
    """A key ring from ``key_id secret_hex`` lines (blank lines and ``#`` comments skipped)."""
    keys: dict[str, bytes] = {}
    order: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) != 2 or ":" in parts[0]:
            raise ConfigError(f"{source}:{number}: expected `key_id secret_hex`")
        try:
            secret = bytes.fromhex(parts[1])
        except ValueError:
            raise ConfigError(f"{source}:{number}: the secret is not hex") from None
        if len(secret) < MIN_SECRET_BYTES:
            raise ConfigError(f"{source}:{number}: the secret is shorter than "
                              f"{MIN_SECRET_BYTES} bytes")
        keys[parts[0]] = secret
        order.append(parts[0])
    if not order:
        raise ConfigError(f"{source}: no signing key in it")
    return KeyRing(keys, order[0])


def load_keys(path: Path) -> KeyRing:
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"signing key file {path}: {exc.strerror}") from None
    return parse_keys(text, str(path))


def write_key_file(path: Path, key_id: str = "k1") -> Path:
    """Generate a fresh key into ``path`` (created 0600; kept if it already exists, so
    processes that already read it keep verifying)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return path
    with os.fdopen(fd, "w") as f:
        f.write(f"{key_id} {secrets.token_hex(MIN_SECRET_BYTES)}\n")
    return path


def signing_keys(settings: SigningSettings) -> KeyRing | None:
    """The configured key ring (None: no key file configured)."""
    return load_keys(settings.key_file) if settings.key_file is not None else None


def feedback_keys(settings: SigningSettings) -> KeyRing | None:
    """The key ring of feedback labels (None: no feedback key file configured)."""
    path = settings.feedback_key_file
    return load_keys(path) if path is not None else None


def approval_keys(approvals: ApprovalSettings, signing: SigningSettings) -> KeyRing | None:
    """The key ring of approval records: ``IA_APPROVAL_KEY_FILE``, else the decisions'
    key file (one file is enough for a single-host setup; give the API and the
    operators a separate one so they cannot sign decisions).  None: neither is set."""
    path = approvals.key_file or signing.key_file
    return load_keys(path) if path is not None else None
