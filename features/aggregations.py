"""Aggregations over one series' samples, in event time, on a flat state list.

A series' whole state is one flat Python list (see :class:`ia.features.registry.
MetricPlan`): a few core values, then one segment per stateful definition.
Each aggregation here is bound to the offset of its segment and works on that
list in place, so a batch unpacks a series once, touches plain floats per
sample, and packs it once (one ``struct`` call each way).

Every aggregation compiles to one ``step`` per sample: serve the features
from the state *before* the sample (data with time <= t only), then fold the
sample in -- in-order samples, and late ones within the allowed lateness
(:meth:`ia.features.registry.MetricPlan.observe` decides which).  What is exact:

* window, quantile, seasonal: the same result whatever the arrival order of
  samples within the allowed lateness (up to float rounding of sums).
* EWMA: defined over the in-order samples only (those that advance the
  watermark); a late sample is served the current baseline and not folded.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable, Mapping, Sequence
from math import sqrt

from ia.features.definitions import NEVER_S, Aggregation, FeatureDef
from ia.features.series import (
    ABSOLUTE_STD_FLOOR,
    RELATIVE_STD_FLOOR,
    ewma_step,
    saturate,
)

# Core values at the start of every series state (after the layout header).
LAST_VALUE, LAST_TS, LATE, DROPPED = 1, 2, 3, 4
CORE_FORMAT = "dqII"
CORE_FRESH: tuple = (0.0, -1, 0, 0)
NO_TIME = -(2**62)
HOUR_MS = 3_600_000
SLOTS = 168  # hours in a week
# Epoch hour 0 was a Thursday 00:00 UTC; slot 0 is Monday 00:00 UTC.
THURSDAY_SLOT = 72
_F32 = struct.Struct("<f")
_F16 = struct.Struct("<e")
_f32_pack, _f32_unpack = _F32.pack, _F32.unpack
F32_MAX = 3.4028234663852886e38
EMPTY_PROFILE = _F16.pack(math.nan) * SLOTS
NO_SCALE = -32768
U32_MAX = 2**32 - 1

Out = dict[str, float]


def as_float32(x: float) -> float:
    """``x`` rounded to float32 (as stored) when folded, so a state is the same whether
    or not it went through Redis between two samples; beyond float32, its largest."""
    try:
        return _f32_unpack(_f32_pack(x))[0]
    except OverflowError:
        return math.copysign(F32_MAX, x)


def hour_of_week(ts_ms: int) -> int:
    return (ts_ms // HOUR_MS + THURSDAY_SLOT) % SLOTS


# What a sample does to the state (decided once per sample by MetricPlan.observe).
SERVE_ONLY, FOLD_IN_ORDER, FOLD_LATE = 0, 1, 2
_FMAX = 1.7976931348623157e308

# step(state, value, t, watermark, out, mode): serve features into ``out`` from the
# state as it is, then (unless mode is SERVE_ONLY) fold the sample in.
Step = Callable[[list, float, int, int, Out, int], None]


class SeriesAgg:
    """A stateful aggregation: ``fmt``/``fresh`` describe its segment of the state.

    :meth:`compile` returns the per-sample ``step`` as a closure over the
    segment's offsets and output names: the hot path then does no attribute
    lookups or method calls (a third of its cost in CPython).
    """

    fmt: str = ""

    def __init__(self, d: FeatureDef, lateness_ms: int) -> None:
        self.d = d
        self.lateness_ms = lateness_ms
        self.o = -1  # offset of the segment in the flat state, set by bind()
        self.ttl_ms = d.ttl_s * 1000

    def fresh(self) -> list:
        raise NotImplementedError

    def bind(self, offset: int) -> None:
        self.o = offset

    def reset(self, st: list) -> None:
        st[self.o:self.o + len(self.fresh())] = self.fresh()

    def compile(self) -> Step:
        raise NotImplementedError


class Derived:
    """A stateless per-series feature computed from the core values."""

    def __init__(self, d: FeatureDef) -> None:
        self.d = d

    def compile(self) -> Step:
        raise NotImplementedError


# --- EWMA -------------------------------------------------------------------------------


class Ewma(SeriesAgg):
    fmt = "Idd"  # n, mean, var

    def __init__(self, d: FeatureDef, lateness_ms: int) -> None:
        super().__init__(d, lateness_ms)
        self.k_n, self.k_mean, self.k_std, self.k_z = d.outputs

    def fresh(self) -> list:
        return [0, 0.0, 0.0]

    def compile(self) -> Step:
        o, o1, o2 = self.o, self.o + 1, self.o + 2
        k_n, k_mean, k_std, k_z = self.d.outputs
        half_life_s = self.d.window_s

        def step(st: list, v: float, t: int, wm: int, out: Out, mode: int) -> None:
            n = st[o]
            if n:
                mean, var = st[o1], st[o2]
                # series.floored_std, inlined (hot path)
                std = sqrt(var) if var > 0.0 else 0.0
                floor = (mean if mean >= 0.0 else -mean) * RELATIVE_STD_FLOOR
                if floor < ABSOLUTE_STD_FLOOR:
                    floor = ABSOLUTE_STD_FLOOR
                if std < floor:
                    std = floor
                z = (v - mean) / std
                out[k_n] = float(n)
                out[k_mean] = mean
                out[k_std] = std
                out[k_z] = z if -_FMAX <= z <= _FMAX else saturate(z)
            else:
                out[k_n], out[k_mean], out[k_std], out[k_z] = 0.0, v, 0.0, 0.0
            # An EWMA cannot take a sample back in time: late ones are not folded
            # (unless the baseline is empty, e.g. after a version bump).
            if mode == FOLD_IN_ORDER or (mode == FOLD_LATE and not n):
                st[o1], st[o2] = ewma_step(n, st[o1], st[o2], wm, v, t, half_life_s)
                if n < U32_MAX:  # stored as u32; past warm-up the count is only shown
                    st[o] = n + 1

        return step


class Rate(Derived):
    def compile(self) -> Step:
        key = self.d.outputs[0]

        def step(st: list, v: float, t: int, wm: int, out: Out, mode: int) -> None:
            # First sample, or a late one whose previous sample is unknown: neutral.
            if t <= wm or wm < 0:
                out[key] = 0.0
                return
            r = (v - st[LAST_VALUE]) / ((t - wm) / 1000.0)  # as tests/reference.features_before
            out[key] = r if -_FMAX <= r <= _FMAX else saturate(r)

        return step


class SinceLast(Derived):
    def compile(self) -> Step:
        key = self.d.outputs[0]

        def step(st: list, v: float, t: int, wm: int, out: Out, mode: int) -> None:
            out[key] = 0.0 if t <= wm or wm < 0 else (t - wm) / 1000.0

        return step


# --- bucketed sliding window -----------------------------------------------------------


class Window(SeriesAgg):
    """``buckets`` time buckets of ``window_s / buckets`` seconds in a ring.

    Per bucket: count, sum, min and max.  At time t the window is bucket(t) and
    the ``buckets - 1`` before it that are still in the ring.  A late sample
    (before the watermark) is served without its own bucket, which may hold
    newer samples, so served data is always <= t.
    """

    def __init__(self, d: FeatureDef, lateness_ms: int) -> None:
        super().__init__(d, lateness_ms)
        self.n = d.buckets
        self.w = int(d.bucket_s * 1000)
        self.fmt = f"q{self.n}I{self.n}d{self.n}d{self.n}d"

    def fresh(self) -> list:
        n = self.n
        return [NO_TIME, *[0] * n, *[0.0] * n, *[math.inf] * n, *[-math.inf] * n]

    def bind(self, offset: int) -> None:
        super().bind(offset)
        n = self.n
        self.c0 = offset + 1          # counts
        self.s0 = self.c0 + n         # sums
        self.lo0 = self.s0 + n        # minima
        self.hi0 = self.lo0 + n       # maxima
        self.end = self.hi0 + n

    def totals(self, st: Sequence, t: int, wm: int, base: int) -> tuple[int, float, float,
                                                                         float]:
        """Count, sum, min and max of the window at ``t``, from the segment starting at
        ``st[base]`` (``self.o`` in a full state; 0 in a segment read on its own)."""
        n = self.n
        b, head = t // self.w, st[base]
        c0, s0, lo0, hi0 = base + 1, base + 1 + n, base + 1 + 2 * n, base + 1 + 3 * n
        if b == head and t >= wm:  # the common case: every bucket, nothing newer than t
            return (sum(st[c0:s0]), sum(st[s0:lo0]), min(st[lo0:hi0]),
                    max(st[hi0:hi0 + n]))
        last = min(b, head) if t >= wm else min(b - 1, head)
        cnt, total, lo, hi = 0, 0.0, math.inf, -math.inf
        for bid in range(max(b, head) - n + 1, last + 1):
            i = bid % n
            c = st[c0 + i]
            if c:
                cnt += c
                total += st[s0 + i]
                lo = min(lo, st[lo0 + i])
                hi = max(hi, st[hi0 + i])
        return cnt, total, lo, hi

    def sum_at(self, head: int, sums: Sequence[float], t: int, wm: int) -> float:
        """The window's sum at ``t`` from the ring's head and per-bucket sums alone
        (what a ratio needs; empty buckets sum to 0, so counts are not needed)."""
        b, n = t // self.w, self.n
        if b == head and t >= wm:
            return sum(sums)
        last = min(b, head) if t >= wm else min(b - 1, head)
        return sum(sums[bid % n] for bid in range(max(b, head) - n + 1, last + 1))

    def _advance(self, st: list, b: int) -> None:
        head, n = st[self.o], self.n
        for bid in range(max(head + 1, b - n + 1), b + 1):
            i = bid % n
            st[self.c0 + i], st[self.s0 + i] = 0, 0.0
            st[self.lo0 + i], st[self.hi0 + i] = math.inf, -math.inf
        st[self.o] = b

    def compile(self) -> Step:
        o, n, w = self.o, self.n, self.w
        c0, s0, lo0, hi0, end = self.c0, self.s0, self.lo0, self.hi0, self.end
        k_count, k_mean, k_min, k_max = self.d.outputs
        totals, advance = self.totals, self._advance

        def step(st: list, v: float, t: int, wm: int, out: Out, mode: int) -> None:
            b = t // w
            head = st[o]
            if b == head and t >= wm:
                cnt = sum(st[c0:s0])
                total, lo, hi = sum(st[s0:lo0]), min(st[lo0:hi0]), max(st[hi0:end])
            else:
                cnt, total, lo, hi = totals(st, t, wm, o)
            if cnt:
                mean = total / cnt
                out[k_count] = float(cnt)
                out[k_mean] = mean if -_FMAX <= mean <= _FMAX else saturate(mean)
                out[k_min] = lo
                out[k_max] = hi
            else:  # an empty window: neutral values, as for a first sample
                out[k_count] = 0.0
                out[k_mean] = out[k_min] = out[k_max] = v
            if not mode:
                return
            if b > head:
                advance(st, b)
            elif b <= head - n:
                return  # older than the ring (only after the window's state was reset)
            i = b % n
            st[c0 + i] += 1
            st[s0 + i] += v
            if v < st[lo0 + i]:
                st[lo0 + i] = v
            if v > st[hi0 + i]:
                st[hi0 + i] = v

        return step


# --- quantiles of the most recent samples ------------------------------------------------


def quantile_sorted(xs: list[float], q: float) -> float:
    """numpy's default (linear) quantile of sorted ``xs``."""
    pos = q * (len(xs) - 1)
    lo = int(pos)
    frac = pos - lo
    if frac == 0.0:
        return xs[lo]
    a, b = xs[lo], xs[lo + 1]
    return a + (b - a) * frac if frac < 0.5 else b - (b - a) * (1.0 - frac)


