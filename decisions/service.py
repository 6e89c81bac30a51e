"""What the worker process does, minus Kafka.

``ia.streams.worker`` moves records between the topics and this service:

* :meth:`WorkerService.on_telemetry` validates a batch of raw telemetry records
  (the ones that fail, are keyed by another entity or bring one metric too many
  become dead letters with their reason), decides the rest with the newest
  feedback model, and remembers what later labels need;
* :meth:`WorkerService.isolate` decides a batch that ``on_telemetry`` keeps
  failing on around the records that cause it, which become dead letters;
* :meth:`WorkerService.on_published` counts what the batch published, once
  the broker has confirmed it;
* :meth:`WorkerService.on_outcome` and :meth:`WorkerService.on_feedback` apply
  the action outcomes and labels that flow back (:mod:`ia.decisions.learning`).

Every step is safe to call again with the same input after a failure (the
plumbing retries until Redis is back): a redelivered event gets its original
decision back and a label teaches once.  The same service runs on memory
stores in tests.
"""

from __future__ import annotations

import logging
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ia.core import metrics
from ia.core.clock import now_ms
from ia.core.redis import UNAVAILABLE
from ia.core.signing import FEEDBACK_FIELDS, KeyRing
from ia.decisions.engine import DecisionEngine
from ia.decisions.learning import REFUSED, FeedbackLearner, LabelResult
from ia.decisions.shadow import as_shadow
from ia.features.store import EntityRecord, FeatureStore
from ia.schemas.models import (
    ActionOutcome,
    DeadLetter,
    Decision,
    EventKind,
    Feedback,
    OutcomeStatus,
    TelemetryEvent,
)
from ia.schemas.validation import dead_letter, key_mismatch, validate_record

log = logging.getLogger("ia.worker")
# Outcomes of actions that could not be carried out: a negative label.  Success of
# execution says nothing about usefulness and is not a label.
FAILED = frozenset({OutcomeStatus.failed, OutcomeStatus.timeout})
# Innermost frames of a processing error kept in its dead letter: where it was raised.
STACK_FRAMES = 6


@dataclass(frozen=True)
class RawRecord:
    """One telemetry record as it came off the topic."""

    key: bytes | None
    value: bytes | None
    topic: str
    partition: int
    offset: int


@dataclass
class Decided:
    """What one telemetry batch produced: a decision per valid record, in order, and a
    dead letter (with the record's key) per invalid one."""

    decisions: list[Decision] = field(default_factory=list)
    dead_letters: list[tuple[bytes | None, DeadLetter]] = field(default_factory=list)

    def __add__(self, later: Decided) -> Decided:
        return Decided(self.decisions + later.decisions, self.dead_letters + later.dead_letters)


@dataclass(frozen=True)
class WorkerParts:
    """What the worker decides and learns with (Redis-backed in the worker process)."""

    engine: DecisionEngine
    features: FeatureStore
    learner: FeedbackLearner
    wire_format: str = "json"
    # The candidate of ``ia worker --shadow``: decisions marked so nothing acts on them.
    shadow: bool = False
    # Metrics one entity may have (None: any number); every batch loads all of them.
    max_metrics_per_entity: int | None = None
    # Signs every decision with an action (None: unsigned, so no actuator executes them).
    keys: KeyRing | None = None
    # Verifies feedback labels (None: no label is authenticated, so none counts).
    feedback_keys: KeyRing | None = None


Accepted = list[tuple[RawRecord, TelemetryEvent]]
DeadLetters = list[tuple[bytes | None, DeadLetter]]


