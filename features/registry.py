"""The registry: validated definitions, compiled into per-metric plans.

A :class:`MetricPlan` is what one metric's samples need: the aggregations of
every definition that applies to it, bound to offsets in one flat state list,
and one ``struct`` that packs that list into the series' Redis field.

Stored layout of a series (hash field ``s1:{metric}``)::

    u8 format (1) | u8 segments | segments x (u32 tag, u16 bytes)   header
    f64 last value | i64 watermark | u32 late | u32 dropped         core
    one segment per stateful definition, in definition order

A segment's tag is a CRC-32 of its definition's name, version and parameters.
Decoding a blob whose header is not the current one keeps the core and every
segment whose tag still matches and starts the others afresh, so bumping one
definition's version never reads its old state and never loses the others'.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property

from ia.core.errors import IaError
from ia.features.aggregations import (
    CORE_FORMAT,
    CORE_FRESH,
    DROPPED,
    FOLD_IN_ORDER,
    FOLD_LATE,
    LAST_TS,
    LAST_VALUE,
    LATE,
    SERVE_ONLY,
    U32_MAX,
    Derived,
    EntityContext,
    Ewma,
    Out,
    Quantile,
    Rate,
    Seasonal,
    SeriesAgg,
    SinceLast,
    Window,
    compile_context,
)
from ia.features.definitions import (
    ARITY,
    DEFAULT_ALLOWED_LATENESS_S,
    DEFAULT_DEFINITIONS,
    Aggregation,
    FeatureDef,
    Kind,
)

LAYOUT_FORMAT = 1
MAX_CACHED_METRICS = 65_536
SERIES_FIELD_PREFIX = b"s1:"
_HEAD = struct.Struct("<BB")
_DIR = struct.Struct("<IH")
_WM = struct.Struct("<q")

# What observe() did with a sample (see MetricPlan.observe).
IN_ORDER, LATE_FOLDED, TOO_LATE, DUPLICATE, REDELIVERED = range(5)
OUTCOMES = ("in_order", "folded", "dropped", "duplicate", "redelivered")

_METRIC_AGGS = {Aggregation.ewma, Aggregation.window, Aggregation.quantile,
                Aggregation.seasonal, Aggregation.rate, Aggregation.since_last,
                Aggregation.ratio}
_KIND_OF = {Aggregation.since_event: Kind.event, Aggregation.event_within: Kind.event,
            Aggregation.counter: Kind.feedback, Aggregation.last_action: Kind.outcome}


class DefinitionError(IaError, ValueError):
    """A definition (or the set of them) is inconsistent."""


def segment_tag(d: FeatureDef) -> int:
    return zlib.crc32(d.state_tag().encode())


class MetricPlan:
    """The compiled definitions of one metric (shared by metrics with the same set)."""

    def __init__(self, defs: list[FeatureDef], lateness_ms: int) -> None:
        self.defs = defs
        self.lateness_ms = lateness_ms
        self.serving: list[SeriesAgg | Derived] = []
        self.folding: list[SeriesAgg] = []
        self.windows: dict[str, Window] = {}
        self.ewma: Ewma | None = None
        for d in defs:
            self._add(d)
        self._layout()

    def _add(self, d: FeatureDef) -> None:
        agg: SeriesAgg | Derived
        if d.aggregation is Aggregation.ewma:
            agg = Ewma(d, self.lateness_ms)
            self.ewma = self.ewma or agg
        elif d.aggregation is Aggregation.window:
            agg = self.windows[d.name] = Window(d, self.lateness_ms)
        elif d.aggregation is Aggregation.quantile:
            agg = Quantile(d, self.lateness_ms)
        elif d.aggregation is Aggregation.seasonal:
            agg = Seasonal(d, self.lateness_ms, self._baseline())
        elif d.aggregation is Aggregation.rate:
            agg = Rate(d)
        else:
            agg = SinceLast(d)
        self.serving.append(agg)
        if isinstance(agg, SeriesAgg):
            self.folding.append(agg)

    def _baseline(self) -> tuple[str, str] | None:
        # Served before the seasonal step (definition order is serving order).
        return None if self.ewma is None else (self.ewma.k_mean, self.ewma.k_std)

    def _layout(self) -> None:
        sizes = [struct.calcsize("<" + a.fmt) for a in self.folding]
        self.header = _HEAD.pack(LAYOUT_FORMAT, len(self.folding)) + b"".join(
            _DIR.pack(segment_tag(a.d), size) for a, size in zip(self.folding, sizes,
                                                                    strict=True))
        fmt = f"<{len(self.header)}s{CORE_FORMAT}" + "".join(a.fmt for a in self.folding)
        self.struct = struct.Struct(fmt)
        # byte offset of the watermark: state[0] is the header, core values follow
        self.wm_at = len(self.header) + struct.calcsize("<" + CORE_FORMAT[:LAST_TS - 1])
        at = len(self.header) + struct.calcsize("<" + CORE_FORMAT)
        # For each window: one struct reading the watermark, the ring's head and the
        # per-bucket sums straight from a blob (skipping everything in between).
        self.window_sums: dict[str, struct.Struct] = {}
        wm_end = self.wm_at + _WM.size
        for a, size in zip(self.folding, sizes, strict=True):
            if isinstance(a, Window):
                self.window_sums[a.d.name] = struct.Struct(
                    f"<{self.wm_at}xq{at - wm_end}xq{4 * a.n}x{a.n}d")
            at += size
        self.fresh_state: list = [self.header, *CORE_FRESH]
        for a in self.folding:
            a.bind(len(self.fresh_state))
            self.fresh_state += a.fresh()
        self.steps = tuple(a.compile() for a in self.serving)
        self.ttl_aggs = [a for a in self.folding if a.ttl_ms]
        self.min_ttl_ms = min((a.ttl_ms for a in self.ttl_aggs), default=0)

    @property
    def size(self) -> int:
        return self.struct.size

    def new(self) -> list:
        return list(self.fresh_state)

    def encode(self, st: list) -> bytes:
        return self.struct.pack(*st)

    def decode(self, blob: bytes) -> list:
        if len(blob) == self.struct.size and blob.startswith(self.header):
            return list(self.struct.unpack(blob))
        return self._migrate(blob)

    def window_sum(self, blob: bytes, name: str, t: int) -> float | None:
        """Window ``name``'s sum at ``t``, read straight from a packed state: a ratio
        needs only that of the other series, not its whole state (None: other layout)."""
        if len(blob) != self.struct.size or not blob.startswith(self.header):
            return None
        wm, head, *sums = self.window_sums[name].unpack_from(blob)
        return self.windows[name].sum_at(head, sums, t, wm)

    def window_sum_of(self, st: list, name: str, t: int) -> float:
        """The same from a decoded state."""
        w = self.windows[name]
        return w.sum_at(st[w.o], st[w.s0:w.lo0], t, st[LAST_TS])

    def _migrate(self, blob: bytes) -> list:
        """State from a blob of another layout: the core and the segments whose tags
        still match; a segment of an older definition version is not read."""
        st = self.new()
        try:
            fmt, nseg = _HEAD.unpack_from(blob)
            if fmt != LAYOUT_FORMAT:
                return st
            pos = _HEAD.size + nseg * _DIR.size
            st[1:1 + len(CORE_FRESH)] = struct.unpack_from("<" + CORE_FORMAT, blob, pos)
            pos += struct.calcsize("<" + CORE_FORMAT)
            old: dict[int, tuple[int, int]] = {}
            for i in range(nseg):
                tag, size = _DIR.unpack_from(blob, _HEAD.size + i * _DIR.size)
                old[tag] = (pos, size)
                pos += size
            for a in self.folding:
                where = old.get(segment_tag(a.d))
                if where and where[1] == struct.calcsize("<" + a.fmt):
                    vals = struct.unpack_from("<" + a.fmt, blob, where[0])
                    st[a.o:a.o + len(vals)] = vals
        except struct.error:
            return self.new()  # truncated or foreign: start afresh rather than fail
        return st

    def observe(self, st: list, v: float, t: int, fold: bool = True) -> tuple[Out, int]:
        """Features for sample ``(t, v)`` from ``st`` as it is, then fold the sample in.

        ``fold=False`` serves without folding (a redelivered sample already in
        the state).  A sample at or before the watermark is late: folded into the
        windowed aggregations if within the allowed lateness, dropped (and counted)
        otherwise; an exact repeat of the newest sample is a duplicate.
        """
        wm = st[LAST_TS]
        if t > wm:
            if self.min_ttl_ms and wm >= 0 and t - wm > self.min_ttl_ms:
                self._expire(st, t - wm)
            mode, outcome = (FOLD_IN_ORDER, IN_ORDER) if fold else (SERVE_ONLY, REDELIVERED)
        elif not fold:
            mode, outcome = SERVE_ONLY, REDELIVERED
        elif t == wm and v == st[LAST_VALUE]:
            mode, outcome = SERVE_ONLY, DUPLICATE
        elif t < wm - self.lateness_ms:
            mode, outcome = SERVE_ONLY, TOO_LATE
            st[DROPPED] = min(st[DROPPED] + 1, U32_MAX)
        else:
            mode, outcome = FOLD_LATE, LATE_FOLDED
            st[LATE] = min(st[LATE] + 1, U32_MAX)
        out: Out = {"value": v}
        for step in self.steps:
            step(st, v, t, wm, out, mode)
        if mode == FOLD_IN_ORDER:
            st[LAST_VALUE], st[LAST_TS] = v, t
        return out, outcome

    def _expire(self, st: list, idle_ms: int) -> None:
        # A definition's state idle for longer than its TTL (event time) is stale:
        # a baseline from last month says little about today.
        for a in self.ttl_aggs:
            if idle_ms > a.ttl_ms:
                a.reset(st)


@dataclass(frozen=True)
class Ratio:
    d: FeatureDef
    numerator: str
    denominator: str
    window: str


class FeatureRegistry:
    """Definitions, validated, with plans compiled on first use per metric."""

    def __init__(self, defs: Iterable[FeatureDef] = DEFAULT_DEFINITIONS,
                 allowed_lateness_s: float = DEFAULT_ALLOWED_LATENESS_S) -> None:
        self.defs = tuple(defs)
        self.allowed_lateness_s = allowed_lateness_s
        self.lateness_ms = int(allowed_lateness_s * 1000)
        self.by_name = {d.name: d for d in self.defs}
        validate(self.defs, allowed_lateness_s)
        self._plans: dict[tuple[str, ...], MetricPlan] = {}
        self._plan_of: dict[str, MetricPlan] = {}
        self.ratios = [Ratio(d, d.sources[0], d.sources[1], d.over) for d in self.defs
                       if d.aggregation is Aggregation.ratio]
        # A ratio is served on samples of its two metrics (the others would pay for
        # reading two more series per sample).
        self.ratios_by_metric = {m: tuple(r for r in self.ratios
                                          if m in (r.numerator, r.denominator))
                                 for r0 in self.ratios for m in (r0.numerator, r0.denominator)}
        self.context_defs = [d for d in self.defs if d.aggregation in _KIND_OF]
        self._serve_context = compile_context(self.context_defs)
        self.tracked_events = frozenset(s for d in self.defs if d.kind is Kind.event
                                        for s in d.sources)
        self.ttl_s = max((d.ttl_s for d in self.defs), default=0)

    def plan(self, metric: str) -> MetricPlan:
        plan = self._plan_of.get(metric)
        if plan is None:
            if len(self._plan_of) >= MAX_CACHED_METRICS:
                self._plan_of.clear()  # metric names come from producers: stay bounded
            applicable = [d for d in self.defs if d.applies_to(metric)
                          and d.aggregation is not Aggregation.ratio]
            key = tuple(d.name for d in applicable)
            plan = self._plans.get(key)
            if plan is None:
                plan = self._plans[key] = MetricPlan(applicable, self.lateness_ms)
            self._plan_of[metric] = plan
        return plan

    @cached_property
    def neutral_context(self) -> Out:
        """Context features of an entity with no context fields (the common case)."""
        out: Out = {}
        self._serve_context(EntityContext({}), 0, out)
        return out

    def serve_context(self, ctx: EntityContext | None, t: int, out: Out) -> None:
        if ctx is None:
            out.update(self.neutral_context)
        else:
            self._serve_context(ctx, t, out)

    def outputs(self) -> list[str]:
        return ["value", *(o for d in self.defs for o in d.outputs)]


def validate(defs: tuple[FeatureDef, ...], lateness_s: float) -> None:
    """Raise :class:`DefinitionError` on the first inconsistency."""
    seen: set[str] = set()
    outputs = {"value"}
    for d in defs:
        if d.name in seen:
            raise DefinitionError(f"{d.name}: defined twice")
        seen.add(d.name)
        _validate_one(d, lateness_s)
        clash = outputs & set(d.outputs)
        if clash:
            raise DefinitionError(f"{d.name}: output {sorted(clash)[0]} already produced")
        outputs |= set(d.outputs)
    by_name = {d.name: d for d in defs}
    for d in defs:
        if d.aggregation is Aggregation.ratio:
            w = by_name.get(d.over)
            if w is None or w.aggregation is not Aggregation.window:
                raise DefinitionError(f"{d.name}: over={d.over!r} is not a window definition")
            if not all(w.applies_to(s) for s in d.sources):
                raise DefinitionError(f"{d.name}: {w.name} does not apply to {d.sources}")


def _validate_one(d: FeatureDef, lateness_s: float) -> None:
    if d.entity_key != "entity":
        raise DefinitionError(f"{d.name}: only entity_key='entity' is supported")
    if d.version < 1 or d.ttl_s < 0:
        raise DefinitionError(f"{d.name}: version must be >= 1 and ttl_s >= 0")
    want_kind = Kind.metric if d.aggregation in _METRIC_AGGS else _KIND_OF[d.aggregation]
    if d.kind is not want_kind:
        raise DefinitionError(f"{d.name}: {d.aggregation.value} needs kind={want_kind.value}")
    arity = {Aggregation.quantile: len(d.quantiles),
             Aggregation.counter: len(d.sources)}.get(d.aggregation, ARITY.get(d.aggregation))
    if len(d.outputs) != arity:
        raise DefinitionError(f"{d.name}: {d.aggregation.value} has {arity} outputs")
    check = _CHECKS.get(d.aggregation)
    if check:
        problem = check(d, lateness_s)
        if problem:
            raise DefinitionError(f"{d.name}: {problem}")


def _check_window(d: FeatureDef, lateness_s: float) -> str | None:
    if d.buckets < 1 or d.window_s <= 0 or (d.bucket_s * 1000) % 1:
        return "needs buckets >= 1 and a whole number of milliseconds per bucket"
    if lateness_s > (d.buckets - 1) * d.bucket_s:
        return (f"the ring must outlive the allowed lateness ({lateness_s:g}s): "
                "use more or wider buckets")
    return None


def _check_quantile(d: FeatureDef, lateness_s: float) -> str | None:
    if not 1 <= d.samples <= 255 or not all(0.0 <= q <= 1.0 for q in d.quantiles):
        return "needs 1..255 samples and quantiles in [0, 1]"
    return None


def _check_seasonal(d: FeatureDef, lateness_s: float) -> str | None:
    if not 0.0 < d.alpha <= 1.0 or lateness_s >= 3600:
        return "needs 0 < alpha <= 1 and an allowed lateness under an hour"
    return None


def _check_ewma(d: FeatureDef, lateness_s: float) -> str | None:
    return None if d.window_s > 0 else "needs a half-life window_s > 0"


def _check_ratio(d: FeatureDef, lateness_s: float) -> str | None:
    return None if len(d.sources) == 2 and "*" not in d.sources else \
        "needs sources=(numerator metric, denominator metric)"


_CHECKS: dict[Aggregation, Callable[[FeatureDef, float], str | None]] = {
    Aggregation.window: _check_window, Aggregation.quantile: _check_quantile,
    Aggregation.seasonal: _check_seasonal, Aggregation.ewma: _check_ewma,
    Aggregation.ratio: _check_ratio,
}

DEFAULT_REGISTRY = FeatureRegistry()
