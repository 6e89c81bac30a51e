"""Online feature state: one Redis hash per entity, or memory for replay.

Layout (Redis), one hash per entity so one read serves every metric of that
entity and idle entities expire as a unit (TTL refreshed on every write)::

    {prefix}:f:v1:{entity}      (ia.core.keys.Keys.entity; spec: docs/redis-layout.md)
        s1:{metric}     packed series state: every per-metric definition
                        (features.registry; ~750 bytes, fixed per layout)
        c:event:{name}  recent occurrences of a discrete event ("t1,t2,..", newest first)
        c:{tp,fp,...}   feedback counters; c:last_action "type:status:finished_at"
        p               "partition:offset:ts" of the last telemetry record folded
        a:{metric}      packed anomaly-detector state (ia.decisions.detector)
        d:{decision_id} a recent decision that carried an action (JSON)

Concurrency model: telemetry is keyed by entity, so one partition -- and
therefore one worker -- owns an entity at a time (single writer).  A batch
reads all its entities with one script call and writes back only the fields
it changed with another; the write is atomic (a Lua script), so a crash leaves
the batch either wholly saved or not at all.  The feedback agents touch other
fields only (``HINCRBY``, compare-and-set of ``c:last_action``), so they never
race with the owner.  When a partition moves, or a worker restarts, records
since the last committed offset are delivered again: ``p`` tells the new owner
which of them are already in the state, so nothing is folded twice.

The scripts touch many keys in one call, so the store needs one Redis node (or
a primary with replicas), not a Redis Cluster.  A script runs atomically, so a
batch of 1000 entities holds Redis for its duration (a few milliseconds: about
three times the server time of the HGETALLs it replaces, for a fraction of the
client's CPU, which is what limits a Python worker).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from collections.abc import Set as AbstractSet
from types import MappingProxyType
from typing import Protocol

from redis.exceptions import NoScriptError

from ia.core.keys import Keys
from ia.features.aggregations import DROPPED, LAST_TS, LAST_VALUE, LATE
from ia.features.registry import DEFAULT_REGISTRY, SERIES_FIELD_PREFIX, FeatureRegistry, MetricPlan
from ia.features.series import SeriesState, rebaseline

DEFAULT_TTL_S = DEFAULT_REGISTRY.ttl_s
# Enough to cover any batch still unacknowledged when a worker dies; action
# decisions are rare, so this costs nothing for most entities.
MAX_REMEMBERED_DECISIONS = 8

Position = tuple[int, int, int]  # (partition, offset, newest event time folded)
_EMPTY: Mapping = MappingProxyType({})
_NONE: AbstractSet = frozenset()


@functools.lru_cache(maxsize=65_536)
def series_field(metric: str) -> bytes:
    return SERIES_FIELD_PREFIX + metric.encode()


class EntityRecord:
    """Everything stored for one entity, as loaded for a batch, plus what changed.

    A plain class with slots: one is built per entity per batch, so construction
    cost counts (a dataclass with default factories costs twice as much)."""

    __slots__ = ("blobs", "context", "decisions", "detectors", "dirty_context",
                 "dirty_decisions", "dirty_detectors", "dirty_position", "dirty_series",
                 "dropped_decisions", "plans", "position", "states")

    def __init__(self) -> None:
        # Packed series states as loaded, and the decoded (mutable) ones in use.
        self.blobs: dict[str, bytes] = {}
        self.states: dict[str, list] = {}
        self.plans: dict[str, MetricPlan] = {}
        self.dirty_series: set[str] = set()
        # The rest is usually empty: shared read-only empties until first written
        # (through the methods below), so building a record stays cheap.
        self.context: Mapping[str, str] = _EMPTY
        self.dirty_context: AbstractSet[str] = _NONE
        # Recent action decisions, oldest first, so a batch redelivered after a
        # crash republishes exactly what was decided the first time.
        self.decisions: Mapping[str, bytes] = _EMPTY
        self.dirty_decisions: AbstractSet[str] = _NONE
        self.dropped_decisions: AbstractSet[str] = _NONE
        # Opaque, versioned anomaly-detector state per metric, saved with the
        # features so the two never disagree after a crash or a rebalance.
        self.detectors: Mapping[str, bytes] = _EMPTY
        self.dirty_detectors: AbstractSet[str] = _NONE
        self.position: Position | None = None
        self.dirty_position = False

    # -- series state ------------------------------------------------------------------

    def state(self, metric: str, registry: FeatureRegistry = DEFAULT_REGISTRY) -> list:
        """The decoded state of one series (decoded once, then shared and mutated)."""
        st = self.states.get(metric)
        if st is None:
            plan = registry.plan(metric)
            blob = self.blobs.get(metric)
            st = plan.decode(blob) if blob is not None else plan.new()
            self.states[metric] = st
            self.plans[metric] = plan
        return st

    def metrics(self) -> set[str]:
        return set(self.blobs) | set(self.states)

    def get_series(self, metric: str) -> SeriesState:
        """The EWMA part of a series' state, as a value."""
        if metric not in self.states and metric not in self.blobs:
            return SeriesState()
        st = self.state(metric)
        e = self.plans[metric].ewma
        n, mean, var = (st[e.o], st[e.o + 1], st[e.o + 2]) if e else (0, 0.0, 0.0)
        return SeriesState(n=n, mean=mean, var=var, last_value=st[LAST_VALUE],
                           last_ts=st[LAST_TS], late=st[LATE], dropped=st[DROPPED])

    def put_series(self, metric: str, s: SeriesState) -> None:
        st = self.state(metric)
        e = self.plans[metric].ewma
        if e is not None:
            st[e.o], st[e.o + 1], st[e.o + 2] = s.n, s.mean, s.var
        st[LAST_VALUE], st[LAST_TS], st[LATE], st[DROPPED] = (s.last_value, s.last_ts,
                                                              s.late, s.dropped)
        self.dirty_series.add(metric)

    @property
    def series(self) -> dict[str, SeriesState]:
        return {m: self.get_series(m) for m in self.metrics()}

    # -- context, decisions, detector state ----------------------------------------------

    def put_context(self, name: str, value: str) -> None:
        self.context = {**self.context, name: value}
        self.dirty_context = {*self.dirty_context, name}

    def rebaseline(self, metric: str) -> None:
        """Forget a series' baseline but keep its level (after a level drift)."""
        self.put_series(metric, rebaseline(self.get_series(metric)))

    def detector(self, metric: str) -> bytes:
        """The packed detector state of one series (empty: none yet)."""
        return self.detectors.get(metric, b"")

    def put_detector(self, metric: str, blob: bytes) -> None:
        if self.detectors is _EMPTY:
            self.detectors, self.dirty_detectors = {}, set()
        self.detectors[metric] = blob  # type: ignore[index]
        self.dirty_detectors.add(metric)  # type: ignore[attr-defined]

    def remember_decision(self, decision_id: str, ts: int, payload: bytes) -> None:
        """Keep a decision (its JSON) so a redelivered event gets it back verbatim."""
        if decision_id in self.decisions:
            return
        decisions = dict(self.decisions)
        dirty, dropped = set(self.dirty_decisions), set(self.dropped_decisions)
        # The event-time prefix orders decisions after a reload (hash field
        # order is not insertion order in Redis).
        decisions[decision_id] = b"%020d|" % max(ts, 0) + payload
        dirty.add(decision_id)
        while len(decisions) > MAX_REMEMBERED_DECISIONS:
            oldest = next(iter(decisions))
            del decisions[oldest]
            dirty.discard(oldest)
            dropped.add(oldest)
        self.decisions, self.dirty_decisions, self.dropped_decisions = decisions, dirty, dropped

    def recall_decision(self, decision_id: str) -> bytes | None:
        raw = self.decisions.get(decision_id)
        return raw.split(b"|", 1)[1] if raw is not None else None

    # -- persistence ---------------------------------------------------------------------

    def changes(self) -> dict[bytes, bytes]:
        out = {}
        for m in self.dirty_series:
            self.blobs[m] = out[series_field(m)] = self.plans[m].encode(self.states[m])
        if self.dirty_context:
            out.update({f"c:{c}".encode(): self.context[c].encode() for c in self.dirty_context})
        if self.dirty_decisions:
            out.update({f"d:{d}".encode(): self.decisions[d] for d in self.dirty_decisions})
        if self.dirty_detectors:
            out.update({f"a:{m}".encode(): self.detectors[m] for m in self.dirty_detectors})
        if self.dirty_position and self.position is not None:
            out[b"p"] = b"%d:%d:%d" % self.position
        return out

    def deletions(self) -> list[bytes]:
        return [f"d:{d}".encode() for d in self.dropped_decisions]

    def dirty(self) -> bool:
        return bool(self.dirty_series or self.dirty_context or self.dirty_decisions
                    or self.dropped_decisions or self.dirty_detectors or self.dirty_position)

    def clean(self) -> None:
        self.dirty_series.clear()
        self.dirty_context = self.dirty_decisions = self.dropped_decisions = _NONE
        if self.dirty_detectors:
            self.dirty_detectors = set()
        self.dirty_position = False

    @classmethod
    def from_items(cls, items: Iterable[tuple[bytes, bytes]]) -> EntityRecord:
        rec = cls()
        context: dict[str, str] = {}
        decisions: dict[str, bytes] = {}
        detectors: dict[str, bytes] = {}
        for k, v in items:
            if k[:3] == SERIES_FIELD_PREFIX:
                rec.blobs[k[3:].decode()] = v
            elif k[:2] == b"c:":
                context[k[2:].decode()] = v.decode()
            elif k == b"p":
                part, off, ts = v.split(b":")
                rec.position = (int(part), int(off), int(ts))
            elif k[:2] == b"d:":
                decisions[k[2:].decode()] = v
            elif k[:2] == b"a:":
                detectors[k[2:].decode()] = v
        if context:
            rec.context = context
        if decisions:
            rec.decisions = dict(sorted(decisions.items(), key=lambda kv: kv[1][:20]))
        if detectors:
            rec.detectors, rec.dirty_detectors = detectors, set()
        return rec

    @classmethod
    def from_hash(cls, raw: dict[bytes, bytes]) -> EntityRecord:
        return cls.from_items(raw.items())