class WorkerService:
    def __init__(self, parts: WorkerParts) -> None:
        self.parts = parts

    async def on_telemetry(self, batch: Sequence[RawRecord]) -> Decided:
        """A decision per acceptable record, a dead letter per other one.

        Raises whatever deciding raises: the caller retries (Redis away) or, when the
        decision code itself keeps failing, hands the batch to :meth:`isolate`.
        """
        started = time.perf_counter()
        accepted, dead = self._validate(batch)
        decide_started = time.perf_counter()
        metrics.STAGE_SECONDS.labels("validate").observe(decide_started - started)
        decisions = await self._decide(accepted, dead) if accepted else []
        metrics.STAGE_SECONDS.labels("decide").observe(time.perf_counter() - decide_started)
        return Decided(decisions, dead)

    async def isolate(self, batch: Sequence[RawRecord]) -> Decided:
        """Decide ``batch`` around the records the decision code fails on.

        A failing batch is halved until each failing record stands alone; that record
        becomes a ``processing_error`` dead letter, every other one gets the decision
        it would have got (an entity's events stay in order, and batch boundaries do
        not change decisions).  Halves already decided are saved, so a retry after an
        error of Redis (:data:`~ia.core.redis.UNAVAILABLE`, raised: the records are not
        at fault) gives them their decisions back.
        """
        try:
            return await self.on_telemetry(batch)
        except UNAVAILABLE:
            raise
        except Exception as exc:
            if len(batch) == 1:
                return Decided([], [(batch[0].key, self._processing_error(batch[0], exc))])
        half = len(batch) // 2
        return await self.isolate(batch[:half]) + await self.isolate(batch[half:])

    def _validate(self, batch: Sequence[RawRecord]) -> tuple[Accepted, DeadLetters]:
        accepted: Accepted = []
        dead: DeadLetters = []
        for rec in batch:
            checked = validate_record(rec.value, fmt=self.parts.wire_format, topic=rec.topic,
                                      partition=rec.partition, offset=rec.offset)
            if isinstance(checked, TelemetryEvent):
                wrong_key = key_mismatch(rec.key, checked)
                if wrong_key is None:
                    accepted.append((rec, checked))
                    continue
                checked = self._dead(rec, "key_mismatch", wrong_key)
            dead.append((rec.key, checked))
        return accepted, dead

    async def _decide(self, accepted: Accepted, dead: DeadLetters) -> list[Decision]:
        learner, engine = self.parts.learner, self.parts.engine
        await learner.refresh(engine)
        records = await engine.store.load(ev.entity for _, ev in accepted)
        accepted = self._within_metric_cap(accepted, records, dead)
        decided = await engine.process([ev for _, ev in accepted],
                                       [(rec.partition, rec.offset) for rec, _ in accepted],
                                       records)
        await learner.remember(decided)
        if self.parts.shadow:
            decided = [as_shadow(d) for d in decided]
        return [self._signed(d) for d in decided]

    def _signed(self, d: Decision) -> Decision:
        """``d`` with its signature; deterministic, so a redelivered event's decision
        keeps its bytes."""
        keys = self.parts.keys
        if keys is None or d.action is None:
            return d
        return d.model_copy(update={"signature": keys.sign(d.model_dump(mode="json"))})

    def _within_metric_cap(self, accepted: Accepted, records: dict[str, EntityRecord],
                           dead: DeadLetters) -> Accepted:
        """The accepted records without samples of metrics beyond their entity's cap.

        Counted on the stored state plus the metrics this batch adds; discrete events
        keep no series and always pass."""
        cap = self.parts.max_metrics_per_entity
        if cap is None:
            return accepted
        known: dict[str, set[str]] = {}
        kept: Accepted = []
        for rec, ev in accepted:
            if ev.kind is EventKind.metric:
                metrics_of = known.get(ev.entity)
                if metrics_of is None:
                    metrics_of = known[ev.entity] = records[ev.entity].metrics()
                if ev.metric not in metrics_of:
                    if len(metrics_of) >= cap:
                        dead.append((rec.key, self._dead(
                            rec, "too_many_metrics",
                            f"entity {ev.entity!r} has {len(metrics_of)} metrics, the most "
                            f"allowed (IA_MAX_METRICS_PER_ENTITY); {ev.metric!r} is refused")))
                        continue
                    metrics_of.add(ev.metric)
            kept.append((rec, ev))
        return kept

    def _processing_error(self, rec: RawRecord, exc: Exception) -> DeadLetter:
        log.error("decision failed for %s[%d]@%d, sent to the DLQ", rec.topic, rec.partition,
                  rec.offset, exc_info=exc)
        return self._dead(rec, "processing_error", stack_summary(exc))

    @staticmethod
    def _dead(rec: RawRecord, reason: str, error: str) -> DeadLetter:
        return dead_letter(rec.value or b"", reason, error, rec.topic, rec.partition,
                           rec.offset)

    def on_published(self, decided: Decided) -> None:
        """Count a batch's records once the broker has confirmed them all."""
        for _, dead in decided.dead_letters:
            metrics.DLQ_RECORDS.labels(dead.reason).inc()
        now_s = now_ms() / 1000.0
        for d in decided.decisions:
            metrics.DECISIONS.labels(d.action.type if d.action else "none", d.mode.value).inc()
            for step in d.interventions():
                metrics.GUARD_INTERVENTIONS.labels(step.guard).inc()
            metrics.EVENT_TIME_LAG.observe(max(0.0, now_s - d.ts / 1000.0))

    async def on_outcome(self, outcome: ActionOutcome) -> None:
        """Record what an action did in its entity's history (and teach from a failure),
        only for an action decision this pipeline remembers, of the entity it names: an
        outcome anyone could write to ``ia.outcomes`` for an id nobody decided, or naming
        another entity, is refused, logged and counted in
        ``ia_outcomes_refused_total{reason}``.  A shadow worker records production's
        outcomes as they come: its decisions have ids of their own, and it never acts."""
        if outcome.status is OutcomeStatus.rejected:
            return  # nothing ran; a forged decision must not write an entity's history
        refused = None if self.parts.shadow else await self._unmatched(outcome)
        if refused is not None:
            log.warning("outcome of decision %s for %s refused (%s): ignored",
                        outcome.decision_id, outcome.entity, refused.value)
            metrics.OUTCOMES_REFUSED.labels(refused.value).inc()
            return
        await self.parts.features.record_action(outcome.entity, outcome.action_type,
                                                outcome.status.value, outcome.finished_at)
        if outcome.status in FAILED:
            await self.parts.learner.on_failed_action(outcome.entity, outcome.decision_id)
        metrics.FEEDBACK.labels("outcome").inc()

    async def _unmatched(self, outcome: ActionOutcome) -> LabelResult | None:
        entity = await self.parts.learner.entity_of(outcome.decision_id)
        if entity is None:
            return LabelResult.unmatched
        return None if entity == outcome.entity else LabelResult.wrong_entity

    async def on_feedback(self, label: Feedback) -> LabelResult:
        """Apply a label if it counts: signed with a feedback key (``ia feedback``), for a
        remembered decision and its entity, within the entity's cap.  A refused label is
        logged, counted in ``ia_feedback_refused_total{reason}`` and changes nothing."""
        keys = self.parts.feedback_keys
        signed = keys is not None and keys.verify(label.model_dump(mode="json"),
                                                  FEEDBACK_FIELDS) is None
        result = await self.parts.learner.on_label(label) if signed \
            else LabelResult.unauthenticated
        if result in REFUSED:
            log.warning("feedback for decision %s by %s refused (%s): ignored",
                        label.decision_id, label.by, result.value)
            metrics.FEEDBACK_REFUSED.labels(result.value).inc()
        elif result is LabelResult.counted:
            metrics.FEEDBACK.labels(label.label.value).inc()
        return result


def stack_summary(exc: BaseException) -> str:
    """``Type: message`` and where it was raised (innermost frame first), in one line:
    enough to find the bug from the dead letter, and bounded."""
    message = str(exc)
    if len(message) > 500:
        message = message[:500] + "..."
    frames = traceback.extract_tb(exc.__traceback__)[-STACK_FRAMES:]
    where = " <- ".join(f"{Path(f.filename).name}:{f.lineno} in {f.name}"
                        for f in reversed(frames))
    return f"{type(exc).__name__}: {message} | at {where}"
