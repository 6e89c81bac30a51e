"""The actuator process: decisions and approvals in -> actions -> outcomes out.

A batch of decisions is handled concurrently (the executor serialises actions
on the same target), each outcome sent as soon as its action is done; the
batch is acknowledged only after all its outcomes and approval requests are
confirmed by the broker.  A timer does the
periodic work (approval expiry, verification and compensation); a
verification is removed from Redis only after its outcomes are confirmed.
All the logic is in :class:`ia.actuators.service.ActuatorService`.
"""

from __future__ import annotations

import asyncio
import logging

import faust
from pydantic import BaseModel

from ia.actuators.approvals import ApprovalStore
from ia.actuators.authorisation import Authoriser, parse_allow
from ia.actuators.executor import ActionExecutor
from ia.actuators.registry import build_actuators
from ia.actuators.service import ActuatorService
from ia.actuators.verification import Verifier
from ia.core import metrics
from ia.core.errors import ConfigError
from ia.core.redis import client as redis_client
from ia.core.settings import Settings
from ia.core.signing import approval_keys, signing_keys
from ia.decisions.guards import ExecutionGuard
from ia.decisions.policy_source import PolicySource
from ia.schemas.models import ActionOutcome, ApprovalEvent, Decision
from ia.schemas.serde import encode
from ia.streams.app import confirm, decode_events, make_app, raw_topic, with_retry

log = logging.getLogger("ia.actuate")
TICK_S = 0.5


def build_actuator(settings: Settings) -> faust.App:
    app = make_app(settings, settings.actuator.app_id)
    topics = settings.topics
    decisions_t = raw_topic(app, topics.decisions)
    outcomes_t = raw_topic(app, topics.outcomes)
    approvals_t = raw_topic(app, topics.approvals)
    fmt = settings.wire_format
    ctx: dict = {}

    def _connect() -> None:
        settings.require_endpoints()
        client = redis_client(settings.redis)
        policy = PolicySource(settings.policy_file)
        conf = settings.actuator
        notify_url = conf.notify_url.get_secret_value() if conf.notify_url else None
        allow = parse_allow(conf.webhook_allow)
        actuators = build_actuators(
            current_commands=lambda: policy.current().doc.commands,
            simulator_url=settings.simulator_url,
            notify_url=notify_url, retries=conf.webhook_retries,
            timeout_s=conf.action_timeout_s, plugins=conf.plugins)
        notifier = actuators["notify"] if notify_url else None
        executor = ActionExecutor(
            client, actuators, prefix=settings.redis.prefix, timeout_s=conf.action_timeout_s,
            guard=ExecutionGuard(client, settings.redis.prefix, policy.current),
            notifier=notifier, verifier=Verifier(client, settings.redis.prefix))
        metrics.serve(settings.metrics_port, settings.metrics_host, role="actuator")
        keys = signing_keys(settings.signing)
        if keys is None:
            raise ConfigError(
                "no signing key: set IA_SIGNING_KEY_FILE to the workers' key file (`ia up` "
                "makes one); without it no decision can be verified, so none is executed")
        ctx["service"] = ActuatorService(
            executor,
            ApprovalStore(client, settings.redis.prefix, ttl_s=settings.approvals.ttl_s,
                          on_expiry=settings.approvals.on_expiry,
                          keys=approval_keys(settings.approvals, settings.signing),
                          terms=lambda rule: policy.current().approval_terms(rule)),
            keys, max_age_ms=int(settings.signing.max_age_s * 1000), notifier=notifier,
            authoriser=Authoriser(policy.current, allow))

    _connect()

    async def publish(records: list[BaseModel]) -> list:
        futures = []
        for rec in records:
            if isinstance(rec, ActionOutcome):
                metrics.OUTCOMES.labels(rec.action_type, rec.status.value).inc()
                topic = outcomes_t
            elif isinstance(rec, ApprovalEvent):
                metrics.APPROVALS.labels(rec.status.value).inc()
                topic = approvals_t
            else:  # pragma: no cover - the service returns only these
                raise TypeError(type(rec).__name__)
            futures.append(await topic.send(key=rec.entity.encode(), value=encode(rec, fmt)))
        return futures

    async def act_on(decision: Decision) -> list:
        records = await with_retry("actuate", lambda: ctx["service"].on_decision(decision), app)
        return await publish(records)

    @app.agent(decisions_t)
    async def act(stream: faust.StreamT) -> None:
        async for events in stream.take_events(100, within=0.01):
            metrics.EVENTS_IN.labels(topics.decisions).inc(len(events))
            decided = decode_events(events, Decision, fmt, "decision")
            todo = [d for d in decided if d.action is not None]
            if not todo:
                continue
            # Each action's outcome is sent as soon as that action is done (a slow
            # endpoint does not hold back the others'); the batch is acknowledged
            # once every outcome is confirmed.
            sent = await asyncio.gather(*(act_on(d) for d in todo))
            futures = [f for fs in sent for f in fs]
            await confirm(futures)
            metrics.EVENTS_OUT.labels(topics.outcomes).inc(len(futures))

    @app.agent(approvals_t)
    async def settle_approvals(stream: faust.StreamT) -> None:
        async for events in stream.take_events(100, within=0.01):
            metrics.EVENTS_IN.labels(topics.approvals).inc(len(events))
            answered = decode_events(events, ApprovalEvent, fmt, "approval event")
            results = await asyncio.gather(*(
                with_retry("approve", lambda a=a: ctx["service"].on_approval(a), app)
                for a in answered))
            await publish_confirmed([r for rs in results for r in rs])

    async def publish_confirmed(records: list[BaseModel]) -> None:
        await confirm(await publish(records))

    @app.timer(interval=TICK_S)
    async def periodic() -> None:
        try:
            records = await ctx["service"].tick()
        except Exception as exc:  # retried at the next tick; state is in Redis
            log.warning("periodic actuator work failed (%s: %s); retrying", type(exc).__name__,
                        exc)
            return
        # What tick() settled is only in memory now: publish it whatever it takes,
        # then let go of the verifications it concludes.
        await with_retry("publish", lambda: publish_confirmed(records), app)
        await with_retry("verified", lambda: ctx["service"].published(records), app)

    return app