class Quantile(SeriesAgg):
    """Exact quantiles of the ``samples`` most recent samples (by event time).

    Values are kept as float32, timestamps as offsets (+1) from a base so each
    takes 8 bytes.  A late sample enters if it is newer than the oldest kept
    one, which is exactly the set a sorted stream would keep.  Serving a late
    sample uses the kept samples at or before it (fewer than ``samples`` if
    newer ones pushed older ones out: the one approximate case).
    """

    def __init__(self, d: FeatureDef, lateness_ms: int) -> None:
        super().__init__(d, lateness_ms)
        self.k = d.samples
        self.fmt = f"qB{self.k}f{self.k}I"

    def fresh(self) -> list:
        return [NO_TIME, 0, *[0.0] * self.k, *[0] * self.k]

    def bind(self, offset: int) -> None:
        super().bind(offset)
        self.v0 = offset + 2
        self.r0 = self.v0 + self.k

    def _rebase(self, st: list, t: int) -> None:
        # Offsets are u32 milliseconds (~49 days): move the base up, and let samples
        # older than the new base collapse to 0 ("older than anything that can arrive").
        base = t - self.lateness_ms
        shift = base - st[self.o]
        r0 = self.r0
        st[r0:r0 + self.k] = [max(0, r - shift) for r in st[r0:r0 + self.k]]
        st[self.o] = base

    def compile(self) -> Step:
        o, o1, k, v0, r0 = self.o, self.o + 1, self.k, self.v0, self.r0
        r1 = r0 + k
        named = tuple(zip(self.d.outputs, self.d.quantiles, strict=True))
        # When all k samples are there (the steady state): where each quantile falls.
        full = tuple((name, int(q * (k - 1)), q * (k - 1) - int(q * (k - 1)))
                     for name, q in named)
        lateness, rebase = self.lateness_ms, self._rebase

        def step(st: list, v: float, t: int, wm: int, out: Out, mode: int) -> None:
            filled = st[o1]
            if filled == k and t >= wm:
                xs = sorted(st[v0:r0])
                for name, lo, frac in full:  # quantile_sorted, inlined
                    a = xs[lo]
                    if frac == 0.0:
                        out[name] = a
                    else:
                        b = xs[lo + 1]
                        out[name] = a + (b - a) * frac if frac < 0.5 else \
                            b - (b - a) * (1.0 - frac)
            else:
                if t >= wm:
                    xs = sorted(st[v0:v0 + filled])
                else:
                    limit = t - st[o] + 1
                    xs = sorted(x for x, r in zip(st[v0:v0 + filled], st[r0:r0 + filled],
                                                  strict=True) if r <= limit)
                for name, q in named:
                    out[name] = quantile_sorted(xs, q) if xs else v
            if not mode:
                return
            if st[o] == NO_TIME:
                st[o] = t - lateness
            rel = t - st[o] + 1
            if rel > U32_MAX:
                rebase(st, t)
                rel = t - st[o] + 1
            if filled < k:
                st[v0 + filled] = as_float32(v)
                st[r0 + filled] = rel
                st[o1] = filled + 1
                return
            offs = st[r0:r1]
            oldest = min(offs)
            if rel > oldest:
                i = offs.index(oldest)
                st[v0 + i] = as_float32(v)
                st[r0 + i] = rel

        return step