def _pairs(flat: list[bytes]) -> Iterable[tuple[bytes, bytes]]:
    """HGETALL's flat [field, value, field, value, ...] as pairs (no copies)."""
    it = iter(flat)
    return zip(it, it, strict=True)


class FeatureStore(Protocol):
    async def load(self, entities: Iterable[str]) -> dict[str, EntityRecord]: ...

    async def save(self, records: dict[str, EntityRecord]) -> None: ...

    async def incr_context(self, entity: str, name: str, amount: int = 1) -> None: ...

    async def set_context(self, entity: str, values: dict[str, str]) -> None: ...

    async def record_action(self, entity: str, action_type: str, status: str,
                            finished_at: int) -> None: ...


def newer_action(current: bytes | None, finished_at: int) -> bool:
    """Whether an outcome finished at ``finished_at`` replaces ``current`` (a stale
    outcome delivered again, or out of order, must not hide a newer one)."""
    if current is None:
        return True
    try:
        return finished_at >= int(current.rsplit(b":", 1)[1])
    except (IndexError, ValueError):
        return True


class MemoryFeatureStore:
    """Same interface and bytes as the Redis store, for replay and tests."""

    def __init__(self) -> None:
        self._hashes: dict[str, dict[bytes, bytes]] = {}

    async def load(self, entities: Iterable[str]) -> dict[str, EntityRecord]:
        return {e: EntityRecord.from_items(self._hashes.get(e, {}).items())
                for e in dict.fromkeys(entities)}

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

    async def record_action(self, entity: str, action_type: str, status: str,
                            finished_at: int) -> None:
        h = self._hashes.setdefault(entity, {})
        if newer_action(h.get(b"c:last_action"), finished_at):
            h[b"c:last_action"] = f"{action_type}:{status}:{finished_at}".encode()

    def raw(self, entity: str) -> dict[bytes, bytes]:
        """The entity's hash, as Redis would hold it (for comparisons in tests)."""
        return dict(self._hashes.get(entity, {}))


