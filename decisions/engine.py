"""From validated events to decisions: enrich, score, detect drift, decide.

:class:`DecisionEngine` is the whole pipeline minus Kafka.  The worker gives
it Redis-backed stores and the wall clock; replay gives it memory stores and
event time, and gets byte-identical decisions for the same input.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from ia.core.clock import now_ms
from ia.decisions.detector import AdaptiveDetector, DetectorState, SeriesDetector
from ia.decisions.explain import explain
from ia.decisions.feedback import (
    FeedbackClassifier,
    Prediction,
    action_trust,
    classifier_inputs,
    entity_trust,
)
from ia.decisions.guards import (
    GuardStore,
    KillSwitchState,
    MemoryKillSwitch,
    apply_guards,
    observe_anomaly,
    observe_fleet,
    observe_health,
)
from ia.decisions.policy import Policy, PolicyResult
from ia.features.enrich import Enricher
from ia.features.series import WARMUP_SAMPLES
from ia.features.store import EntityRecord, FeatureStore
from ia.schemas.models import (
    Decision,
    DriftState,
    EventKind,
    Mode,
    TelemetryEvent,
    derive_decision_id,
)
from ia.schemas.serde import encode


class EntityState(Protocol):
    """What the decision path reads and writes of an entity's record.

    The record belongs to the feature store (:class:`ia.features.store.EntityRecord`:
    one Redis hash per entity, loaded and saved once per batch); the engine sees it
    only through this view.
    """

    @property
    def context(self) -> Mapping[str, str]: ...

    def detector(self, metric: str) -> bytes: ...

    def put_detector(self, metric: str, blob: bytes) -> None: ...

    def rebaseline(self, metric: str) -> None: ...

    def recall_decision(self, decision_id: str) -> bytes | None: ...

    def remember_decision(self, decision_id: str, ts: int, payload: bytes) -> None: ...


States = dict[tuple[str, str], DetectorState]


def confidence_of(score: float, features: dict[str, float]) -> float:
    """How much to trust an anomaly score before acting on it.

    Young series have unreliable baselines, and an entity whose past actions
    were labelled false positives has earned less trust (Laplace-smoothed
    precision of its past actions).
    """
    warmup = min(1.0, features.get("n", 0.0) / (2 * WARMUP_SAMPLES))
    return max(0.0, min(1.0, score * warmup * entity_trust(features)))


@dataclass
class EngineStats:
    events: int = 0
    drift_detections: int = 0
    by_mode: dict[str, int] = field(default_factory=dict)
    guards: dict[str, int] = field(default_factory=dict)  # interventions per guard


class DecisionEngine:
    def __init__(self, policy: Callable[[], Policy], store: FeatureStore,
                 guard_store: GuardStore,
                 clock: Callable[[TelemetryEvent], int] | None = None,
                 pipeline_id: str = "main",
                 kill_switch: KillSwitchState | None = None,
                 feedback: FeedbackClassifier | None = None,
                 detector: SeriesDetector | None = None) -> None:
        self.policy = policy
        self.store = store
        self.guard_store = guard_store
        self.kill_switch = kill_switch or MemoryKillSwitch()
        self.clock = clock or (lambda _ev: now_ms())
        self.pipeline_id = pipeline_id
        self.detector = detector or AdaptiveDetector()
        # Shared "will this action be useful?" model; the worker swaps in newer
        # checkpoints (ia.decisions.checkpoint) between batches.
        self.feedback = feedback or FeedbackClassifier()
        self.stats = EngineStats()

    async def process(self, events: Sequence[TelemetryEvent],
                      positions: Sequence[tuple[int, int]] | None = None,
                      records: dict[str, EntityRecord] | None = None) -> list[Decision]:
        """Decide every event of a batch, in order; feature state is saved once.

        ``positions`` ((partition, offset) per event, from the worker) let the
        feature store recognise records delivered again and not fold them twice.
        ``records``: the events' entities as loaded from the store for this batch, when
        the caller has read them already (the worker checks them first)."""
        if records is None:
            records = await self.store.load(ev.entity for ev in events)
        states: States = {}
        policy = self.policy()
        await observe_fleet(self.guard_store, policy, events)
        await observe_health(self.guard_store, policy, events)
        decisions = []
        enricher = Enricher(records)  # contexts parsed once per batch, counts reported once
        for i, ev in enumerate(events):
            # One event at a time: a level drift re-baselines the series' features
            # from the next event on, wherever the batch boundaries fall.
            f = enricher.features(ev, None if positions is None else positions[i])
            rec = records[ev.entity]
            decision_id = derive_decision_id(ev.event_id or "", self.pipeline_id)
            earlier = rec.recall_decision(decision_id)
            if earlier is not None:
                # Redelivered after a crash: republish the original decision
                # verbatim instead of re-deciding against newer state.
                decisions.append(Decision.model_validate_json(earlier))
                continue
            d = await self._decide(ev, f, rec, policy, decision_id, states)
            if d.action is not None:
                rec.remember_decision(d.decision_id, d.ts, encode(d, "json"))
            decisions.append(d)
        enricher.finish()
        for (entity, metric), st in states.items():
            records[entity].put_detector(metric, st.pack())
        await self.store.save(records)
        return decisions

    def _score(self, ev: TelemetryEvent, f: dict[str, float], rec: EntityState,
               states: States) -> tuple[float, DriftState, str | None]:
        """Score before learning (no look-ahead); per-series state is unpacked once
        per batch (``states``) and packed back into the entity's record by
        :meth:`process`."""
        if ev.kind is not EventKind.metric:
            return 0.0, DriftState.stable, None
        st = states.get((ev.entity, ev.metric))
        if st is None:
            st = states[(ev.entity, ev.metric)] = self.detector.unpack(rec.detector(ev.metric))
        scored = self.detector.score(st, ev.value, ev.ts)
        state, detected = self.detector.learn(st, scored)
        f.update(scored.components)
        if detected:
            self.stats.drift_detections += 1
            if "level" in detected:
                rec.rebaseline(ev.metric)
        return scored.score, state, detected

    def _second_opinion(self, f: dict[str, float], rec: EntityState, score: float,
                        confidence: float, drift: DriftState,
                        result: PolicyResult) -> tuple[Prediction | None, float]:
        """Confidence once an action is proposed: the feedback classifier's view of
        this kind of action, and this entity's record with this action type."""
        if result.action is None:
            return None, confidence
        pred = self.feedback.predict(classifier_inputs(f, score, result.action.type,
                                                       drift.value))
        factor = pred.factor * action_trust(rec.context, result.action.type)
        return pred, max(0.0, min(1.0, confidence * factor))

    async def _decide(self, ev: TelemetryEvent, f: dict[str, float], rec: EntityState,
                      policy: Policy, decision_id: str, states: States) -> Decision:
        score, drift, drift_event = self._score(ev, f, rec, states)
        await observe_anomaly(self.guard_store, policy, ev, score)
        confidence = confidence_of(score, f)
        result = policy.evaluate(entity=ev.entity, metric=ev.metric, kind=ev.kind.value,
                                 labels=ev.labels, features=f, score=score,
                                 confidence=confidence, drift=drift.value)
        pred, lowered = self._second_opinion(f, rec, score, confidence, drift, result)
        if lowered < confidence:
            # Past feedback withholds trust from this action: the rules decide
            # again with the lower confidence (a min_confidence bar may now fail).
            confidence = lowered
            result = policy.evaluate(entity=ev.entity, metric=ev.metric, kind=ev.kind.value,
                                     labels=ev.labels, features=f, score=score,
                                     confidence=confidence, drift=drift.value)
        mode = await self._guard(result, decision_id, ev)
        self.stats.events += 1
        self.stats.by_mode[mode.value] = self.stats.by_mode.get(mode.value, 0) + 1
        return Decision(
            decision_id=decision_id, correlation_id=ev.labels.get("correlation_id",
                                                                  ev.event_id or ""),
            event_id=ev.event_id or "", entity=ev.entity, metric=ev.metric, value=ev.value,
            ts=ev.ts, decided_at=self.clock(ev), anomaly_score=round(score, 6),
            confidence=round(confidence, 6), features=f,
            model=self.detector.info, drift=drift, rule_trace=result.trace, action=result.action,
            mode=mode, policy_version=policy.version,
            explanation=explain(ev, f, score, drift_event, pred,
                                [self.detector.info, self.feedback.info]),
        )

    async def _guard(self, result: PolicyResult, decision_id: str,
                     ev: TelemetryEvent) -> Mode:
        """All guards, in one place (ia.decisions.guards.apply_guards)."""
        verdict = await apply_guards(result, decision_id=decision_id, ts=ev.ts,
                                     now=self.clock(ev), labels=ev.labels,
                                     store=self.guard_store,
                                     kill_switch=self.kill_switch, entity=ev.entity)
        for g in verdict.interventions:
            self.stats.guards[g] = self.stats.guards.get(g, 0) + 1
        return verdict.mode
