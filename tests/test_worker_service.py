"""WorkerService, the worker process minus Kafka: plain objects on memory stores.

Telemetry batches with valid and invalid records, outcomes and labels flowing
back, idempotency under redelivery, the trust counters, and the per-decision
metrics.  The decision memory is also run against Redis, the store the worker
process uses.
"""

from __future__ import annotations

import base64
import json
import random
import uuid
from dataclasses import replace

import pytest
import redis.exceptions

from ia.core import metrics
from ia.core.clock import now_ms
from ia.core.redis import client as redis_client
from ia.core.settings import RedisSettings
from ia.core.signing import FEEDBACK_FIELDS
from ia.decisions.checkpoint import MemoryModelStore
from ia.decisions.detector import AdaptiveDetector, DetectorConfig
from ia.decisions.engine import DecisionEngine
from ia.decisions.feedback import action_trust, entity_trust, laplace_precision
from ia.decisions.guards import MemoryGuardStore
from ia.decisions.learning import (
    MODEL_NAME,
    FeedbackLearner,
    LabelCap,
    LabelResult,
    MemoryDecisionMemory,
    RedisDecisionMemory,
    Remembered,
    Step,
)
from ia.decisions.policy import Policy
from ia.decisions.service import Decided, RawRecord, WorkerParts, WorkerService
from ia.features.store import MemoryFeatureStore
from ia.schemas.models import (
    Action,
    ActionOutcome,
    DeadLetter,
    Decision,
    Feedback,
    FeedbackLabel,
    Mode,
    ModelInfo,
    OutcomeStatus,
    RuleTrace,
    TelemetryEvent,
)
from ia.schemas.serde import encode
from tests.support import TEST_FEEDBACK_KEYS, TEST_KEYS, signed_label

STEP_MS = 10_000
# A 100-sample baseline starts this many steps ago, so its spike is 400 s old: young
# enough to act (max_event_age_s), old enough for later samples not to be in the future.
BASELINE_START_STEPS = 140
POLICY = """\
version: 1
rules:
  - name: restart
    match: {metric: latency}
    when: {min_score: 0.8, direction: up}
    action: {type: webhook, target: "{entity}"}
"""
TOPIC = "t.telemetry"
LABEL_CAP = 1000  # not what these tests are about


class Worker:
    """A service on memory stores, with its parts at hand for the assertions."""

    def __init__(self, shadow: bool = False, max_metrics_per_entity: int | None = None,
                 features: MemoryFeatureStore | None = None) -> None:
        policy = Policy.from_text(POLICY)
        self.features = features or MemoryFeatureStore()
        self.models = MemoryModelStore()
        # One score per spike: the detector's alert suppression is tested elsewhere.
        engine = DecisionEngine(lambda: policy, self.features, MemoryGuardStore(),
                                detector=PoisonableDetector(DetectorConfig(suppress_samples=0)))
        learner = FeedbackLearner(MemoryDecisionMemory(), self.features, self.models,
                                  LabelCap(max=LABEL_CAP, window_s=3600))
        self.service = WorkerService(WorkerParts(engine, self.features, learner, "json", shadow,
                                                 max_metrics_per_entity,
                                                 feedback_keys=TEST_FEEDBACK_KEYS))
        self._offset = 0

    def records(self, events: list[TelemetryEvent | bytes | None]) -> list[RawRecord]:
        """Raw records at the next offsets of partition 0 (bytes and None as they are),
        events keyed by their entity as producers must."""
        out = []
        for ev in events:
            value = encode(ev, "json") if isinstance(ev, TelemetryEvent) else ev
            key = ev.entity.encode() if isinstance(ev, TelemetryEvent) else b"k"
            out.append(RawRecord(key, value, TOPIC, 0, self._offset))
            self._offset += 1
        return out

    async def decide(self, events: list[TelemetryEvent | bytes | None]) -> Decided:
        return await self.service.on_telemetry(self.records(events))

    async def context(self, entity: str) -> dict[str, str]:
        return (await self.features.load([entity]))[entity].context

    async def model_version(self) -> int:
        return await self.models.version(MODEL_NAME)


POISON = 666.0