# One call reads every entity of a batch: a pipeline of HGETALLs costs a
# coroutine and a reply callback per key in redis-py, the script one reply.
_LOAD = """
local out = {}
for i, key in ipairs(KEYS) do out[i] = redis.call('HGETALL', key) end
return out
"""
# ARGV: ttl, then per key: #fields, #deletions, field, value, ..., deleted field, ...
_SAVE = """
local ttl, a = tonumber(ARGV[1]), 2
for _, key in ipairs(KEYS) do
  local nset, ndel = tonumber(ARGV[a]), tonumber(ARGV[a + 1])
  a = a + 2
  if nset > 0 then redis.call('HSET', key, unpack(ARGV, a, a + 2 * nset - 1)) end
  a = a + 2 * nset
  if ndel > 0 then redis.call('HDEL', key, unpack(ARGV, a, a + ndel - 1)) end
  a = a + ndel
  if ttl > 0 then redis.call('EXPIRE', key, ttl) end
end
return #KEYS
"""
# KEYS[1]; ARGV: new value, its finished_at.  Keeps the newer of the two.
_LAST_ACTION = """
local cur = redis.call('HGET', KEYS[1], 'c:last_action')
if cur then
  local t = tonumber(string.match(cur, ':(%-?%d+)$'))
  if t and t > tonumber(ARGV[2]) then return 0 end
end
redis.call('HSET', KEYS[1], 'c:last_action', ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


class _Script:
    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    async def __call__(self, client, keys: list, args: list):
        try:
            return await client.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted Redis: load it once, then as before
            await client.script_load(self.source)
            return await client.evalsha(self.sha, len(keys), *keys, *args)


LOAD_SCRIPT, SAVE_SCRIPT, LAST_ACTION_SCRIPT = _Script(_LOAD), _Script(_SAVE), _Script(
    _LAST_ACTION)


class RedisFeatureStore:
    """Online store on Redis (``redis.asyncio`` client, ``decode_responses=False``)."""

    def __init__(self, client, prefix: str = "ia", ttl_s: int = DEFAULT_TTL_S) -> None:
        self.client = client
        self.keys = Keys(prefix)
        self.ttl_s = ttl_s

    async def load_scripts(self) -> None:
        """Cache the scripts in Redis now (else the first call of each does it)."""
        for script in (LOAD_SCRIPT, SAVE_SCRIPT, LAST_ACTION_SCRIPT):
            await self.client.script_load(script.source)

    async def load(self, entities: Iterable[str]) -> dict[str, EntityRecord]:
        names = list(dict.fromkeys(entities))
        if not names:
            return {}
        # Arguments go as bytes: redis-py's asyncio packer is Python, and bytes are
        # its cheapest case (a batch sends thousands of arguments).
        raws = await LOAD_SCRIPT(self.client, [self.keys.entity(e).encode() for e in names], [])
        return {e: EntityRecord.from_items(_pairs(raw)) for e, raw in zip(names, raws,
                                                                          strict=True)}

    async def save(self, records: dict[str, EntityRecord]) -> None:
        keys: list[bytes] = []
        args: list[bytes] = [b"%d" % self.ttl_s]
        for entity, rec in records.items():
            if not rec.dirty():
                continue
            changes, deletions = rec.changes(), rec.deletions()
            keys.append(self.keys.entity(entity).encode())
            args += (b"%d" % len(changes), b"%d" % len(deletions))
            for item in changes.items():
                args += item
            args += deletions
        if keys:
            await SAVE_SCRIPT(self.client, keys, args)
        for rec in records.values():
            rec.clean()

    async def incr_context(self, entity: str, name: str, amount: int = 1) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hincrby(self.keys.entity(entity), f"c:{name}", amount)
            pipe.expire(self.keys.entity(entity), self.ttl_s)
            await pipe.execute()

    async def set_context(self, entity: str, values: dict[str, str]) -> None:
        async with self.client.pipeline(transaction=False) as pipe:
            pipe.hset(self.keys.entity(entity),
                      mapping={f"c:{k}": v for k, v in values.items()})
            pipe.expire(self.keys.entity(entity), self.ttl_s)
            await pipe.execute()

    async def record_action(self, entity: str, action_type: str, status: str,
                            finished_at: int) -> None:
        """Set ``c:last_action`` unless a newer outcome is already there (atomic)."""
        await LAST_ACTION_SCRIPT(self.client, [self.keys.entity(entity)],
                                 [f"{action_type}:{status}:{finished_at}", finished_at,
                                  self.ttl_s])
