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
import logging
import math
import sys
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

from aiohttp import web

from ia.actuators.approvals import ApprovalError, ApprovalForbidden, ApprovalStore
from ia.core import metrics
from ia.core.errors import ConfigError
from ia.core.settings import KafkaSettings
from ia.core.signing import approval_keys
from ia.core.tokens import (  # noqa: F401  # re-exported: the API's token file format
    DEFAULT_IDENTITY,
    MIN_TOKEN_LEN,
    TOKEN_NAME_RE,
    Tokens,
    bearer,
    load_tokens,
    parse_tokens,
    token_hash,
)
from ia.decisions.guards import KillSwitch
from ia.schemas.models import ApprovalEvent, ApprovalStatus
from ia.schemas.serde import encode

log = logging.getLogger("ia.api")
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


PAUSED_APPROVAL = ("automation is paused ({who}): the actuator will not run an approved "
                   "action while paused; it records a 'blocked' outcome, and the action does "
                   "not run after `ia resume` either")

# What the kill switch says (None: not paused); see decisions.guards.KillSwitch.info.
PauseInfo = Callable[[], Awaitable[dict | None]]


def paused_by(info: dict) -> str:
    """Who paused and why, as PAUSED_APPROVAL's ``who``."""
    at = info.get("at")
    when = datetime.fromtimestamp(at / 1000, UTC).isoformat(timespec="seconds") \
        if isinstance(at, int | float) else "?"
    return f"by {info.get('by') or '?'} at {when}" + (
        f": {info['reason']}" if info.get("reason") else "")


def build_api(desk: ApprovalDesk, tokens: Tokens,
              limiter: RateLimiter | None = None,
              paused: PauseInfo | None = None) -> web.Application:
    """The approval service; ``paused`` reads the kill switch, so that approving while
    paused is refused (409) unless the body says ``"while_paused": true``."""
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
        given = bearer(request.headers)
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
        pause = await paused() if approve and paused is not None else None
        warning = PAUSED_APPROVAL.format(who=paused_by(pause)) if pause else None
        if warning and body.get("while_paused") is not True:
            # The action would be blocked for good: say so instead of reporting success.
            return web.json_response(
                {"error": f"{warning}. Approve after `ia resume`, or send "
                          '"while_paused": true to approve now anyway', "paused": pause},
                status=409)
        try:
            ev = await desk.answer(request.match_info["id"], approve, by=identity,
                                   via=f"api:{identity}", reason=reason[:4096])
        except ApprovalError as exc:
            if isinstance(exc, ApprovalForbidden):
                metrics.API_REFUSED.labels("forbidden").inc()
                log.warning("%s may not answer %s: %s", identity, request.match_info["id"],
                            exc)
            return web.json_response({"error": str(exc)}, status=exc.http_status)
        return web.json_response({"approval": _json(ev),
                                  **({"warning": warning} if warning else {})})

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
                        RateLimiter(settings.api.rate_limit, settings.api.rate_window_s),
                        KillSwitch(client, settings.redis.prefix).info)

        async def _cleanup(_app: web.Application) -> None:
            close()
            await client.aclose()

        app.on_cleanup.append(_cleanup)
        return app

    bind = (host or settings.api.host, settings.api.port if port is None else port)
    # Addresses and counts only: the tokens and any Redis password stay out of it.
    redis_at = settings.redis.url.split("@")[-1] if settings.redis.url else "-"
    web.run_app(make(), host=bind[0], port=bind[1], access_log=None,
                print=lambda _: print(f"api ready: http://{bind[0]}:{bind[1]}/approvals, "
                                      f"{len(set(tokens.hashes.values()))} identities, broker "
                                      f"{settings.kafka.bootstrap_servers}, redis {redis_at}",
                                      file=sys.stderr, flush=True))