class PoisonableDetector(AdaptiveDetector):
    """The real detector, except that it raises for one value: a valid event that the
    decision code cannot handle (a bug that only some input reaches)."""

    def score(self, st, value, ts):  # type: ignore[no-untyped-def]
        if value == POISON:
            raise ZeroDivisionError("the poison value")
        return super().score(st, value, ts)


class UnavailableFeatureStore(MemoryFeatureStore):
    """A feature store whose Redis is away: every load fails as redis-py reports it."""

    async def load(self, entities):  # type: ignore[no-untyped-def]
        raise redis.exceptions.ConnectionError("Connection refused")


def normal(entity: str, n: int, start: int, seed: int = 1) -> list[TelemetryEvent]:
    rng = random.Random(seed)
    return [TelemetryEvent(entity=entity, metric="latency", value=100.0 + rng.gauss(0, 2.0),
                           ts=start + i * STEP_MS) for i in range(n)]


async def spike_decision(worker: Worker, entity: str = "svc-a") -> Decision:
    """A learnt baseline, then a spike the policy acts on."""
    start = now_ms() - BASELINE_START_STEPS * STEP_MS
    await worker.decide(normal(entity, 100, start))
    spike = TelemetryEvent(entity=entity, metric="latency", value=400.0,
                           ts=start + 100 * STEP_MS)
    (d,) = (await worker.decide([spike])).decisions
    assert d.action is not None and d.mode is Mode.auto, d.rule_trace
    return d


def label(d: Decision | str, kind: FeedbackLabel, entity: str | None = None, *,
          sign: bool = True) -> Feedback:
    """A label as ``ia feedback`` makes it (signed with the feedback key, unless not)."""
    decision_id = d if isinstance(d, str) else d.decision_id
    fb = Feedback(decision_id=decision_id, label=kind, by="oncall", at=1, entity=entity)
    if not sign:
        return fb
    return Feedback.model_validate(signed_label(fb.model_dump(mode="json")))


def outcome(d: Decision, status: OutcomeStatus) -> ActionOutcome:
    assert d.action is not None
    return ActionOutcome(decision_id=d.decision_id, entity=d.entity, action_type=d.action.type,
                         target=d.action.target, status=status, actuator="webhook",
                         started_at=d.decided_at, finished_at=d.decided_at + 5,
                         duration_ms=5)


# --- telemetry ------------------------------------------------------------------------------


async def test_invalid_records_become_dead_letters_and_the_rest_is_decided_in_order() -> None:
    worker = Worker()
    good = normal("svc-a", 3, now_ms() - 10 * STEP_MS)
    schema_bad = json.dumps({"entity": "svc-a", "metric": "latency", "ts": -1}).encode()
    batch = worker.records([good[0], b"{not json", good[1], b"\xff\xfe", schema_bad, None,
                            good[2]])
    decided = await worker.service.on_telemetry(batch)

    assert [d.event_id for d in decided.decisions] == [ev.event_id for ev in good]
    assert all(d.action is None and d.mode is Mode.none for d in decided.decisions)
    reasons = {dl.source_offset: dl.reason for _, dl in decided.dead_letters}
    assert reasons == {1: "invalid_json", 3: "invalid_utf8", 4: "schema_validation",
                       5: "empty_record"}
    assert all(key == b"k" and dl.source_topic == TOPIC and dl.error
               for key, dl in decided.dead_letters)


async def test_a_poison_event_goes_to_the_dlq_and_the_rest_of_its_batch_is_decided() -> None:
    worker = Worker()
    good = normal("svc-a", 6, now_ms() - 10 * STEP_MS)
    poison = good[3].model_copy(update={"value": POISON, "event_id": "poison"})
    batch = worker.records([*good[:3], poison, *good[3:]])
    with pytest.raises(ZeroDivisionError):
        await worker.service.on_telemetry(batch)

    decided = await worker.service.isolate(batch)
    assert [d.event_id for d in decided.decisions] == [ev.event_id for ev in good]
    ((key, dead),) = decided.dead_letters
    assert (key, dead.reason, dead.source_offset) == (b"svc-a", "processing_error", 3)
    assert dead.error.startswith("ZeroDivisionError: the poison value")
    assert "test_worker_service.py" in dead.error and " in score" in dead.error  # the stack
    assert json.loads(base64.b64decode(dead.original_b64))["event_id"] == "poison"
    # Isolated, the good events got the decisions the batch would have given them.
    fresh = Worker()
    again = await fresh.service.on_telemetry(fresh.records(good))
    assert [d.model_dump(exclude={"decided_at"}) for d in again.decisions] == \
        [d.model_dump(exclude={"decided_at"}) for d in decided.decisions]