# --- hour-of-week seasonal profile -------------------------------------------------------


class Seasonal(SeriesAgg):
    """An hour-of-week profile of hourly means.

    Samples are summed per hour (two accumulators: with an allowed lateness
    under an hour at most two hours can still receive samples).  An hour is
    closed once the watermark passes its end plus the allowed lateness: its
    mean then updates its slot, ``slot += alpha * (mean - slot)`` (the first
    week sets it).  Slots are float16 scaled by a per-series power of two
    (relative precision 2**-11, any magnitude).  Only closed hours are served,
    all of which ended at or before the sample's time.
    """

    fmt = f"hiIdiId{2 * SLOTS}s"

    def __init__(self, d: FeatureDef, lateness_ms: int,
                 baseline: tuple[str, str] | None = None) -> None:
        super().__init__(d, lateness_ms)
        # Output names of the series' EWMA mean and std: the fallback before an
        # hour is known, and the scale of the seasonal z-score.
        self.baseline = baseline

    def fresh(self) -> list:
        return [NO_SCALE, -1, 0, 0.0, -1, 0, 0.0, EMPTY_PROFILE]

    def slot_value(self, st: list, slot: int) -> float:
        raw = _F16.unpack_from(st[self.o + 7], 2 * slot)[0]
        return raw if raw != raw else math.ldexp(raw, st[self.o])  # NaN: not known yet

    def _close_due(self, st: list, now: int) -> None:
        o = self.o
        for a in (o + 1, o + 4):  # (hour, count, sum) accumulators
            if st[a + 1] and now >= (st[a] + 1) * HOUR_MS + self.lateness_ms:
                self._close(st, st[a], st[a + 2] / st[a + 1])
                st[a], st[a + 1], st[a + 2] = -1, 0, 0.0

    def _close(self, st: list, hour: int, mean: float) -> None:
        slot = (hour + THURSDAY_SLOT) % SLOTS
        old = self.slot_value(st, slot)
        new = mean if math.isnan(old) else old + self.d.alpha * (mean - old)
        if not math.isfinite(new):
            return
        if st[self.o] == NO_SCALE:
            st[self.o] = math.frexp(new)[1] - 1 if new else 0
        profile = bytearray(st[self.o + 7])
        try:
            _F16.pack_into(profile, 2 * slot, math.ldexp(new, -st[self.o]))
        except OverflowError:
            profile = self._rescale(st, profile, new)
            _F16.pack_into(profile, 2 * slot, math.ldexp(new, -st[self.o]))
        st[self.o + 7] = bytes(profile)

    def _rescale(self, st: list, profile: bytearray, new: float) -> bytearray:
        # A value 2**15 times the first one: re-express every slot on a larger
        # scale (the small ones lose precision, which they had relative to it).
        old_exp, exp = st[self.o], math.frexp(new)[1] - 1
        for slot in range(SLOTS):
            raw = _F16.unpack_from(profile, 2 * slot)[0]
            if not math.isnan(raw):
                _F16.pack_into(profile, 2 * slot, math.ldexp(raw, old_exp - exp))
        st[self.o] = exp
        return profile

    def _fold(self, st: list, v: float, t: int) -> None:
        hour, o = t // HOUR_MS, self.o
        for a in (o + 1, o + 4):
            if st[a + 1] and st[a] == hour:
                st[a + 1] += 1
                st[a + 2] += v
                return
        for a in (o + 1, o + 4):
            if not st[a + 1]:
                st[a], st[a + 1], st[a + 2] = hour, 1, v
                return
        # Both busy with other hours: only after a reset of this state; close the
        # older one early rather than lose the sample.
        a = o + 1 if st[o + 1] < st[o + 4] else o + 4
        self._close(st, st[a], st[a + 2] / st[a + 1])
        st[a], st[a + 1], st[a + 2] = hour, 1, v

    def compile(self) -> Step:
        o, exp_at, prof_at = self.o, self.o, self.o + 7
        ha, ca, sa, hb, cb, sb = o + 1, o + 2, o + 3, o + 4, o + 5, o + 6
        k_mean, k_z = self.d.outputs
        k_base, k_std = self.baseline or ("", "")
        lateness, close_due, fold = self.lateness_ms, self._close_due, self._fold
        unpack_from, ldexp = _F16.unpack_from, math.ldexp

        def step(st: list, v: float, t: int, wm: int, out: Out, mode: int) -> None:
            now = t if t > wm else wm
            if (st[ca] and now >= (st[ha] + 1) * HOUR_MS + lateness) or \
                    (st[cb] and now >= (st[hb] + 1) * HOUR_MS + lateness):
                close_due(st, now)
            hour = t // HOUR_MS
            if mode == FOLD_IN_ORDER:  # the common case, inline: an hour already open
                if st[ca] and st[ha] == hour:
                    st[ca] += 1
                    st[sa] += v
                    mode = SERVE_ONLY
                elif st[cb] and st[hb] == hour:
                    st[cb] += 1
                    st[sb] += v
                    mode = SERVE_ONLY
            raw = unpack_from(st[prof_at], 2 * ((hour + THURSDAY_SLOT) % SLOTS))[0]
            # NaN: this hour of the week has not been seen yet.
            mean = ldexp(raw, st[exp_at]) if raw == raw else (out[k_base] if k_base else v)
            std = out[k_std] if k_std else 0.0
            out[k_mean] = mean
            z = (v - mean) / std if std > 0.0 else 0.0
            out[k_z] = z if -_FMAX <= z <= _FMAX else saturate(z)
            if mode:
                fold(st, v, t)

        return step


