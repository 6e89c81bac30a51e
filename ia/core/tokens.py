"""Named bearer tokens of the HTTP services (``ia api``, ``ia receive``).

A token file holds one token per line: ``name sha256:<hex>`` (the token's
SHA-256, so the file holds no secret), ``name token``, or a bare ``token``
(identity ``api``).  Tokens are compared by hash in constant time and never
logged; the identity a token maps to is who the request is recorded as.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from ia.core.errors import ConfigError

MIN_TOKEN_LEN = 16
TOKEN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,63}")
DEFAULT_IDENTITY = "api"

HASH_PREFIX = "sha256:"


def token_hash(token: str) -> str:
    """``sha256:<hex>`` of ``token``: what a token file may hold instead of the token."""
    return HASH_PREFIX + hashlib.sha256(token.strip().encode()).hexdigest()


@dataclass(frozen=True)
class Tokens:
    """Named bearer tokens, kept only as SHA-256 hashes: ``{hash: identity}``."""

    hashes: Mapping[str, str]

    def __bool__(self) -> bool:
        return bool(self.hashes)

    def __repr__(self) -> str:  # never show a hash either
        return f"Tokens(identities={sorted(set(self.hashes.values()))})"

    def identify(self, given: str) -> str | None:
        """The identity whose token is ``given`` (None: none), in constant time."""
        digest = token_hash(given).encode()
        found = None
        for value, name in self.hashes.items():  # compare with every hash: no early exit
            if hmac.compare_digest(digest, value.encode()):
                found = name
        return found


def parse_tokens(lines: Iterable[tuple[int, str]], source: str) -> dict[str, str]:
    """``{hash: identity}`` from token file lines (``(number, text)``)."""
    out: dict[str, str] = {}
    for n, line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        if len(parts) > 2:
            raise ConfigError(f"{source}:{n}: expected `name sha256:<hex>`, `name token` "
                              "or `token`")
        name, secret = (parts[0], parts[1]) if len(parts) == 2 else (DEFAULT_IDENTITY, parts[0])
        if not TOKEN_NAME_RE.fullmatch(name):
            raise ConfigError(f"{source}:{n}: token name {name!r} is not an identity "
                              "(letters, digits and . _ + -, at most 64; no @ or :)")
        if secret.startswith(HASH_PREFIX):
            digest = secret[len(HASH_PREFIX):].lower()
            if not re.fullmatch(r"[0-9a-f]{64}", digest):
                raise ConfigError(f"{source}:{n}: {HASH_PREFIX} needs 64 hex digits")
            hashed = HASH_PREFIX + digest
        elif len(secret) < MIN_TOKEN_LEN:
            raise ConfigError(f"{source}:{n}: the token of {name!r} is shorter than "
                              f"{MIN_TOKEN_LEN} characters")
        else:
            hashed = token_hash(secret)
        if out.get(hashed, name) != name:
            raise ConfigError(f"{source}:{n}: the same token is given to {out[hashed]!r} "
                              f"and {name!r}")
        out[hashed] = name
    return out


def load_tokens(token: str | None, token_file: Path | None) -> Tokens:
    """The API's tokens: ``IA_API_TOKEN`` (identity ``api``) and the token file.

    A file line is ``name sha256:<hex>`` (the SHA-256 of the token: the file then
    holds no secret), ``name token``, or just ``token`` (identity ``api``, the
    format of earlier versions).  Several lines may share a name (rotation).
    """
    hashes: dict[str, str] = {}
    if token:
        hashes.update(parse_tokens([(1, token.strip())], "IA_API_TOKEN"))
    if token_file:
        text = Path(token_file).read_text()  # a missing file: the CLI's one-line OSError
        hashes.update(parse_tokens(enumerate(text.splitlines(), start=1), str(token_file)))
    return Tokens(hashes)


def bearer(headers: Mapping[str, str]) -> str | None:
    """The bearer token of an ``Authorization`` header (None: there is none)."""
    scheme, _, given = headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    return given.strip()
