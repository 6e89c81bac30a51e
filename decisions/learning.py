"""What a label does: the one owner of decision -> entity lookup, label idempotency
and the trust counters.

Two records per decision, both kept 30 days because a label may arrive long
after its decision:

* ``{prefix}:dfx:{id}`` (JSON: entity, action type, classifier inputs), written
  by :meth:`FeedbackLearner.remember` for each decision that proposed an
  action.  It is the only way from a decision id to its entity: a label may
  name only the id (e.g. of a pending approval request, which has no outcome).
* ``{prefix}:labels:{id}`` (a hash) records what the decision's labels have
  done, each step at most once whatever redelivery does: field ``label`` (the
  first human or tool label, counted in the entity-wide ``tp``/``fp``
  counters) and field ``taught`` (the one lesson to the shared classifier and
  the per-action counters, from the first label or failed action).  The steps
  are separate because a failed action teaches without being a label: a label
  that follows it still counts entity-wide, but teaches nothing more.
* ``{prefix}:fbq:{window}:{entity}`` counts the labels an entity got in one window
  of the feedback cap (:class:`LabelCap`), kept for the window.

A label counts only when it should (:meth:`FeedbackLearner.on_label`): for a
remembered decision (``unmatched`` otherwise: an id nobody decided, or one older
than 30 days), naming that decision's entity if it names one (``wrong_entity``),
and within its entity's cap (``over_cap``).  Whether it comes from an
authenticated source is the worker's check, before this (:mod:`ia.decisions.service`).
A refused label changes nothing: no counter, no lesson, no label step.

The classifier is shared by every worker: each lesson is applied as an
optimistic read-modify-write of its checkpoint (:mod:`ia.decisions.checkpoint`),
and :meth:`FeedbackLearner.refresh` loads a newer version into the engine
before a batch (one ``HGET`` when nothing changed), so a restarted worker or a
new partition owner decides with everything learnt so far.  A checkpoint that fails
validation (:class:`~ia.decisions.feedback.CheckpointError`) is logged, counted in
``ia_checkpoints_rejected_total`` and ignored: the engine keeps the model it has, and
the next lesson starts the shared model afresh over it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from enum import StrEnum
from typing import Protocol

from ia.core import clock
from ia.core.keys import Keys
from ia.core.metrics import CHECKPOINTS_REJECTED
from ia.decisions.checkpoint import ModelStore
from ia.decisions.engine import DecisionEngine
from ia.decisions.feedback import (
    CheckpointError,
    FeedbackClassifier,
    counter_name,
    inputs_of,
    is_positive,
)
from ia.features.store import FeatureStore
from ia.schemas.models import Decision, Feedback

log = logging.getLogger("ia.learning")
MODEL_NAME = "feedback"
REMEMBER_S = 30 * 24 * 3600
# Entity context counter of actions that could not be carried out (feature actions_failed).
FAILED_COUNTER = "failed"


class Step(StrEnum):
    """What a decision's labels can do, each at most once."""

    label = "label"  # a label counted in the entity-wide counters
    taught = "taught"  # the lesson to the classifier and the per-action counters


class LabelResult(StrEnum):
    """What a label did; every value but ``counted`` and ``duplicate`` is a refusal (the
    ``reason`` of ``ia_feedback_refused_total``)."""

    counted = "counted"
    duplicate = "duplicate"  # this decision was labelled before
    unmatched = "unmatched"  # the decision is not remembered (unknown, or expired)
    wrong_entity = "wrong_entity"  # the label names another entity than the decision's
    over_cap = "over_cap"  # the entity had its cap of labels in this window
    unauthenticated = "unauthenticated"  # not from an authenticated source (the service's)


REFUSED = frozenset(LabelResult) - {LabelResult.counted, LabelResult.duplicate}


