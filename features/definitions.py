"""Feature definitions, declared as code.

A :class:`FeatureDef` says what a feature is computed from (``kind`` and
``sources``), how (``aggregation`` and its window or parameters), what it is
called (``outputs``), how long its state lives (``ttl_s``) and which
``version`` of it wrote the state.  :data:`DEFAULT_DEFINITIONS` is the set the
worker and replay use; :mod:`ia.features.registry` compiles it into per-metric
plans, so the online path (Redis) and replay (memory) run the same code.

Changing what a definition computes means bumping its ``version``: its stored
state is then tagged differently and the old state is never read (it starts
afresh), while the state of every other definition is kept.

>>> [d.name for d in DEFAULT_DEFINITIONS][:3]
['ewma', 'rate_of_change', 'seconds_since_last']
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

DAY_S = 24 * 3600
WEEK_S = 7 * DAY_S
DEFAULT_TTL_S = 7 * DAY_S
# Samples may arrive this long after the newest sample of their series and
# still be folded into the windowed aggregations; older ones are counted and
# dropped.  Two minutes covers producer batching and broker retries.
DEFAULT_ALLOWED_LATENESS_S = 120.0
# "Never happened" for time-since features: a large finite number, because
# decisions carry features as finite floats.
NEVER_S = 1e9


class Aggregation(StrEnum):
    # per (entity, metric), with state
    ewma = "ewma"                # event-time EWMA mean and variance, half-life window_s
    window = "window"            # bucketed sliding window: count, mean, min, max
    quantile = "quantile"        # exact quantiles of the `samples` most recent samples
    seasonal = "seasonal"        # hour-of-week profile of hourly means
    # per (entity, metric), derived from the series' last sample
    rate = "rate"                # change per second since the previous sample
    since_last = "since_last"    # seconds since the previous sample
    # per entity, across metrics
    ratio = "ratio"              # sum(sources[0]) / sum(sources[1]) over a window def
    # per entity, from non-metric records
    since_event = "since_event"  # seconds since the last discrete event of these names
    event_within = "event_within"  # 1.0 if such an event happened in the last window_s
    counter = "counter"          # feedback counters (``c:{source}`` fields)
    last_action = "last_action"  # the last action's age and outcome (from ia.outcomes)


class Kind(StrEnum):
    metric = "metric"      # telemetry samples (kind=metric)
    event = "event"        # telemetry discrete events (kind=event): deploy, config_change...
    outcome = "outcome"    # ia.outcomes, via the worker's feedback agent
    feedback = "feedback"  # ia.feedback (and failed outcomes), via the feedback agent


# How many outputs each aggregation produces, in order.
ARITY: dict[Aggregation, int] = {
    Aggregation.ewma: 4, Aggregation.window: 4, Aggregation.seasonal: 2,
    Aggregation.rate: 1, Aggregation.since_last: 1, Aggregation.ratio: 1,
    Aggregation.since_event: 1, Aggregation.event_within: 1, Aggregation.last_action: 3,
}
STATEFUL = frozenset({Aggregation.ewma, Aggregation.window, Aggregation.quantile,
                      Aggregation.seasonal})


@dataclass(frozen=True)
class FeatureDef:
    """One feature (or a few computed together), declared as data."""

    name: str
    aggregation: Aggregation
    outputs: tuple[str, ...]
    kind: Kind = Kind.metric
    # Metric or event names this reads; "*" is every metric.
    sources: tuple[str, ...] = ("*",)
    # Only "entity" today: every feature is keyed by the event's entity, which
    # is also the telemetry partition key (see ia.features.store: one writer).
    entity_key: str = "entity"
    # Window length, EWMA half-life or recency horizon, in event-time seconds.
    window_s: float = 0.0
    buckets: int = 0                       # window: number of time buckets
    samples: int = 0                       # quantile: how many recent samples
    quantiles: tuple[float, ...] = ()      # quantile: which ones, in (0, 1)
    alpha: float = 0.0                     # seasonal: weight of a new week's hour
    over: str = ""                         # ratio: the window definition it divides
    # How long the state lives without new data (event time for per-series state;
    # the entity's hash expires after the longest of them).  0: no state of its own.
    ttl_s: int = DEFAULT_TTL_S
    version: int = 1
    description: str = ""

    def applies_to(self, metric: str) -> bool:
        return self.kind is Kind.metric and ("*" in self.sources or metric in self.sources)

    def state_tag(self) -> str:
        """Everything that changes the meaning of this definition's stored state."""
        return (f"{self.name}@{self.version}|{self.aggregation.value}|{self.window_s:g}|"
                f"{self.buckets}|{self.samples}|{self.quantiles}|{self.alpha:g}")

    @property
    def bucket_s(self) -> float:
        return self.window_s / self.buckets if self.buckets else 0.0


DEFAULT_DEFINITIONS: tuple[FeatureDef, ...] = (
    FeatureDef("ewma", Aggregation.ewma, ("n", "ewma_mean", "ewma_std", "zscore"),
               window_s=600.0,
               description="event-time EWMA baseline (10 min half-life, Welford warm-up); "
                           "z-score of the sample against it"),
    FeatureDef("rate_of_change", Aggregation.rate, ("rate_of_change",), ttl_s=0,
               description="(value - previous value) / seconds since the previous sample"),
    FeatureDef("seconds_since_last", Aggregation.since_last, ("seconds_since_last",), ttl_s=0,
               description="seconds since the previous sample of the series"),
    FeatureDef("window_5m", Aggregation.window, ("count_5m", "mean_5m", "min_5m", "max_5m"),
               window_s=300.0, buckets=5, ttl_s=DAY_S,
               description="samples in the current minute and the 4 before it"),
    FeatureDef("recent_12", Aggregation.quantile, ("p50_last12", "p95_last12"),
               samples=12, quantiles=(0.5, 0.95),
               description="median and p95 of the 12 most recent samples (float32)"),
    FeatureDef("seasonal_hour_of_week", Aggregation.seasonal, ("seasonal_mean", "seasonal_z"),
               window_s=WEEK_S, alpha=0.3, ttl_s=2 * WEEK_S,
               description="mean of this hour of the week (EW over weeks, float16); "
                           "z of the sample against it (EWMA mean until the hour is known)"),
    FeatureDef("error_ratio_5m", Aggregation.ratio, ("error_ratio_5m",),
               sources=("errors", "requests"), over="window_5m", ttl_s=0,
               description="sum of errors / sum of requests over window_5m, on samples "
                           "of either, once an entity reports both"),
    *(FeatureDef(f"seconds_since_{name}", Aggregation.since_event, (f"seconds_since_{name}",),
                 kind=Kind.event, sources=(name,),
                 description=f"seconds since the last {name} event on this entity")
      for name in ("deploy", "config_change", "restart", "scale")),
    *(FeatureDef(f"{name}_within_15m", Aggregation.event_within, (f"{name}_within_15m",),
                 kind=Kind.event, sources=(name,), window_s=900.0,
                 description=f"1 if a {name} happened on this entity in the last 15 minutes")
      for name in ("deploy", "config_change")),
    FeatureDef("feedback", Aggregation.counter,
               ("false_positives", "true_positives", "actions_failed"),
               kind=Kind.feedback, sources=("fp", "tp", "failed"),
               description="labels and failed outcomes of this entity's past actions"),
    FeatureDef("last_action", Aggregation.last_action,
               ("seconds_since_action", "last_action_failed", "last_action_succeeded"),
               kind=Kind.outcome, sources=("last_action",),
               description="age and outcome of the last action on this entity"),
)