async def test_isolating_a_batch_while_redis_is_away_raises_and_sends_nothing_to_the_dlq(
) -> None:
    worker = Worker(features=UnavailableFeatureStore())
    batch = worker.records(normal("svc-a", 4, now_ms() - 10 * STEP_MS))
    with pytest.raises(redis.exceptions.ConnectionError):
        await worker.service.isolate(batch)


async def test_a_record_keyed_by_another_entity_goes_to_the_dlq() -> None:
    worker = Worker()
    good, other, unkeyed = normal("svc-a", 3, now_ms() - 10 * STEP_MS)
    batch = worker.records([good, other, unkeyed])
    batch[1] = RawRecord(b"svc-b", *(getattr(batch[1], f) for f in
                                     ("value", "topic", "partition", "offset")))
    batch[2] = RawRecord(None, *(getattr(batch[2], f) for f in
                                 ("value", "topic", "partition", "offset")))
    decided = await worker.service.on_telemetry(batch)
    assert [d.event_id for d in decided.decisions] == [good.event_id]
    reasons = {dl.source_offset: (key, dl.reason) for key, dl in decided.dead_letters}
    assert reasons == {1: (b"svc-b", "key_mismatch"), 2: (None, "key_mismatch")}
    errors = [dl.error for _, dl in decided.dead_letters]
    assert "svc-b" in errors[0] and "svc-a" in errors[0] and "no key" in errors[1]


async def test_new_metrics_beyond_the_cap_of_an_entity_go_to_the_dlq() -> None:
    worker = Worker(max_metrics_per_entity=2)
    ts = now_ms() - 10 * STEP_MS

    def sample(entity: str, metric: str, i: int) -> TelemetryEvent:
        return TelemetryEvent(entity=entity, metric=metric, value=1.0, ts=ts + i)

    first = [sample("svc-a", "m1", 0), sample("svc-a", "m2", 1), sample("svc-a", "m3", 2),
             sample("svc-b", "m3", 3)]
    decided = await worker.decide(first)
    assert [(d.entity, d.metric) for d in decided.decisions] == \
        [("svc-a", "m1"), ("svc-a", "m2"), ("svc-b", "m3")]
    ((key, dead),) = decided.dead_letters
    assert (key, dead.reason, dead.source_offset) == (b"svc-a", "too_many_metrics", 2)
    assert "m3" in dead.error and "2" in dead.error
    # Known metrics keep flowing; a new one is refused in later batches too (the cap
    # is counted on the stored state); a deploy event is no metric and always passes.
    deploy = TelemetryEvent(entity="svc-a", metric="deploy", value=1.0, ts=ts + 6,
                            kind="event")
    later = await worker.decide([sample("svc-a", "m2", 4), sample("svc-a", "m4", 5), deploy])
    assert [d.metric for d in later.decisions] == ["m2", "deploy"]
    assert [dl.reason for _, dl in later.dead_letters] == ["too_many_metrics"]


async def test_a_redelivered_batch_gets_its_original_decisions_back() -> None:
    worker = Worker()
    d = await spike_decision(worker)
    spike = TelemetryEvent.model_validate({k: getattr(d, k) for k in ("entity", "metric",
                                                                       "value", "ts")})
    (again,) = (await worker.decide([spike])).decisions
    assert again == d


async def test_a_shadow_worker_marks_its_action_decisions() -> None:
    d = await spike_decision(Worker(), "svc-s")
    shadow = Worker(shadow=True)
    start = now_ms() - BASELINE_START_STEPS * STEP_MS
    await shadow.decide(normal("svc-s", 100, start))
    spike = TelemetryEvent(entity="svc-s", metric="latency", value=400.0,
                           ts=start + 100 * STEP_MS)
    (s,) = (await shadow.decide([spike])).decisions
    assert s.mode is Mode.shadow and s.action == d.action
    assert s.decision_id != d.decision_id  # its own pipeline id


# --- outcomes and labels --------------------------------------------------------------------