# --- entity context: discrete events, feedback counters, the last action ------------------

# Recent occurrences kept per discrete event name, so an event served a little
# out of order still finds the latest occurrence at or before its time.
RECENT_EVENTS = 2
FAILED_STATUSES = frozenset({"failed", "timeout"})


class EntityContext:
    """An entity's context fields (``c:*`` in its hash), parsed once per batch."""

    __slots__ = ("counters", "last_action", "times")

    def __init__(self, context: Mapping[str, str]) -> None:
        self.times: dict[str, list[int]] = {}
        self.counters: dict[str, float] = {}
        self.last_action: tuple[str, int] | None = None  # (status, finished_at)
        for key, raw in context.items():
            if key[:6] == "event:":
                times = _times(raw)
                if times is not None:
                    self.times[key[6:]] = times
            elif key == "last_action":
                self.last_action = parse_last_action(raw)
            else:
                number = _number(raw)
                if number is not None:  # a free-form note is not a counter
                    self.counters[key] = number

    def record_event(self, name: str, ts: int) -> str | None:
        """Remember an occurrence; the new field value, or None if nothing changed."""
        seen = self.times.setdefault(name, [])
        if ts in seen or (len(seen) >= RECENT_EVENTS and ts < seen[-1]):
            return None
        seen.append(ts)
        seen.sort(reverse=True)
        del seen[RECENT_EVENTS:]
        return ",".join(map(str, seen))


