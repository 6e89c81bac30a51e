"""The worker: telemetry -> decisions (and dead letters), plus the feedback agent.

Agents only move records: decoding, enrichment, scoring and policy live in
``schemas``, ``features`` and ``decisions``.  Each batch is acknowledged only
after every record it produced is confirmed by the broker, so a crash
replays the batch (at-least-once) and decision ids stay the same.
"""

from __future__ import annotations

import logging
import time

import faust
import redis.asyncio as aioredis

from ia.core import metrics
from ia.core.settings import Settings
from ia.decisions.engine import DecisionEngine
from ia.decisions.guards import KillSwitch, RedisGuardStore
from ia.decisions.learning import FeedbackLearner
from ia.decisions.policy_source import PolicySource
from ia.decisions.shadow import PIPELINE_ID as SHADOW_PIPELINE
from ia.decisions.shadow import as_shadow
from ia.features.store import RedisFeatureStore
from ia.schemas.models import ActionOutcome, DeadLetter, Feedback
from ia.schemas.serde import encode
from ia.schemas.validation import validate_record
from ia.streams.app import confirm, decode_events, make_app, raw_topic, send_batched, with_retry

log = logging.getLogger("ia.worker")


def build_worker(settings: Settings, shadow: bool = False) -> faust.App:
    """``shadow``: the candidate of ``ia worker --shadow`` (ia/offline/shadow.py): decision ids of
    its own, decisions marked ``shadow`` and sent only to the shadow topic."""
    app = make_app(settings, settings.worker.app_id)
    topics = settings.topics
    telemetry = raw_topic(app, topics.telemetry)
    decisions_t = raw_topic(app, topics.decisions_shadow if shadow else topics.decisions)
    dlq_t = raw_topic(app, topics.dlq)
    outcomes_t = raw_topic(app, topics.outcomes)
    feedback_t = raw_topic(app, topics.feedback)
    fmt = settings.wire_format
    policy = PolicySource(settings.policy_file)
    ctx: dict = {"shadow": shadow}

    def _connect() -> None:
        _, redis_url = settings.require_endpoints()
        client = aioredis.from_url(redis_url, decode_responses=False)
        ctx["redis"] = client
        ctx["store"] = RedisFeatureStore(client, settings.redis.prefix)
        ctx["engine"] = DecisionEngine(policy.current, ctx["store"],
                                       RedisGuardStore(client, settings.redis.prefix),
                                       kill_switch=KillSwitch(client, settings.redis.prefix),
                                       pipeline_id=SHADOW_PIPELINE if shadow else "main")
        ctx["learner"] = FeedbackLearner(client, ctx["store"], settings.redis.prefix)
        metrics.serve(settings.metrics_port, settings.metrics_host)

    _connect()

    async def publish_batch(events: list) -> None:
        started = time.perf_counter()
        valid, positions, dead = [], [], []
        for ev in events:
            msg = ev.message
            rec = validate_record(msg.value, fmt=fmt, topic=msg.topic, partition=msg.partition,
                                  offset=msg.offset)
            if isinstance(rec, DeadLetter):
                metrics.DLQ_RECORDS.labels(rec.reason).inc()
                dead.append((msg.key, encode(rec, "json")))
            else:
                valid.append(rec)
                positions.append((msg.partition, msg.offset))
        metrics.STAGE_SECONDS.labels("validate").observe(time.perf_counter() - started)
        t1 = time.perf_counter()
        decided = await with_retry("decide", lambda: _decide_batch(ctx, valid, positions),
                                   app) if valid else []
        metrics.STAGE_SECONDS.labels("decide").observe(time.perf_counter() - t1)
        t2 = time.perf_counter()
        # Whole record batches per partition, confirmed before the batch is acknowledged.
        futures = await send_batched(app, dlq_t.get_topic_name(), dead)
        futures += await send_batched(app, decisions_t.get_topic_name(),
                                      [(d.entity.encode(), encode(d, fmt)) for d in decided])
        await confirm(futures)
        now = time.time()
        metrics.STAGE_SECONDS.labels("publish").observe(time.perf_counter() - t2)
        metrics.EVENTS_OUT.labels(topics.decisions).inc(len(decided))
        for d in decided:
            metrics.DECISIONS.labels(d.action.type if d.action else "none", d.mode.value).inc()
            for t in d.rule_trace:
                if t.matched and t.rule.startswith("guard:"):
                    metrics.GUARD_INTERVENTIONS.labels(t.rule[6:]).inc()
            metrics.EVENT_TO_DECISION.observe(max(0.0, now - d.ts / 1000.0))

    @app.agent(telemetry)
    async def decide(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.worker.batch_size,
                                               within=settings.worker.batch_within_s):
            metrics.EVENTS_IN.labels(topics.telemetry).inc(len(events))
            metrics.BATCH_SIZE.observe(len(events))
            await publish_batch(events)

    async def apply_each(stream: faust.StreamT, model_cls: type, what: str, apply) -> None:
        """Apply each record of a feedback topic in turn (undecodable ones are logged)."""
        async for event in stream.events():
            for rec in decode_events([event], model_cls, fmt, what):
                await with_retry("feedback", lambda r=rec: apply(ctx, r), app)

    @app.agent(outcomes_t)
    async def learn_from_outcomes(stream: faust.StreamT) -> None:
        await apply_each(stream, ActionOutcome, "outcome", _apply_outcome)

    @app.agent(feedback_t)
    async def learn_from_feedback(stream: faust.StreamT) -> None:
        await apply_each(stream, Feedback, "feedback", _apply_feedback)

    app.ia_decide_agent = decide  # type: ignore[attr-defined]  # for test_context()
    return app


async def _decide_batch(ctx: dict, valid: list, positions: list) -> list:
    # Decide with the newest feedback model; keep what later labels will need.
    await ctx["learner"].refresh(ctx["engine"])
    decided = await ctx["engine"].process(valid, positions)
    await ctx["learner"].remember(decided)
    return [as_shadow(d) for d in decided] if ctx.get("shadow") else decided


async def _apply_outcome(ctx: dict, outcome: ActionOutcome) -> None:
    store: RedisFeatureStore = ctx["store"]
    await store.record_action(outcome.entity, outcome.action_type, outcome.status.value,
                              outcome.finished_at)
    if outcome.status.value in ("failed", "timeout"):
        await store.incr_context(outcome.entity, "failed")
        # An action that could not be carried out was not useful.
        await ctx["learner"].learn(outcome.decision_id, False)
    metrics.FEEDBACK.labels("outcome").inc()


async def _apply_feedback(ctx: dict, fb: Feedback) -> None:
    store: RedisFeatureStore = ctx["store"]
    entity = fb.entity
    if not entity:
        raw = await ctx["redis"].get(f"{store.prefix}:dec:{fb.decision_id}")
        entity = raw.decode() if raw else await ctx["learner"].entity_of(fb.decision_id)
    if not entity:
        log.warning("feedback for unknown decision %s ignored", fb.decision_id)
        metrics.FEEDBACK.labels("unmatched").inc()
        return
    # Idempotent: one label per decision counts once, whatever redelivery does.
    first = await ctx["redis"].set(f"{store.prefix}:fb:{fb.decision_id}", fb.label.value,
                                   nx=True, ex=30 * 24 * 3600)
    if not first:
        return
    good = fb.label.value in ("true_positive", "useful")
    await store.incr_context(entity, "tp" if good else "fp")
    await ctx["learner"].learn(fb.decision_id, good)
    metrics.FEEDBACK.labels(fb.label.value).inc()


