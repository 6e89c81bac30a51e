"""Turn a batch of telemetry events into per-event feature vectors.

:func:`enrich_batch` is the one definition of the features, used by the
worker (Redis) and by replay (memory): it loads every entity of the batch in
one round trip, folds events in order, and writes back once.
"""

from __future__ import annotations

from collections.abc import Sequence

from features.series import observe
from features.store import EntityRecord, FeatureStore
from schemas.models import EventKind, TelemetryEvent

# Discrete events whose recency is a context feature (``seconds_since_<name>``).
# An allow-list, because event names come from producers and each one tracked
# costs memory on every entity.
CONTEXT_EVENTS = ("deploy", "config_change", "restart", "scale")
NEVER_S = 1e9


def context_features(rec: EntityRecord, ts: int) -> dict[str, float]:
    feats: dict[str, float] = {}
    for name in CONTEXT_EVENTS:
        seen = rec.context.get(f"event:{name}")
        feats[f"seconds_since_{name}"] = (
            max(0.0, (ts - int(seen)) / 1000.0) if seen is not None and int(seen) <= ts
            else NEVER_S
        )
    feats["false_positives"] = float(rec.context.get("fp", 0))
    feats["true_positives"] = float(rec.context.get("tp", 0))
    feats["actions_failed"] = float(rec.context.get("failed", 0))
    return feats


def _enrich_one(ev: TelemetryEvent, rec: EntityRecord) -> dict[str, float]:
    if ev.kind is EventKind.event:
        if ev.metric in CONTEXT_EVENTS:
            prev = rec.context.get(f"event:{ev.metric}")
            if prev is None or int(prev) < ev.ts:
                rec.put_context(f"event:{ev.metric}", str(ev.ts))
        return {"value": ev.value, **context_features(rec, ev.ts)}
    feats, new_state = observe(rec.get_series(ev.metric), ev.value, ev.ts)
    rec.put_series(ev.metric, new_state)
    return {**feats, **context_features(rec, ev.ts)}


def enrich_events(events: Sequence[TelemetryEvent],
                  records: dict[str, EntityRecord]) -> list[dict[str, float]]:
    """Features for each event, in order, folding each into ``records``."""
    return [_enrich_one(ev, records[ev.entity]) for ev in events]


async def enrich_batch(events: Sequence[TelemetryEvent],
                       store: FeatureStore) -> list[dict[str, float]]:
    """Load, enrich and save a batch: one read and one write round trip."""
    records = await store.load(ev.entity for ev in events)
    features = enrich_events(events, records)
    await store.save(records)
    return features
