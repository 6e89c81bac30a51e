"""Online feature state: one Redis hash per entity, or memory for replay.

Layout (Redis), one hash per entity so one ``HGETALL`` serves every metric of
that entity and idle entities expire as a unit::

    {prefix}:f:v1:{entity}
        m:{metric}      packed SeriesState (48 bytes)
        c:{name}        context value (event timestamps, feedback counters)
        a:{metric}      packed anomaly-detector state (decisions.detector, ~1.1 KB)
        d:{decision_id} a recent decision that carried an action (JSON)

Concurrency model: telemetry is keyed by entity, so one partition (and
therefore one worker) owns an entity at a time.  Each batch does one
pipelined read and one pipelined write; when a partition moves, the new owner
reads what the old one last wrote.  Feedback counters use ``HINCRBY`` so
they never race with the owner's writes to other fields.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Protocol

from features.series import SeriesState

STATE_VERSION = "v1"
DEFAULT_TTL_S = 7 * 24 * 3600
# Enough to cover any batch still unacknowledged when a worker dies; action
# decisions are rare, so this costs nothing for most entities.
MAX_REMEMBERED_DECISIONS = 8


@dataclass
class EntityRecord:
    series: dict[str, SeriesState] = field(default_factory=dict)
    context: dict[str, str] = field(default_factory=dict)
    dirty_series: set[str] = field(default_factory=set)
    dirty_context: set[str] = field(default_factory=set)
    # Recent action decisions, oldest first, so a batch redelivered after a
    # crash republishes exactly what was decided the first time.
    decisions: dict[str, bytes] = field(default_factory=dict)
    dirty_decisions: set[str] = field(default_factory=set)
    dropped_decisions: set[str] = field(default_factory=set)
    # Opaque, versioned anomaly-detector state per metric, saved with the
    # features so the two never disagree after a crash or a rebalance.
    detectors: dict[str, bytes] = field(default_factory=dict)
    dirty_detectors: set[str] = field(default_factory=set)

    def get_series(self, metric: str) -> SeriesState:
        return self.series.get(metric) or SeriesState()

    def put_series(self, metric: str, state: SeriesState) -> None:
        self.series[metric] = state
        self.dirty_series.add(metric)

    def put_context(self, name: str, value: str) -> None:
        self.context[name] = value
        self.dirty_context.add(name)

    def put_detector(self, metric: str, blob: bytes) -> None:
        self.detectors[metric] = blob
        self.dirty_detectors.add(metric)

    def remember_decision(self, decision_id: str, ts: int, payload: bytes) -> None:
        """Keep a decision (its JSON) so a redelivered event gets it back verbatim."""
        if decision_id in self.decisions:
            return
        # The event-time prefix orders decisions after a reload (hash field
        # order is not insertion order in Redis).
        self.decisions[decision_id] = b"%020d|" % max(ts, 0) + payload
        self.dirty_decisions.add(decision_id)
        while len(self.decisions) > MAX_REMEMBERED_DECISIONS:
            oldest = next(iter(self.decisions))
            del self.decisions[oldest]
            self.dirty_decisions.discard(oldest)
            self.dropped_decisions.add(oldest)

    def changes(self) -> dict[bytes, bytes]:
        out = {f"m:{m}".encode(): self.series[m].pack() for m in self.dirty_series}
        out.update({f"c:{c}".encode(): self.context[c].encode() for c in self.dirty_context})
        out.update({f"d:{d}".encode(): self.decisions[d] for d in self.dirty_decisions})
        out.update({f"a:{m}".encode(): self.detectors[m] for m in self.dirty_detectors})
        return out

    def recall_decision(self, decision_id: str) -> bytes | None:
        raw = self.decisions.get(decision_id)
        return raw.split(b"|", 1)[1] if raw is not None else None

    def deletions(self) -> list[bytes]:
        return [f"d:{d}".encode() for d in self.dropped_decisions]

    def dirty(self) -> bool:
        return bool(self.dirty_series or self.dirty_context or self.dirty_decisions
                    or self.dropped_decisions)

    def clean(self) -> None:
        self.dirty_series.clear()
        self.dirty_context.clear()
        self.dirty_decisions.clear()
        self.dropped_decisions.clear()
        self.dirty_detectors.clear()

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> EntityRecord:
        rec = cls()
        for k, v in raw.items():
            name = k.decode()
            if name.startswith("m:"):
                rec.series[name[2:]] = SeriesState.unpack(v)
            elif name.startswith("c:"):
                rec.context[name[2:]] = v.decode()
            elif name.startswith("d:"):
                rec.decisions[name[2:]] = v
            elif name.startswith("a:"):
                rec.detectors[name[2:]] = v
        rec.decisions = dict(sorted(rec.decisions.items(), key=lambda kv: kv[1][:20]))
        return rec


class FeatureStore(Protocol):
    async def load(self, entities: Iterable[str]) -> dict[str, EntityRecord]: ...

    async def save(self, records: dict[str, EntityRecord]) -> None: ...

    async def incr_context(self, entity: str, name: str, amount: int = 1) -> None: ...

    async def set_context(self, entity: str, values: dict[str, str]) -> None: ...


class MemoryFeatureStore:
    """Same interface as the Redis store, for replay and tests."""

    def __init__(self) -> None:
        self._hashes: dict[str, dict[bytes, bytes]] = {}

    async def load(self, entities: Iterable[str]) -> dict[str, EntityRecord]:
        return {e: EntityRecord.from_hash(self._hashes.get(e, {})) for e in set(entities)}

    async def save(self, records: dict[str, EntityRecord]) -> None:
        for entity, rec in records.items():
            if rec.dirty():
                h = self._hashes.setdefault(entity, {})
                h.update(rec.changes())
                for field_name in rec.deletions():
                    h.pop(field_name, None)
                rec.clean()

    async def incr_context(self, entity: str, name: str, amount: int = 1) -> None:
        h = self._hashes.setdefault(entity, {})
        key = f"c:{name}".encode()
        h[key] = str(int(h.get(key, b"0")) + amount).encode()

    async def set_context(self, entity: str, values: dict[str, str]) -> None:
        h = self._hashes.setdefault(entity, {})
        h.update({f"c:{k}".encode(): v.encode() for k, v in values.items()})


class RedisFeatureStore:
    """Online store on Redis (``redis.asyncio`` client, ``decode_responses=False``)."""

    def __init__(self, client, prefix: str = "ia", ttl_s: int = DEFAULT_TTL_S) -> None:
        self.client = client
        self.prefix = prefix
        self.ttl_s = ttl_s

    def key(self, entity: str) -> str:
        return f"{self.prefix}:f:{STATE_VERSION}:{entity}"

    async def load(self, entities: Iterable[str]) -> dict[str, EntityRecord]:
        names = sorted(set(entities))
        async with self.client.pipeline(transaction=False) as pipe:
            for e in names:
                pipe.hgetall(self.key(e))
            raws = await pipe.execute()
        return {e: EntityRecord.from_hash(raw) for e, raw in zip(names, raws, strict=True)}

    async def save(self, records: dict[str, EntityRecord]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            dirty = False
            for entity, rec in records.items():
                if not rec.dirty():
                    continue
                dirty = True
                changes, deletions = rec.changes(), rec.deletions()
                if changes:
                    pipe.hset(self.key(entity), mapping=changes)
                if deletions:
                    pipe.hdel(self.key(entity), *deletions)
                pipe.expire(self.key(entity), self.ttl_s)
            if dirty:
                await pipe.execute()
        for rec in records.values():
            rec.clean()

    async def incr_context(self, entity: str, name: str, amount: int = 1) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hincrby(self.key(entity), f"c:{name}", amount)
            pipe.expire(self.key(entity), self.ttl_s)
            await pipe.execute()

    async def set_context(self, entity: str, values: dict[str, str]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(self.key(entity), mapping={f"c:{k}": v for k, v in values.items()})
            pipe.expire(self.key(entity), self.ttl_s)
            await pipe.execute()
