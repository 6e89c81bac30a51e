"""Answering approval requests: the shared desk, and the token-authenticated HTTP API.

``ia approvals approve|reject`` and ``ia api`` both go through
:class:`ApprovalDesk`: the answer is first made in Redis (atomically, so it
cannot race another answer or the expiry), then announced on ``ia.approvals``
where the actuator picks it up and runs (or settles) the action.

HTTP API (``ia api``; JSON in and out)::

    GET  /healthz                          no authentication; {"ok": true}
    GET  /approvals[?all=1]                pending (or all recent) requests
    GET  /approvals/{id}                   one request (approval or decision id)
    POST /approvals/{id}/approve           {"by": "alice", "reason": "…"}  (both optional)
    POST /approvals/{id}/reject            {"by": "alice", "reason": "…"}  (reason required)

Every ``/approvals`` request needs ``Authorization: Bearer <token>``.  Tokens
come from ``IA_API_TOKEN`` or the file ``IA_API_TOKEN_FILE`` (one per line,
``token`` or ``name token``; ``#`` comments), never from code, and are
compared in constant time.  A missing or wrong token gets ``401`` before
anything is read or changed; a server without any token refuses every
request.  The answer is recorded as ``by`` (the body's ``by``, else the
token's name) ``via api:<token name>``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web

from ia.actuators.approvals import ApprovalError, ApprovalStore
from ia.core.errors import ConfigError
from ia.core.settings import KafkaSettings
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


def load_tokens(token: str | None, token_file: Path | None) -> dict[str, str]:
    """``{token: name}`` from the setting and/or the file; short tokens are refused."""
    tokens: dict[str, str] = {}
    if token:
        tokens[token.strip()] = "api"
    if token_file:
        for n, line in enumerate(Path(token_file).read_text().splitlines(), start=1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split()
            if len(parts) > 2:
                raise ConfigError(f"{token_file}:{n}: expected 'token' or 'name token'")
            name, value = (parts[0], parts[1]) if len(parts) == 2 else ("api", parts[0])
            tokens[value] = name
    for value, name in tokens.items():
        if len(value) < MIN_TOKEN_LEN:
            raise ConfigError(f"API token {name!r} is shorter than {MIN_TOKEN_LEN} characters")
    return tokens


def _authenticate(request: web.Request, tokens: dict[str, str]) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, given = header.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return None
    found = None
    given_b = given.strip().encode()
    for value, name in tokens.items():  # compare with every token: no early exit
        if hmac.compare_digest(given_b, value.encode()):
            found = name
    return found


# --------------------------------------------------------------------------- HTTP


def _json(ev: ApprovalEvent) -> dict:
    return ev.model_dump(mode="json")


def build_api(desk: ApprovalDesk, tokens: dict[str, str]) -> web.Application:
    @web.middleware
    async def auth(request: web.Request, handler):
        if request.path == "/healthz":
            return await handler(request)
        name = _authenticate(request, tokens) if tokens else None
        if name is None:
            log.warning("unauthenticated %s %s from %s", request.method, request.path,
                        request.remote)
            return web.json_response({"error": "unauthorized"}, status=401,
                                     headers={"WWW-Authenticate": 'Bearer realm="ia"'})
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
        by, reason = body.get("by"), body.get("reason") or ""
        if not isinstance(by, str | None) or not isinstance(reason, str):
            return web.json_response({"error": "by and reason must be strings"}, status=400)
        if not approve and not reason.strip():
            return web.json_response({"error": "a rejection needs a reason"}, status=400)
        token_name = request[TOKEN_NAME]  # type: ignore[index]
        try:
            ev = await desk.answer(request.match_info["id"], approve,
                                   by=(by or token_name)[:256], via=f"api:{token_name}",
                                   reason=reason[:4096])
        except ApprovalError as exc:
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

    async def make() -> web.Application:
        client = redis_client(settings.redis)
        publish, close = kafka_publisher(settings.kafka, settings.topics.approvals,
                                         settings.wire_format)
        app = build_api(ApprovalDesk(ApprovalStore(client, settings.redis.prefix), publish),
                        tokens)

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
                                      f"{len(tokens)} token(s), broker "
                                      f"{settings.kafka.bootstrap_servers}, redis {redis_at}",
                                      file=sys.stderr, flush=True))