# Plain try/except helpers rather than contextlib.suppress: parsing runs for every
# entity with context in every batch, and a context manager costs more than it.
def _times(raw: str) -> list[int] | None:
    try:
        return list(map(int, raw.split(","))) if raw else []
    except ValueError:
        return None  # unreadable: as if it never happened


def _number(raw: str) -> float | None:
    try:
        return float(raw)
    except ValueError:
        return None


def parse_last_action(raw: str) -> tuple[str, int] | None:
    """``{action_type}:{status}:{finished_at_ms}`` (store.record_action) -> (status, time)."""
    parts = raw.rsplit(":", 2)
    try:
        return parts[1], int(parts[2])
    except (IndexError, ValueError):
        return None


ContextServe = Callable[[EntityContext, int, Out], None]


def _latest(times: dict[str, list[int]], names: tuple[str, ...], t: int) -> int | None:
    """The newest occurrence of any of ``names`` at or before ``t`` (lists newest first)."""
    best = None
    for name in names:
        for ts in times.get(name, ()):
            if ts <= t:
                if best is None or ts > best:
                    best = ts
                break
    return best


def compile_context(defs: list[FeatureDef]) -> ContextServe:
    """One function serving every entity-level definition (since_event, event_within,
    counter, last_action) from an :class:`EntityContext` at event time t.

    It starts from the neutral values (nothing happened, no counts) and overwrites
    only what the entity has, which is usually one or two things."""
    since = tuple((d.outputs[0], d.sources) for d in defs
                  if d.aggregation is Aggregation.since_event)
    within = tuple((d.outputs[0], d.sources, d.window_s * 1000) for d in defs
                   if d.aggregation is Aggregation.event_within)
    counters = tuple(pair for d in defs if d.aggregation is Aggregation.counter
                     for pair in zip(d.outputs, d.sources, strict=True))
    actions = tuple(d.outputs for d in defs if d.aggregation is Aggregation.last_action)
    neutral: Out = {key: NEVER_S for key, _ in since}
    neutral.update({key: 0.0 for key, _, _ in within})
    neutral.update({key: 0.0 for key, _ in counters})
    neutral.update({k: v for keys in actions for k, v in zip(keys, (NEVER_S, 0.0, 0.0),
                                                               strict=True)})
    # Definitions reading one event name (the usual case) are served per name
    # present; the rest (several names) by looking each group up.
    readers: dict[str, tuple[list, list]] = {}
    for key, names in since:
        if len(names) == 1:
            readers.setdefault(names[0], ([], []))[0].append(key)
    for key, names, window_ms in within:
        if len(names) == 1:
            readers.setdefault(names[0], ([], []))[1].append((key, window_ms))
    multi_since = tuple((k, names) for k, names in since if len(names) > 1)
    multi_within = tuple((k, names, w) for k, names, w in within if len(names) > 1)

    def serve(ctx: EntityContext, t: int, out: Out) -> None:
        out.update(neutral)
        times = ctx.times
        for name, occurred in times.items():
            spec = readers.get(name)
            if spec is None:
                continue
            for ts in occurred:  # newest first: the latest at or before t
                if ts <= t:
                    age = t - ts
                    for key in spec[0]:
                        out[key] = age / 1000.0
                    for key, window_ms in spec[1]:
                        if age <= window_ms:
                            out[key] = 1.0
                    break
        for key, names in multi_since:
            ts = _latest(times, names, t)
            if ts is not None:
                out[key] = (t - ts) / 1000.0
        for key, names, window_ms in multi_within:
            ts = _latest(times, names, t)
            if ts is not None and t - ts <= window_ms:
                out[key] = 1.0
        counts = ctx.counters
        if counts:
            for key, src in counters:
                if src in counts:
                    out[key] = counts[src]
        last = ctx.last_action
        if last is not None and last[1] <= t:  # an action at or before this event
            for k_age, k_failed, k_ok in actions:
                out[k_age] = (t - last[1]) / 1000.0
                out[k_failed] = 1.0 if last[0] in FAILED_STATUSES else 0.0
                out[k_ok] = 1.0 if last[0] == "succeeded" else 0.0

    return serve
