"""Cumulative OTLP points -> per-interval deltas, with the previous point kept in Redis.

A monotonic cumulative sum (a counter) and a cumulative histogram say what happened
since their start; ``ia`` wants what happened since the previous point (a rate, the
quantiles of the last interval).  That needs the series' previous point, and it must
survive a restart of ``ia ingest`` and the move of a partition to another instance --
the OpenTelemetry Collector's Kafka exporter does not key records by series, so one
series may arrive on any partition -- hence Redis, not memory, and not the feature
store: the feature store lives in the worker, downstream of the event this produces
(its ``rate_of_change`` is neither reset-aware nor what the event's value should be).

Each series keeps its last :data:`KEEP` points, newest last, in one string
(``Keys.cumulative``), updated atomically by one Lua script per point:

* a point newer than the newest is appended; the newest before it is returned;
* an older point (the Collector's records of one series on two partitions, read in
  another order than written) is put in its place in time and the point before it
  there is returned, so it still gets its own delta -- unless it is older than every
  kept point of a full history: then it is ``stale`` (out of order beyond the
  history) and dropped;
* a point already kept (a record delivered again after a crash before its offset
  was committed) returns the point that preceded it when it was first recorded
  (kept beside it), so its delta -- and the event id derived from it -- comes out the
  same as the first time, whatever arrived since.

A delta is reset-aware: a value below the previous one, a changed start time or
changed histogram bounds mean the series restarted, and the delta is the new
cumulative value itself, over the time since the restart (its start time) when that
is after the previous point.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from typing import Protocol

from ia.core.keys import Keys

KEEP = 16

#: What the Lua script answers for a point, besides the previous point.
FIRST, NEW, REPLAY, STALE = "first", "new", "replay", "stale"

_SCRIPT = """
local raw = redis.call('GET', KEYS[1])
local h = {}
if raw then h = cjson.decode(raw) end
local t = tonumber(ARGV[1])
local keep = tonumber(ARGV[4])
local function answer(status, prev)
  if prev then return {status, prev[2], tostring(prev[1])} end
  return {'first'}
end
for i = #h, 1, -1 do
  if h[i][1] == t then
    local before = h[i][3]
    if before == nil then return answer('replay', h[i - 1]) end
    for j = i - 1, 1, -1 do
      if h[j][1] == before then return answer('replay', h[j]) end
    end
    return {'first'}
  end
end
if #h >= keep and t < h[1][1] then return {'stale'} end
local at = #h + 1
while at > 1 and h[at - 1][1] > t do at = at - 1 end
local prev = h[at - 1]
table.insert(h, at, {t, ARGV[2], prev and prev[1] or -1})
while #h > keep do table.remove(h, 1) end
redis.call('SET', KEYS[1], cjson.encode(h), 'EX', ARGV[3])
return answer('new', prev)
"""


@dataclass(frozen=True)
class CumulativePoint:
    """One cumulative point of a series: a counter's ``(value,)`` or a histogram's
    ``(count, sum, *bucket_counts)`` with its ``bounds``."""

    series: str
    start_ms: int
    ts_ms: int
    values: tuple[float, ...]
    bounds: tuple[float, ...] = ()

    @property
    def series_id(self) -> str:
        return hashlib.sha256(self.series.encode()).hexdigest()[:32]

    def entry(self) -> str:
        """The point as stored (its time is stored beside it)."""
        return json.dumps([self.start_ms, list(self.values), list(self.bounds)])


@dataclass(frozen=True)
class Previous:
    ts_ms: int
    start_ms: int
    values: tuple[float, ...]
    bounds: tuple[float, ...]

    @classmethod
    def parse(cls, ts: str | bytes, entry: str | bytes) -> Previous:
        start, values, bounds = json.loads(entry)
        return cls(int(ts), int(start), tuple(values), tuple(bounds))


@dataclass(frozen=True)
class Delta:
    """What happened in a series between two points: ``values`` over ``seconds``."""

    values: tuple[float, ...]
    seconds: float
    reset: bool


def delta(prev: Previous | None, point: CumulativePoint) -> Delta | None:
    """The change from ``prev`` to ``point`` (None for a first point or no time between)."""
    if prev is None:
        return None
    restarted = (
        (point.start_ms and prev.start_ms and point.start_ms != prev.start_ms)
        or len(point.values) != len(prev.values) or point.bounds != prev.bounds
        or any(v < p for v, p in zip(point.values, prev.values, strict=False)))
    if restarted:
        since = point.start_ms if point.start_ms > prev.ts_ms else prev.ts_ms
        values = point.values
    else:
        since, values = prev.ts_ms, tuple(v - p for v, p in zip(point.values, prev.values,
                                                                 strict=True))
    seconds = (point.ts_ms - since) / 1000.0
    if seconds <= 0 or not all(math.isfinite(v) for v in values):
        return None
    return Delta(values, seconds, bool(restarted))


class CumulativeStore(Protocol):
    async def previous(self, points: list[CumulativePoint]) -> list[tuple[str, Previous | None]]:
        """For each point, in order: its status (:data:`FIRST`, :data:`NEW`,
        :data:`REPLAY`, :data:`STALE`) and the point before it, recording it."""


class RedisCumulativeStore:
    """:class:`CumulativeStore` on Redis (module docstring), one pipeline per batch."""

    def __init__(self, client, prefix: str, ttl_s: float) -> None:  # type: ignore[no-untyped-def]
        self.client = client
        self.keys = Keys(prefix)
        self.ttl_s = max(1, int(ttl_s))
        self.script = client.register_script(_SCRIPT)

    async def previous(self, points: list[CumulativePoint]) -> list[tuple[str, Previous | None]]:
        if not points:
            return []
        pipe = self.client.pipeline(transaction=False)
        for p in points:
            await self.script(keys=[self.keys.cumulative(p.series_id)],
                              args=[p.ts_ms, p.entry(), self.ttl_s, KEEP], client=pipe)
        return [_answer(reply) for reply in await pipe.execute()]


def _answer(reply: list) -> tuple[str, Previous | None]:
    status = reply[0].decode() if isinstance(reply[0], bytes) else str(reply[0])
    if status in (NEW, REPLAY):
        return status, Previous.parse(reply[2], reply[1])
    return status, None


class MemoryCumulativeStore:
    """The same answers in memory (unit tests, offline conversion)."""

    def __init__(self) -> None:
        # Per series, oldest first: (time, entry, time of the point before it when it
        # was recorded, or -1).
        self.series: dict[str, list[tuple[int, str, int]]] = {}

    async def previous(self, points: list[CumulativePoint]) -> list[tuple[str, Previous | None]]:
        return [self._one(p) for p in points]

    def _one(self, p: CumulativePoint) -> tuple[str, Previous | None]:
        h = self.series.setdefault(p.series_id, [])
        for i in range(len(h) - 1, -1, -1):
            if h[i][0] == p.ts_ms:
                before = next((e for e in h[:i] if e[0] == h[i][2]), None)
                return (REPLAY, _previous(before)) if before else (FIRST, None)
        if len(h) >= KEEP and p.ts_ms < h[0][0]:
            return STALE, None
        at = len(h)
        while at > 0 and h[at - 1][0] > p.ts_ms:
            at -= 1
        prev = h[at - 1] if at else None
        h.insert(at, (p.ts_ms, p.entry(), prev[0] if prev else -1))
        del h[:-KEEP]
        return (NEW, _previous(prev)) if prev else (FIRST, None)


def _previous(kept: tuple[int, str, int]) -> Previous:
    return Previous.parse(str(kept[0]), kept[1])