@dataclass(frozen=True)
class LabelCap:
    """At most ``max`` labels count per entity in each ``window_s`` (wall clock, fixed
    windows): however many labels someone sends, an entity's trust falls only so fast."""

    max: int
    window_s: float

    def window(self, now_ms: int) -> int:
        return int(now_ms // (self.window_s * 1000))


@dataclass(frozen=True)
class Remembered:
    """What a label arriving later needs of an action decision."""

    entity: str
    action: str
    x: dict[str, float]  # the classifier inputs the decision was made with


class DecisionMemory(Protocol):
    """Per-decision state of learning: what was decided, and what its labels did."""

    async def remember(self, decisions: Sequence[tuple[str, Remembered]]) -> None: ...

    async def recall(self, decision_id: str) -> Remembered | None: ...

    async def first(self, decision_id: str, step: Step, value: str) -> bool:
        """Record ``step`` for the decision; True only the first time."""
        ...

    async def used(self, entity: str, window: int) -> int:
        """How many labels counted for ``entity`` in ``window``."""
        ...

    async def take(self, entity: str, window: int, ttl_s: float) -> None:
        """Count one label for ``entity`` in ``window`` (forgotten after ``ttl_s``)."""
        ...


class RedisDecisionMemory:
    """``redis.asyncio`` client with ``decode_responses=False``; the layout is in the
    module docstring."""

    def __init__(self, client, prefix: str = "ia") -> None:
        self.client = client
        self.keys = Keys(prefix)

    async def remember(self, decisions: Sequence[tuple[str, Remembered]]) -> None:
        if not decisions:
            return
        async with self.client.pipeline(transaction=False) as pipe:
            for decision_id, r in decisions:
                pipe.set(self.keys.remembered_decision(decision_id),
                         json.dumps(asdict(r), sort_keys=True), ex=REMEMBER_S)
            await pipe.execute()

    async def recall(self, decision_id: str) -> Remembered | None:
        raw = await self.client.get(self.keys.remembered_decision(decision_id))
        return Remembered(**json.loads(raw)) if raw is not None else None

    async def first(self, decision_id: str, step: Step, value: str) -> bool:
        key = self.keys.labels(decision_id)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hsetnx(key, step.value, value)
            pipe.expire(key, REMEMBER_S)
            added, _ = await pipe.execute()
        return bool(added)

    async def used(self, entity: str, window: int) -> int:
        raw = await self.client.get(self.keys.label_quota(entity, window))
        return int(raw) if raw is not None else 0

    async def take(self, entity: str, window: int, ttl_s: float) -> None:
        key = self.keys.label_quota(entity, window)
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.incr(key)
            pipe.expire(key, max(1, int(ttl_s + 0.999)))
            await pipe.execute()


class MemoryDecisionMemory:
    """The same in a process's memory (nothing expires)."""

    def __init__(self) -> None:
        self._decisions: dict[str, Remembered] = {}
        self._steps: dict[str, dict[Step, str]] = {}
        self._quota: dict[tuple[str, int], int] = {}

    async def remember(self, decisions: Sequence[tuple[str, Remembered]]) -> None:
        self._decisions.update(decisions)

    async def recall(self, decision_id: str) -> Remembered | None:
        return self._decisions.get(decision_id)

    async def first(self, decision_id: str, step: Step, value: str) -> bool:
        done = self._steps.setdefault(decision_id, {})
        if step in done:
            return False
        done[step] = value
        return True

    async def used(self, entity: str, window: int) -> int:
        return self._quota.get((entity, window), 0)

    async def take(self, entity: str, window: int, ttl_s: float) -> None:
        self._quota[(entity, window)] = self._quota.get((entity, window), 0) + 1


class FeedbackLearner:
    def __init__(self, memory: DecisionMemory, store: FeatureStore, models: ModelStore,
                 cap: LabelCap | None = None) -> None:
        """``cap``: labels that count per entity and window (None: no cap)."""
        self.memory = memory
        self.store = store
        self.models = models
        self.cap = cap
        # The stored version last found invalid: not read again until a new one is saved.
        self._rejected_version: int | None = None

    async def remember(self, decisions: Sequence[Decision]) -> None:
        """Keep what a later label needs of each decision that proposed an action."""
        await self.memory.remember([
            (d.decision_id, Remembered(d.entity, d.action.type, x))
            for d in decisions if d.action is not None and (x := inputs_of(d)) is not None])

    async def entity_of(self, decision_id: str) -> str | None:
        remembered = await self.memory.recall(decision_id)
        return remembered.entity if remembered is not None else None

    async def on_label(self, fb: Feedback, now_ms: int | None = None) -> LabelResult:
        """Apply a human or tool label: the entity-wide counter once per decision, and
        the decision's lesson if it has not taught yet.  Refused (nothing changes) for
        a decision that is not remembered, another entity than the decision's, or an
        entity over its cap (``now_ms``: the wall clock's by default)."""
        entity = await self.entity_of(fb.decision_id)
        if entity is None:
            return LabelResult.unmatched
        if fb.entity is not None and fb.entity != entity:
            return LabelResult.wrong_entity
        window = None
        if self.cap is not None:
            window = self.cap.window(clock.now_ms() if now_ms is None else now_ms)
            if await self.memory.used(entity, window) >= self.cap.max:
                return LabelResult.over_cap
        if not await self.memory.first(fb.decision_id, Step.label, fb.label.value):
            return LabelResult.duplicate  # a redelivery does not use up the cap
        if self.cap is not None and window is not None:
            # Labels of one entity arrive in order on its partition (one worker), so
            # counting after the check does not let a burst through.
            await self.memory.take(entity, window, self.cap.window_s)
        positive = is_positive(fb.label.value)
        await self.store.incr_context(entity, counter_name(positive))
        await self.learn(fb.decision_id, positive)
        return LabelResult.counted

    async def on_failed_action(self, entity: str, decision_id: str) -> None:
        """An action that could not be carried out was not useful."""
        await self.store.incr_context(entity, FAILED_COUNTER)
        await self.learn(decision_id, False)

    async def learn(self, decision_id: str, positive: bool) -> int | None:
        """Teach the decision's lesson; return the new classifier version, or None if
        the decision is unknown (no action, expired) or has already taught."""
        remembered = await self.memory.recall(decision_id)
        if remembered is None:
            return None
        if not await self.memory.first(decision_id, Step.taught, "1"):
            return None
        await self.store.incr_context(remembered.entity,
                                      counter_name(positive, remembered.action))

        def apply(blob: bytes | None) -> tuple[int, bytes]:
            clf = _restore(blob) or FeedbackClassifier()
            clf.learn(remembered.x, positive)
            return clf.version, clf.dumps()

        version = await self.models.update(MODEL_NAME, apply)
        log.info("feedback model v%d learnt %s from %s", version,
                 "useful" if positive else "not useful", decision_id)
        return version

    async def refresh(self, engine: DecisionEngine) -> None:
        """Give ``engine`` the newest classifier checkpoint, if it has not got it."""
        if await self.models.version(MODEL_NAME) in (engine.feedback.version,
                                                     self._rejected_version):
            return
        version, blob = await self.models.load(MODEL_NAME)
        clf = _restore(blob)
        if clf is None:
            self._rejected_version = version
            return
        engine.feedback = clf


def _restore(blob: bytes | None) -> FeedbackClassifier | None:
    """The stored classifier, or None (logged and counted) if its checkpoint is invalid."""
    try:
        return FeedbackClassifier.loads(blob)
    except CheckpointError as exc:
        log.error("feedback model checkpoint ignored, it failed validation: %s", exc)
        CHECKPOINTS_REJECTED.labels(model=MODEL_NAME).inc()
        return None
