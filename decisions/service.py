"""What the worker process does, minus Kafka.

``ia.streams.worker`` moves records between the topics and this service:

* :meth:`WorkerService.on_telemetry` validates a batch of raw telemetry records
  (the ones that fail become dead letters with their reason), decides the rest
  with the newest feedback model, and remembers what later labels need;
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
from collections.abc import Sequence
from dataclasses import dataclass, field

from ia.core import metrics
from ia.core.clock import now_ms
from ia.decisions.engine import DecisionEngine
from ia.decisions.learning import FeedbackLearner, LabelResult
from ia.decisions.shadow import as_shadow
from ia.features.store import FeatureStore
from ia.schemas.models import (
    ActionOutcome,
    DeadLetter,
    Decision,
    Feedback,
    OutcomeStatus,
    TelemetryEvent,
)
from ia.schemas.validation import validate_record

log = logging.getLogger("ia.worker")
# Outcomes of actions that could not be carried out: a negative label.  Success of
# execution says nothing about usefulness and is not a label.
FAILED = frozenset({OutcomeStatus.failed, OutcomeStatus.timeout})


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


@dataclass(frozen=True)
class WorkerParts:
    """What the worker decides and learns with (Redis-backed in the worker process)."""

    engine: DecisionEngine
    features: FeatureStore
    learner: FeedbackLearner
    wire_format: str = "json"
    # The candidate of ``ia worker --shadow``: decisions marked so nothing acts on them.
    shadow: bool = False


class WorkerService:
    def __init__(self, parts: WorkerParts) -> None:
        self.parts = parts

    async def on_telemetry(self, batch: Sequence[RawRecord]) -> Decided:
        started = time.perf_counter()
        valid: list[TelemetryEvent] = []
        positions: list[tuple[int, int]] = []
        dead: list[tuple[bytes | None, DeadLetter]] = []
        for rec in batch:
            checked = validate_record(rec.value, fmt=self.parts.wire_format, topic=rec.topic,
                                      partition=rec.partition, offset=rec.offset)
            if isinstance(checked, DeadLetter):
                dead.append((rec.key, checked))
            else:
                valid.append(checked)
                positions.append((rec.partition, rec.offset))
        decide_started = time.perf_counter()
        metrics.STAGE_SECONDS.labels("validate").observe(decide_started - started)
        decisions = await self._decide(valid, positions) if valid else []
        metrics.STAGE_SECONDS.labels("decide").observe(time.perf_counter() - decide_started)
        return Decided(decisions, dead)

    async def _decide(self, valid: list[TelemetryEvent],
                      positions: list[tuple[int, int]]) -> list[Decision]:
        learner, engine = self.parts.learner, self.parts.engine
        await learner.refresh(engine)
        decided = await engine.process(valid, positions)
        await learner.remember(decided)
        return [as_shadow(d) for d in decided] if self.parts.shadow else decided

    def on_published(self, decided: Decided) -> None:
        """Count a batch's records once the broker has confirmed them all."""
        for _, dead in decided.dead_letters:
            metrics.DLQ_RECORDS.labels(dead.reason).inc()
        now_s = now_ms() / 1000.0
        for d in decided.decisions:
            metrics.DECISIONS.labels(d.action.type if d.action else "none", d.mode.value).inc()
            for step in d.interventions():
                metrics.GUARD_INTERVENTIONS.labels(step.guard).inc()
            metrics.EVENT_TO_DECISION.observe(max(0.0, now_s - d.ts / 1000.0))

    async def on_outcome(self, outcome: ActionOutcome) -> None:
        await self.parts.features.record_action(outcome.entity, outcome.action_type,
                                                outcome.status.value, outcome.finished_at)
        if outcome.status in FAILED:
            await self.parts.learner.on_failed_action(outcome.entity, outcome.decision_id)
        metrics.FEEDBACK.labels("outcome").inc()

    async def on_feedback(self, label: Feedback) -> LabelResult:
        result = await self.parts.learner.on_label(label)
        if result is LabelResult.unmatched:
            log.warning("feedback for unknown decision %s ignored", label.decision_id)
            metrics.FEEDBACK.labels("unmatched").inc()
        elif result is LabelResult.counted:
            metrics.FEEDBACK.labels(label.label.value).inc()
        return result
