"""The actuator process: decisions -> actions -> outcomes.

A batch of decisions is handled concurrently (the executor serialises actions
on the same target); the batch is acknowledged only after all its outcomes
are confirmed by the broker.
"""

from __future__ import annotations

import asyncio
import logging

import faust
import redis.asyncio as aioredis

from actuators.executor import ActionExecutor
from actuators.registry import build_actuators
from decisions.policy import Policy
from decisions.policy_source import PolicySource
from ia import metrics
from ia.settings import Settings
from schemas.models import Decision
from schemas.serde import DecodeError, decode, encode
from streams.app import confirm, make_app, raw_topic, with_retry

log = logging.getLogger("ia.actuate")


def build_actuator(settings: Settings) -> faust.App:
    app = make_app(settings, settings.actuator_app_id)
    topics = settings.topics
    decisions_t = raw_topic(app, topics.decisions)
    outcomes_t = raw_topic(app, topics.outcomes)
    fmt = settings.wire_format
    ctx: dict = {}

    def _connect() -> None:
        _, redis_url = settings.require_endpoints()
        client = aioredis.from_url(redis_url, decode_responses=False)
        policy: Policy = PolicySource(settings.policy_file).current()
        ctx["redis"] = client
        ctx["executor"] = ActionExecutor(
            client,
            build_actuators(commands=policy.doc.commands, simulator_url=settings.simulator_url,
                            retries=settings.webhook_retries, timeout_s=settings.action_timeout_s),
            prefix=settings.redis_prefix, timeout_s=settings.action_timeout_s)
        metrics.serve(settings.metrics_port)

    _connect()

    async def handle(d: Decision) -> bytes | None:
        outcome = await ctx["executor"].handle(d)
        if outcome is None:
            return None
        # Lets feedback that names only a decision id find its entity.
        await ctx["redis"].set(f"{settings.redis_prefix}:dec:{d.decision_id}", d.entity,
                               ex=30 * 24 * 3600)
        metrics.OUTCOMES.labels(outcome.action_type, outcome.status.value).inc()
        return encode(outcome, fmt)

    @app.agent(decisions_t)
    async def act(stream: faust.StreamT) -> None:
        async for events in stream.take_events(100, within=0.01):
            metrics.EVENTS_IN.labels(topics.decisions).inc(len(events))
            decided = []
            for ev in events:
                try:
                    decided.append(decode(ev.message.value, Decision, fmt))
                except DecodeError as exc:
                    log.error("undecodable decision at %s[%d]@%d: %s", ev.message.topic,
                              ev.message.partition, ev.message.offset, exc)
            todo = [d for d in decided if d.action is not None]
            if not todo:
                continue
            results = await asyncio.gather(
                *(with_retry("actuate", lambda d=d: handle(d), app) for d in todo))
            futures = [await outcomes_t.send(key=d.entity.encode(), value=r)
                       for d, r in zip(todo, results, strict=True) if r is not None]
            await confirm(futures)
            metrics.EVENTS_OUT.labels(topics.outcomes).inc(len(futures))

    return app
