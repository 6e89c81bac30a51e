"""Turn a batch of telemetry events into per-event feature vectors.

:class:`Enricher` is the one implementation of the features, used by the decision
engine in the worker (Redis) and in every offline run (memory): for each event, in
order, it serves the features from the state before the event, then folds the event
in. The engine loads every entity of a batch once and saves once.

With ``positions`` (the Kafka partition and offset of each event), an event
already folded into its entity's state -- delivered again after a crash or a
rebalance -- is served but not folded a second time.
"""

from __future__ import annotations

from ia.core import metrics
from ia.features.aggregations import EntityContext, Out
from ia.features.definitions import NEVER_S
from ia.features.registry import (
    DEFAULT_REGISTRY,
    DUPLICATE,
    IN_ORDER,
    LATE_FOLDED,
    OUTCOMES,
    REDELIVERED,
    TOO_LATE,
    FeatureRegistry,
    Ratio,
)
from ia.features.series import saturate
from ia.features.store import EntityRecord
from ia.schemas.models import EventKind, TelemetryEvent

__all__ = ["CONTEXT_EVENTS", "NEVER_S", "Enricher", "context_features"]

# Discrete events whose recency is a context feature (``seconds_since_<name>``):
# an allow-list from the definitions, because event names come from producers
# and each one tracked costs memory on every entity.
CONTEXT_EVENTS = tuple(sorted(DEFAULT_REGISTRY.tracked_events))
_FOLDED = (IN_ORDER, LATE_FOLDED, TOO_LATE)  # outcomes that change the stored state


def context_features(rec: EntityRecord, ts: int,
                     registry: FeatureRegistry = DEFAULT_REGISTRY) -> Out:
    """The entity-level features of ``rec`` at event time ``ts``."""
    out: Out = {}
    registry.serve_context(EntityContext(rec.context) if rec.context else None, ts, out)
    return out


def claim(rec: EntityRecord, partition: int, offset: int, ts: int) -> bool:
    """Whether the record at ``(partition, offset)`` is new to ``rec`` (then it becomes the
    entity's position), or already in its state (delivered again: serve, do not fold).

    An entity's records come from one partition in offset order, so anything at or
    below the last folded offset was folded -- unless its time is newer than
    anything folded, which means the offsets started again (a recreated topic)."""
    p = rec.position
    if p is not None and p[0] == partition:
        if offset <= p[1] and ts <= p[2]:
            return False
        rec.position = (partition, offset, ts if ts > p[2] else p[2])
    else:
        rec.position = (partition, offset, ts)
    rec.dirty_position = True
    return True


class Enricher:
    """Enrichment of one batch, one event at a time (:meth:`features`), with what the
    batch shares: parsed entity contexts and outcome counts (:meth:`finish` reports
    them).  For callers that act between events, e.g. the engine re-baselining a
    series after a drift, so the next event of the series already sees it."""

    def __init__(self, records: dict[str, EntityRecord],
                 registry: FeatureRegistry = DEFAULT_REGISTRY) -> None:
        self.records = records
        self.registry = registry
        self.contexts: dict[str, EntityContext | None] = {}
        self.counts = [0] * len(OUTCOMES)
        self.neutral = registry.neutral_context
        self.ratios = registry.ratios_by_metric
        self.plan_of = registry.plan
        self.serve_context = registry.serve_context

    def context(self, entity: str) -> EntityContext | None:
        """The entity's parsed context (None: it has none, the common case)."""
        if entity not in self.contexts:
            raw = self.records[entity].context
            self.contexts[entity] = EntityContext(raw) if raw else None
        return self.contexts[entity]

    def writable_context(self, entity: str) -> EntityContext:
        ctx = self.context(entity)
        if ctx is None:
            ctx = self.contexts[entity] = EntityContext({})
        return ctx

    def metric_features(self, ev: TelemetryEvent, rec: EntityRecord, fold: bool) -> Out:
        metric, t = ev.metric, ev.ts
        # Ratios first: from the series as they are, before this sample (or its series)
        rs = self.ratios.get(metric)
        ratios = [(r.d.outputs[0], self.ratio(rec, r, t)) for r in rs
                  if _has(rec, r.numerator) and _has(rec, r.denominator)] if rs else ()
        st = rec.states.get(metric)
        if st is None:  # first sample of this series in the batch (rec.state, inlined)
            plan = self.plan_of(metric)
            blob = rec.blobs.get(metric)
            st = rec.states[metric] = plan.decode(blob) if blob is not None else plan.new()
            rec.plans[metric] = plan
        else:
            plan = rec.plans[metric]
        feats, outcome = plan.observe(st, ev.value, t, fold)
        self.counts[outcome] += 1
        if outcome in _FOLDED:
            rec.dirty_series.add(metric)
        for name, value in ratios:
            feats[name] = value
        entity = ev.entity
        ctx = self.contexts[entity] if entity in self.contexts else self.context(entity)
        if ctx is None:
            feats.update(self.neutral)
        else:
            self.serve_context(ctx, t, feats)
        return feats

    def ratio(self, rec: EntityRecord, r: Ratio, t: int) -> float:
        """sum(numerator) / sum(denominator) over the window at t (0 if no denominator)."""
        num = self._window_sum(rec, r.numerator, r.window, t)
        den = self._window_sum(rec, r.denominator, r.window, t)
        return saturate(num / den) if den > 0 else 0.0

    def _window_sum(self, rec: EntityRecord, metric: str, window: str, t: int) -> float:
        st = rec.states.get(metric)
        if st is None:  # not decoded (yet): read just its window from the blob
            total = self.registry.plan(metric).window_sum(rec.blobs[metric], window, t)
            if total is not None:
                return total
            st = rec.state(metric, self.registry)
        return rec.plans[metric].window_sum_of(st, window, t)

    def event_features(self, ev: TelemetryEvent, rec: EntityRecord) -> Out:
        """A discrete event: remember it (if some definition reads it), serve context.
        Folding is idempotent (a set of recent times), so redelivery needs no check."""
        ctx = self.context(ev.entity)
        if ev.metric in self.registry.tracked_events:
            ctx = self.writable_context(ev.entity)
            value = ctx.record_event(ev.metric, ev.ts)
            if value is not None:
                rec.put_context(f"event:{ev.metric}", value)
        feats: Out = {"value": ev.value}
        self.registry.serve_context(ctx, ev.ts, feats)
        return feats

    def features(self, ev: TelemetryEvent, position: tuple[int, int] | None = None) -> Out:
        """Serve ``ev``'s features, then fold it into its entity's record."""
        rec = self.records[ev.entity]
        fold = True if position is None else claim(rec, *position, ev.ts)
        if ev.kind is EventKind.metric:
            return self.metric_features(ev, rec, fold)
        return self.event_features(ev, rec)

    def finish(self) -> None:
        """Report the batch's late, dropped, duplicate and redelivered samples."""
        for outcome in (LATE_FOLDED, TOO_LATE, DUPLICATE, REDELIVERED):
            if self.counts[outcome]:
                metrics.FEATURE_LATE_EVENTS.labels(OUTCOMES[outcome]).inc(self.counts[outcome])
        self.counts = [0] * len(OUTCOMES)


def _has(rec: EntityRecord, metric: str) -> bool:
    return metric in rec.blobs or metric in rec.states
