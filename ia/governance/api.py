"""Answering approval requests: the shared desk, and the token-authenticated HTTP API.

``ia approvals approve|reject`` and ``ia api`` both go through
:class:`ApprovalDesk`: the answer is checked against the request's terms, signed
and made in Redis (atomically, so it cannot race another answer or the expiry),
then announced on ``ia.approvals`` where the actuator picks it up, verifies the
signed records and runs (or settles) the action.

HTTP API (``ia api``; JSON in and out)::

    GET  /healthz                          no authentication; {"ok": true}
    GET  /approvals[?all=1]                pending (or all recent) requests
    GET  /approvals/{id}                   one request (approval or decision id)
    POST /approvals/{id}/approve           {"reason": "…"}  (optional)
    POST /approvals/{id}/reject            {"reason": "…"}  (required)

Every ``/approvals`` request needs ``Authorization: Bearer <token>``.  Tokens
are named: the name is the caller's **identity**, recorded as ``by`` (``via
api:<name>``) on the answer, the ``ia.approvals`` event, the audit chain and the
outcome.  A ``by`` in the body is refused (``400``) unless it is that identity.
Tokens come from ``IA_API_TOKEN`` (identity ``api``) or the file
``IA_API_TOKEN_FILE`` (:func:`load_tokens`), never from code; only their
SHA-256 is kept, compared in constant time.  A missing or wrong token gets
``401`` before anything is read or changed; a server without any token refuses
every request.  An identity outside the rule's approvers, or one approving a
second time where several approvers are required, gets ``403``.  More than
``IA_API_RATE_LIMIT`` requests per ``IA_API_RATE_WINDOW_S`` of one identity (or,
unauthenticated, one client address) get ``429`` with ``Retry-After``.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import math
import re
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from ia.actuators.approvals import ApprovalError, ApprovalForbidden, ApprovalStore
from ia.core import metrics
from ia.core.errors import ConfigError
from ia.core.settings import KafkaSettings
from ia.core.signing import approval_keys
from ia.schemas.models import ApprovalEvent, ApprovalStatus
from ia.schemas.serde import encode

log = logging.getLogger("ia.api")
MIN_TOKEN_LEN = 16
MAX_BODY = 64 * 1024
# Typed request storage where aiohttp has it (3.11+), a plain key otherwise.
TOKEN_NAME = web.RequestKey("token_name", str) if hasattr(web, "RequestKey") else "token_name"

Publish = Callable[[ApprovalEvent], Awaitable[None]]


class ApprovalDesk:
    def __init__(self, store: ApprovalStore, publish: Publish) -> None:
        self.store = store
        self.publish = publish

    async def answer(self, approval_id: str, approve: bool, *, by: str, via: str,
                     reason: str = "") -> ApprovalEvent:
        status = ApprovalStatus.approved if approve else ApprovalStatus.rejected
        ev = await self.store.resolve(approval_id, status, by=by, via=via, reason=reason)
        # If this fails the actuator still settles it from Redis (unfinished approvals).
        await self.publish(ev)
        return ev


def kafka_publisher(kafka: KafkaSettings, topic: str,
                    fmt: str = "json") -> tuple[Publish, Callable]:
    """A publisher of approval events (confluent-kafka) and its closer."""
    from ia.core.kafka import producer as kafka_producer

    producer = kafka_producer(kafka, {"acks": "all", "enable.idempotence": True,
                                      "linger.ms": 0})

    def _send(ev: ApprovalEvent) -> None:
        errors: list = []
        producer.produce(topic, key=ev.entity.encode(), value=encode(ev, fmt),
                         on_delivery=lambda err, _msg: errors.append(err) if err else None)
        if producer.flush(15) or errors:
            raise RuntimeError(f"approval event not delivered to {topic}: {errors or 'timeout'}")

    async def publish(ev: ApprovalEvent) -> None:
        await asyncio.to_thread(_send, ev)

    return publish, lambda: producer.flush(5)


# --------------------------------------------------------------------------- tokens

# A token's name is its identity: no ``@`` (that is the CLI's user@host), no ``:``.
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


def _bearer(request: web.Request) -> str | None:
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        return None
    return given.strip()


# --------------------------------------------------------------------------- rate limit


class RateLimiter:
    """At most ``limit`` requests per key within a sliding ``window_s`` (0: no limit).

    In memory, per API process.  Keys are identities, and client addresses before
    authentication (so guessing tokens is slow too); at most ``max_keys`` are
    tracked, the least recently seen forgotten first.
    """

    def __init__(self, limit: int, window_s: float, *,
                 clock: Callable[[], float] = time.monotonic, max_keys: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self.clock = clock
        self.max_keys = max_keys
        self._hits: OrderedDict[str, deque[float]] = OrderedDict()

    def hit(self, key: str) -> float | None:
        """Count a request of ``key``; seconds to wait if it is over the limit (None: ok)."""
        if self.limit <= 0:
            return None
        now = self.clock()
        hits = self._hits.pop(key, None) or deque()
        while hits and hits[0] <= now - self.window_s:
            hits.popleft()
        self._hits[key] = hits  # most recently seen last
        if len(self._hits) > self.max_keys:
            self._hits.popitem(last=False)
        if len(hits) >= self.limit:
            return max(0.0, hits[0] + self.window_s - now)
        hits.append(now)
        return None


# --------------------------------------------------------------------------- HTTP


def _json(ev: ApprovalEvent) -> dict:
    return ev.model_dump(mode="json")


def _refused(status: int, reason: str, message: str, **headers: str) -> web.Response:
    metrics.API_REFUSED.labels(reason).inc()
    return web.json_response({"error": message}, status=status, headers=headers or None)


def build_api(desk: ApprovalDesk, tokens: Tokens,
              limiter: RateLimiter | None = None) -> web.Application:
    limiter = limiter or RateLimiter(0, 1.0)

    def too_many(key: str) -> web.Response | None:
        wait = limiter.hit(key)
        if wait is None:
            return None
        return _refused(429, "rate_limited", "too many requests",
                        **{"Retry-After": str(max(1, math.ceil(wait)))})

    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path == "/healthz":
            return await handler(request)
        given = _bearer(request)
        name = tokens.identify(given) if tokens and given else None
        if name is None:
            log.warning("unauthenticated %s %s from %s", request.method, request.path,
                        request.remote)
            return too_many(f"addr:{request.remote}") or _refused(
                401, "unauthenticated", "unauthorized",
                **{"WWW-Authenticate": 'Bearer realm="ia"'})
        limited = too_many(f"id:{name}")
        if limited is not None:
            log.warning("rate limited: %s %s by %s", request.method, request.path, name)
            return limited
        request[TOKEN_NAME] = name  # type: ignore[index]
        return await handler(request)

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def list_(request: web.Request) -> web.Response:
        pending_only = request.query.get("all", "") not in ("1", "true", "yes")
        events = await desk.store.list(pending_only=pending_only)
        return web.json_response({"approvals": [_json(e) for e in events]})

    async def show(request: web.Request) -> web.Response:
        found = await desk.store.get(request.match_info["id"])
        if found is None:
            return web.json_response({"error": "no such approval request"}, status=404)
        ev, d = found
        return web.json_response({"approval": _json(ev), "decision": d.model_dump(mode="json")})

    async def answer(request: web.Request, approve: bool) -> web.Response:
        try:
            body = await request.json() if request.can_read_body else {}
        except ValueError:
            return web.json_response({"error": "body must be JSON"}, status=400)
        if not isinstance(body, dict):
            return web.json_response({"error": "body must be a JSON object"}, status=400)
        identity = request[TOKEN_NAME]  # type: ignore[index]
        by, reason = body.get("by"), body.get("reason") or ""
        if not isinstance(reason, str):
            return web.json_response({"error": "reason must be a string"}, status=400)
        if by is not None and by != identity:
            # The approver is whoever holds the token: a name in the body cannot change it.
            return web.json_response(
                {"error": f"the approver is this token's identity ({identity}); "
                          "leave out 'by'"}, status=400)
        if not approve and not reason.strip():
            return web.json_response({"error": "a rejection needs a reason"}, status=400)
        try:
            ev = await desk.answer(request.match_info["id"], approve, by=identity,
                                   via=f"api:{identity}", reason=reason[:4096])
        except ApprovalError as exc:
            if isinstance(exc, ApprovalForbidden):
                metrics.API_REFUSED.labels("forbidden").inc()
                log.warning("%s may not answer %s: %s", identity, request.match_info["id"],
                            exc)
            return web.json_response({"error": str(exc)}, status=exc.http_status)
        return web.json_response({"approval": _json(ev)})

    async def approve(request: web.Request) -> web.Response:
        return await answer(request, True)

    async def reject(request: web.Request) -> web.Response:
        return await answer(request, False)

    app = web.Application(middlewares=[auth], client_max_size=MAX_BODY)
    app.add_routes([
        web.get("/healthz", healthz),
        web.get("/approvals", list_),
        web.get("/approvals/{id}", show),
        web.post("/approvals/{id}/approve", approve),
        web.post("/approvals/{id}/reject", reject),
    ])
    return app


def serve(settings, host: str | None = None, port: int | None = None) -> None:
    """``ia api``: serve until interrupted."""
    from ia.core.redis import client as redis_client

    settings.require_endpoints()
    tokens = load_tokens(
        settings.api.token.get_secret_value() if settings.api.token else None,
        settings.api.token_file)
    if not tokens:
        raise ConfigError("no API token: set IA_API_TOKEN or IA_API_TOKEN_FILE")
    metrics.serve(settings.metrics_port, settings.metrics_host, role="api")

    async def make() -> web.Application:
        client = redis_client(settings.redis)
        publish, close = kafka_publisher(settings.kafka, settings.topics.approvals,
                                         settings.wire_format)
        store = ApprovalStore(client, settings.redis.prefix,
                              keys=approval_keys(settings.approvals, settings.signing))
        store.require_keys()  # no key: refuse to start rather than fail every answer
        app = build_api(ApprovalDesk(store, publish), tokens,
                        RateLimiter(settings.api.rate_limit, settings.api.rate_window_s))

        async def _cleanup(_app: web.Application) -> None:
            close()
            await client.aclose()

        app.on_cleanup.append(_cleanup)
        return app

    web.run_app(make(), host=host or settings.api.host,
                port=settings.api.port if port is None else port, print=None,
                access_log=None)