async def test_a_label_by_decision_id_alone_counts_and_teaches_once() -> None:
    worker = Worker()
    d = await spike_decision(worker)
    fp = label(d, FeedbackLabel.false_positive)
    assert await worker.service.on_feedback(fp) is LabelResult.counted
    assert await worker.service.on_feedback(fp) is LabelResult.duplicate
    # A second, different label for the same decision is a duplicate too.
    assert await worker.service.on_feedback(label(d, FeedbackLabel.useful)) \
        is LabelResult.duplicate
    ctx = await worker.context("svc-a")
    assert (ctx["fp"], ctx["fp:webhook"]) == ("1", "1")
    assert "tp" not in ctx and "tp:webhook" not in ctx
    assert await worker.model_version() == 1


def _refused(reason: str) -> float:
    return metrics.FEEDBACK_REFUSED.labels(reason)._value.get()


async def test_a_label_for_an_unknown_decision_is_refused() -> None:
    worker = Worker()
    before = _refused("unmatched")
    unknown = label("dc-unknown", FeedbackLabel.false_positive)
    assert await worker.service.on_feedback(unknown) is LabelResult.unmatched
    # Naming an entity does not make a decision up: nothing counts against it.
    named = label("dc-unknown", FeedbackLabel.false_positive, entity="svc-x")
    assert await worker.service.on_feedback(named) is LabelResult.unmatched
    assert await worker.context("svc-x") == {}
    assert await worker.model_version() == 0
    assert _refused("unmatched") == before + 2


async def test_a_label_naming_another_entity_is_refused() -> None:
    worker = Worker()
    d = await spike_decision(worker)
    before = _refused("wrong_entity")
    wrong = label(d, FeedbackLabel.false_positive, entity="svc-other")
    assert await worker.service.on_feedback(wrong) is LabelResult.wrong_entity
    assert await worker.context("svc-other") == {} and await worker.context("svc-a") == {}
    assert _refused("wrong_entity") == before + 1
    # it did not use up the decision: the right label still counts
    right = label(d, FeedbackLabel.false_positive, entity="svc-a")
    assert await worker.service.on_feedback(right) is LabelResult.counted


async def test_an_unsigned_or_forged_label_is_refused() -> None:
    worker = Worker()
    d = await spike_decision(worker)
    before = _refused("unauthenticated")
    unsigned = label(d, FeedbackLabel.false_positive, sign=False)
    forged = unsigned.model_copy(update={
        "signature": TEST_KEYS.sign(unsigned.model_dump(mode="json"), FEEDBACK_FIELDS)})
    altered = label(d, FeedbackLabel.true_positive).model_copy(
        update={"label": FeedbackLabel.false_positive})
    for fb in (unsigned, forged, altered):
        assert await worker.service.on_feedback(fb) is LabelResult.unauthenticated
    assert await worker.context("svc-a") == {} and await worker.model_version() == 0
    assert _refused("unauthenticated") == before + 3
    # a worker without a feedback key counts nothing
    worker.service.parts = replace(worker.service.parts, feedback_keys=None)
    assert await worker.service.on_feedback(label(d, FeedbackLabel.false_positive)) \
        is LabelResult.unauthenticated


async def test_labels_are_capped_per_entity_and_window() -> None:
    memory = MemoryDecisionMemory()
    features = MemoryFeatureStore()
    learner = FeedbackLearner(memory, features, MemoryModelStore(), LabelCap(2, window_s=60))
    await memory.remember([(f"dc-{i}", Remembered("svc-a", "webhook", {"x": 1.0}))
                           for i in range(5)] + [("dc-b", Remembered("svc-b", "webhook", {}))])
    t = 1_000_000

    async def give(i: int | str, at: int) -> LabelResult:
        return await learner.on_label(label(f"dc-{i}", FeedbackLabel.false_positive), now_ms=at)

    assert [await give(i, t) for i in (0, 0, 1, 2)] == [
        LabelResult.counted, LabelResult.duplicate, LabelResult.counted, LabelResult.over_cap]
    assert await give("b", t) is LabelResult.counted  # another entity has its own cap
    assert (await features.load(["svc-a"]))["svc-a"].context["fp"] == "2"
    assert await give(2, t + 60_000) is LabelResult.counted  # the next window


