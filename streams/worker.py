"""The worker: telemetry -> decisions (and dead letters), outcomes and labels -> learning.

Plumbing only: the agents hand records to :class:`ia.decisions.service.WorkerService`,
retry it while Redis is away, and publish what it returns.  Each telemetry batch
is acknowledged only after every record it produced is confirmed by the broker,
so a crash replays the batch (at-least-once) and decision ids stay the same.  A
batch the decision code keeps failing on is decided around its failing records,
which go to the DLQ (:func:`decide_batch`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence

import faust

from ia.core import metrics
from ia.core.redis import client as redis_client
from ia.core.settings import Settings, Topics
from ia.core.signing import feedback_keys, signing_keys
from ia.decisions.checkpoint import RedisModelStore
from ia.decisions.engine import DecisionEngine
from ia.decisions.guards import KillSwitch, RedisGuardStore
from ia.decisions.learning import FeedbackLearner, LabelCap, RedisDecisionMemory
from ia.decisions.policy_source import PolicySource
from ia.decisions.service import Decided, RawRecord, WorkerParts, WorkerService
from ia.decisions.shadow import PIPELINE_ID as SHADOW_PIPELINE
from ia.features.store import RedisFeatureStore
from ia.schemas.models import ActionOutcome, Feedback
from ia.schemas.serde import encode
from ia.streams.app import (
    GaveUp,
    confirm,
    decode_events,
    make_app,
    raw_topic,
    send_batched,
    with_retry,
)

log = logging.getLogger("ia.worker")


def connect_worker(settings: Settings, shadow: bool = False) -> WorkerService:
    """The worker's service on this deployment's Redis.

    ``shadow``: the candidate of ``ia worker --shadow`` (ia/offline/shadow.py): decision
    ids of its own, decisions marked ``shadow``.
    """
    settings.require_endpoints()
    client = redis_client(settings.redis)
    prefix = settings.redis.prefix
    features = RedisFeatureStore(client, prefix)
    engine = DecisionEngine(PolicySource(settings.policy_file).current, features,
                            RedisGuardStore(client, prefix),
                            kill_switch=KillSwitch(client, prefix),
                            pipeline_id=SHADOW_PIPELINE if shadow else "main")
    conf = settings.worker
    learner = FeedbackLearner(RedisDecisionMemory(client, prefix), features,
                              RedisModelStore(client, prefix),
                              LabelCap(conf.feedback_max_per_entity, conf.feedback_window_s))
    keys = signing_keys(settings.signing)
    if keys is None:
        log.error("no signing key (IA_SIGNING_KEY_FILE): decisions are published unsigned "
                  "and every actuator rejects their actions")
    label_keys = feedback_keys(settings.signing)
    if label_keys is None:
        log.error("no feedback key (IA_FEEDBACK_KEY_FILE): no feedback label can be "
                  "verified, so none counts")
    return WorkerService(WorkerParts(engine, features, learner, settings.wire_format, shadow,
                                     conf.max_metrics_per_entity, keys, label_keys))


def output_topics(topics: Topics, shadow: bool) -> tuple[str, str]:
    """Where the worker publishes (decisions, dead letters).  A shadow candidate reads
    the same telemetry as production, so its dead letters would be production's twins:
    they go to a topic of its own, beside its decisions."""
    if shadow:
        return topics.decisions_shadow, topics.dlq_shadow
    return topics.decisions, topics.dlq


async def decide_batch(service: WorkerService, batch: Sequence[RawRecord], app: faust.App,
                       attempts: int) -> Decided:
    """Decide a telemetry batch, waiting out Redis; a batch the decision code fails on
    ``attempts`` times is decided around the records that cause it (they go to the DLQ
    as ``processing_error``), so one poison event cannot stall its partition."""
    try:
        return await with_retry("decide", lambda: service.on_telemetry(batch), app,
                                attempts=attempts)
    except GaveUp as exc:
        log.error("a batch of %d records failed %d times (%s: %s); isolating the records "
                  "that cause it", len(batch), attempts, type(exc.__cause__).__name__,
                  exc.__cause__)
        return await with_retry("decide", lambda: service.isolate(batch), app)


def build_worker(settings: Settings, shadow: bool = False) -> faust.App:
    """``shadow``: decisions go only to the shadow topic (see :func:`connect_worker`)."""
    app = make_app(settings, settings.worker.app_id)
    topics = settings.topics
    telemetry = raw_topic(app, topics.telemetry)
    decisions_name, dlq_name = output_topics(topics, shadow)
    decisions_t = raw_topic(app, decisions_name)
    dlq_t = raw_topic(app, dlq_name)
    outcomes_t = raw_topic(app, topics.outcomes)
    feedback_t = raw_topic(app, topics.feedback)
    fmt = settings.wire_format
    service = connect_worker(settings, shadow)
    metrics.serve(settings.metrics_port, settings.metrics_host, role="worker")

    async def publish(decided: Decided) -> None:
        started = time.perf_counter()
        # Whole record batches per partition, confirmed before the batch is acknowledged;
        # dead letters are JSON whatever the wire format (they carry the undecodable bytes).
        futures = await send_batched(app, dlq_t.get_topic_name(),
                                     [(k, encode(dl, "json")) for k, dl in decided.dead_letters])
        futures += await send_batched(app, decisions_t.get_topic_name(),
                                      [(d.entity.encode(), encode(d, fmt))
                                       for d in decided.decisions])
        await confirm(futures)
        metrics.STAGE_SECONDS.labels("publish").observe(time.perf_counter() - started)
        metrics.EVENTS_OUT.labels(topics.decisions).inc(len(decided.decisions))
        service.on_published(decided)

    @app.agent(telemetry)
    async def decide(stream: faust.StreamT) -> None:
        async for events in stream.take_events(settings.worker.batch_size,
                                               within=settings.worker.batch_within_s):
            metrics.EVENTS_IN.labels(topics.telemetry).inc(len(events))
            metrics.BATCH_SIZE.observe(len(events))
            batch = [RawRecord(ev.message.key, ev.message.value, ev.message.topic,
                               ev.message.partition, ev.message.offset) for ev in events]
            decided = await decide_batch(service, batch, app,
                                         settings.worker.processing_attempts)
            await publish(decided)

    @app.agent(outcomes_t)
    async def learn_from_outcomes(stream: faust.StreamT) -> None:
        async for event in stream.events():
            for outcome in decode_events([event], ActionOutcome, fmt, "outcome"):
                await with_retry("feedback", lambda o=outcome: service.on_outcome(o), app)

    @app.agent(feedback_t)
    async def learn_from_feedback(stream: faust.StreamT) -> None:
        async for event in stream.events():
            for label in decode_events([event], Feedback, fmt, "feedback"):
                await with_retry("feedback", lambda f=label: service.on_feedback(f), app)

    return app