async def test_a_failed_action_teaches_once_and_a_later_label_still_counts() -> None:
    worker = Worker()
    d = await spike_decision(worker)
    failed = outcome(d, OutcomeStatus.failed)
    await worker.service.on_outcome(failed)
    await worker.service.on_outcome(failed)  # redelivered
    ctx = await worker.context("svc-a")
    assert ctx["fp:webhook"] == "1" and "fp" not in ctx
    assert ctx["last_action"] == f"webhook:failed:{failed.finished_at}"
    assert await worker.model_version() == 1
    # The decision has taught already; the label still counts against the entity.
    assert await worker.service.on_feedback(label(d, FeedbackLabel.false_positive)) \
        is LabelResult.counted
    ctx = await worker.context("svc-a")
    assert (ctx["fp"], ctx["fp:webhook"]) == ("1", "1")
    assert await worker.model_version() == 1


async def test_a_successful_action_is_recorded_but_is_no_label() -> None:
    worker = Worker()
    d = await spike_decision(worker)
    done = outcome(d, OutcomeStatus.succeeded)
    await worker.service.on_outcome(done)
    assert await worker.context("svc-a") == {"last_action":
                                             f"webhook:succeeded:{done.finished_at}"}
    assert await worker.model_version() == 0
    # The decision has not taught: a label still does.
    await worker.service.on_feedback(label(d, FeedbackLabel.true_positive))
    assert (await worker.context("svc-a"))["tp:webhook"] == "1"
    assert await worker.model_version() == 1


# --- trust ----------------------------------------------------------------------------------


def test_one_laplace_precision_for_the_entity_and_the_action() -> None:
    assert laplace_precision(0.0, 0.0) == 1.0
    assert laplace_precision(0.0, 3.0) == 0.25
    assert laplace_precision(3.0, 3.0) == pytest.approx(4 / 7)
    assert entity_trust({"false_positives": 3.0}) == 0.25
    assert entity_trust({"true_positives": 1.0, "false_positives": 1.0}) == pytest.approx(2 / 3)
    context = {"fp": "9", "fp:webhook": "3", "tp:notify": "2"}
    assert action_trust(context, "webhook") == 0.25
    assert action_trust(context, "notify") == 1.0


async def test_false_positive_labels_lower_the_next_decisions_confidence() -> None:
    worker = Worker()
    d = await spike_decision(worker)
    assert d.explanation is not None and d.explanation.p_useful == 0.5
    await worker.service.on_feedback(label(d, FeedbackLabel.false_positive))
    start = d.ts + STEP_MS
    await worker.decide(normal("svc-a", 30, start, seed=2))
    spike = TelemetryEvent(entity="svc-a", metric="latency", value=400.0,
                           ts=start + 30 * STEP_MS)
    (after,) = (await worker.decide([spike])).decisions
    assert after.anomaly_score >= d.anomaly_score - 1e-6
    # Entity-wide and per-action trust are each 1/2, and the refreshed classifier
    # (version 1) doubts this kind of action as well.
    assert after.explanation is not None and after.explanation.p_useful < 0.5
    assert {m.id: m.version for m in after.explanation.models}["feedback-logreg"] == "1.1"
    assert after.confidence < d.confidence / 4


# --- metrics --------------------------------------------------------------------------------


def _sample(name: str, **labels: str) -> float:
    return metrics.registry_of("worker").get_sample_value(name, labels) or 0.0


async def test_published_batches_are_counted_per_decision_and_guard() -> None:
    worker = Worker()
    ts = now_ms()
    guarded = Decision(
        decision_id="dc-g", correlation_id="c", event_id="e", entity="svc-m", metric="latency",
        value=1.0, ts=ts, decided_at=ts, anomaly_score=0.9, confidence=0.9,
        model=ModelInfo(id="m", version="1"), action=Action(type="webhook", target="svc-m"),
        mode=Mode.notify,
        rule_trace=[RuleTrace(rule="restart", matched=True, reason="score"),
                    RuleTrace(rule="guard:rate_limit", matched=True, reason="full"),
                    RuleTrace(rule="guard:cooldown", matched=False, reason="free")])
    dead = DeadLetter(reason="invalid_json", error="x", source_topic=TOPIC, source_partition=0,
                      source_offset=0, failed_at=ts, original_b64="")
    before = (_sample("ia_decisions_total", action="webhook", mode="notify"),
              _sample("ia_guard_interventions_total", guard="rate_limit"),
              _sample("ia_guard_interventions_total", guard="cooldown"),
              _sample("ia_dlq_records_total", reason="invalid_json"),
              _sample("ia_event_time_lag_seconds_count"))
    worker.service.on_published(Decided([guarded], [(None, dead)]))
    after = (_sample("ia_decisions_total", action="webhook", mode="notify"),
             _sample("ia_guard_interventions_total", guard="rate_limit"),
             _sample("ia_guard_interventions_total", guard="cooldown"),
             _sample("ia_dlq_records_total", reason="invalid_json"),
             _sample("ia_event_time_lag_seconds_count"))
    assert [a - b for a, b in zip(after, before, strict=True)] == [1, 1, 0, 1, 1]


# --- the decision memory, in memory and in Redis --------------------------------------------


@pytest.fixture(params=["memory", pytest.param("redis", marks=pytest.mark.integration)])
def redis_settings(request: pytest.FixtureRequest) -> RedisSettings | None:
    """None for the memory implementation, else the embedded Redis (one per session)."""
    return request.getfixturevalue("infra").redis if request.param == "redis" else None


async def test_decision_memory_recalls_and_records_each_step_once(
        redis_settings: RedisSettings | None) -> None:
    if redis_settings is None:
        await _recalls_and_records_each_step_once(MemoryDecisionMemory())
        return
    client = redis_client(redis_settings)
    try:
        await _recalls_and_records_each_step_once(
            RedisDecisionMemory(client, f"t{uuid.uuid4().hex[:8]}"))
    finally:
        await client.aclose()


async def _recalls_and_records_each_step_once(memory) -> None:  # type: ignore[no-untyped-def]
    r = Remembered(entity="svc-a", action="webhook", x={"score": 0.9, "action=webhook": 1.0})
    await memory.remember([("dc-1", r)])
    assert await memory.recall("dc-1") == r
    assert await memory.recall("dc-2") is None
    assert await memory.first("dc-1", Step.label, "false_positive")
    assert not await memory.first("dc-1", Step.label, "useful")
    assert await memory.first("dc-1", Step.taught, "1")
    assert not await memory.first("dc-1", Step.taught, "1")
    # Steps of a decision that is not remembered are kept all the same.
    assert await memory.first("dc-2", Step.label, "useful")
    assert not await memory.first("dc-2", Step.label, "useful")


async def test_an_outcome_for_no_remembered_decision_or_another_entity_is_refused() -> None:
    """Anyone who can write ``ia.outcomes`` could otherwise give any entity an action
    history and failures (features ``seconds_since_action``, ``actions_failed``, the
    feedback model): only outcomes of this pipeline's own action decisions count."""
    from ia.core import metrics

    def refused(reason: str) -> float:
        return metrics.OUTCOMES_REFUSED.labels(reason)._value.get()

    worker = Worker()
    d = await spike_decision(worker)
    before = {r: refused(r) for r in ("unmatched", "wrong_entity")}
    invented = outcome(d, OutcomeStatus.failed).model_copy(
        update={"decision_id": "dc-nobody-decided-this", "entity": "svc-victim"})
    elsewhere = outcome(d, OutcomeStatus.failed).model_copy(update={"entity": "svc-victim"})
    await worker.service.on_outcome(invented)
    await worker.service.on_outcome(elsewhere)
    assert await worker.context("svc-victim") == {}
    assert await worker.context("svc-a") == {}
    assert await worker.model_version() == 0
    assert {r: refused(r) - before[r] for r in before} == {"unmatched": 1, "wrong_entity": 1}
    await worker.service.on_outcome(outcome(d, OutcomeStatus.failed))  # the genuine one
    assert (await worker.context("svc-a"))["fp:webhook"] == "1"


async def test_a_shadow_worker_records_productions_outcomes() -> None:
    shadow = Worker(shadow=True)
    d = await spike_decision(Worker())  # production's decision, which the shadow never made
    done = outcome(d, OutcomeStatus.succeeded)
    await shadow.service.on_outcome(done)
    assert await shadow.context("svc-a") == {"last_action":
                                             f"webhook:succeeded:{done.finished_at}"}
