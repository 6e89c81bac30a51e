"""``ia bench features``: enrichment cost and Redis memory of the feature store.

Against a real Redis (``REDIS_URL``, or an embedded one started for the run):

* ``entities`` entities with ``metrics`` series each are written first (a
  realistic state: every definition populated, a position, some deploys);
* batches of 1, 100, 500 and 1000 in-order samples on random series go
  through :func:`enrich_batch` (one script call to read, the
  features, one to write) -- the amortised cost per event is reported;
* in the same run, alternating with those batches, the same keys are read
  with a raw pipelined ``HGETALL`` (the baseline the issue quotes), so the
  ratio is meaningful on a busy or slow machine;
* memory per (entity, metric) is ``MEMORY USAGE`` of sampled keys divided by
  their number of series, for the workload's entities and for entities with
  a single series (the worst case: the per-key overhead is not shared).

Timed figures are medians over batches (each batch's cost / its events);
means and minima are in the JSON too.  Nothing here is a pass/fail test.
"""

from __future__ import annotations

import asyncio
import os
import platform
import random
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

from ia.core.keys import Keys
from ia.core.settings import RedisSettings
from ia.features.aggregations import Out
from ia.features.enrich import Enricher
from ia.features.registry import DEFAULT_REGISTRY, FeatureRegistry
from ia.features.store import EntityRecord, FeatureStore, RedisFeatureStore
from ia.schemas.models import EventKind, TelemetryEvent

TARGET_US_PER_EVENT = 15.0  # at batch >= 500, 10k entities (issue 3)
TARGET_BYTES = 1024  # per (entity, metric), all features included
# The reference machine: raw pipelined HGETALL ~6 us, target 15 us.
REFERENCE_RATIO = TARGET_US_PER_EVENT / 6.0
METRIC_NAMES = ("requests", "errors", "latency_ms")
T0 = 1_732_492_800_000  # a Monday
LAST_HISTORY = T0 + 14 * 86_400_000 + 1_800_000  # the populated state's watermark


# --------------------------------------------------------------------------- enrichment
# The feature store without the decision engine: what the benchmark times, and what
# the feature tests drive.


def enrich_events(events: Sequence[TelemetryEvent], records: dict[str, EntityRecord],
                  positions: Sequence[tuple[int, int]] | None = None,
                  registry: FeatureRegistry = DEFAULT_REGISTRY) -> list[Out]:
    """Features for each event, in order, folding each into ``records``."""
    batch = Enricher(records, registry)
    features = batch.features
    if positions is None:
        out = [features(ev) for ev in events]
    else:
        out = [features(ev, where) for ev, where in zip(events, positions, strict=True)]
    batch.finish()
    return out


async def enrich_batch(events: Sequence[TelemetryEvent], store: FeatureStore,
                       positions: Sequence[tuple[int, int]] | None = None,
                       registry: FeatureRegistry = DEFAULT_REGISTRY) -> list[Out]:
    """Load, enrich and save a batch: one read and one write round trip."""
    records = await store.load(ev.entity for ev in events)
    features = enrich_events(events, records, positions, registry)
    await store.save(records)
    return features


@dataclass
class BenchOptions:
    entities: int = 10_000
    metrics: int = 3
    # batch size -> batches timed
    rounds: dict[int, int] = field(default_factory=lambda: {1: 400, 100: 60, 500: 24,
                                                            1000: 16})
    memory_samples: int = 500
    seed: int = 7

    @classmethod
    def quick(cls) -> BenchOptions:
        return cls(entities=1_000, rounds={1: 40, 100: 6, 500: 3, 1000: 3},
                   memory_samples=100)


def metric_names(n: int) -> list[str]:
    return [*METRIC_NAMES[:n], *(f"m{i}" for i in range(len(METRIC_NAMES), n))]


class Workload:
    """Entities, their series, and in-order samples after the populated history."""

    def __init__(self, opts: BenchOptions) -> None:
        self.opts = opts
        self.rng = random.Random(opts.seed)
        self.entities = [f"svc-{i:06d}" for i in range(opts.entities)]
        self.metrics = metric_names(opts.metrics)
        self.ts = LAST_HISTORY + 5_000
        self.offset = 10**9  # after the populated history's positions
        self.clock = float(self.ts)

    def history(self, metric: str) -> list[TelemetryEvent]:
        """Two weeks every 15 minutes, then a last sample: every window, slot and
        quantile populated."""
        level = {"requests": 1000.0, "errors": 5.0}.get(metric, 120.0)
        times = [*range(T0, LAST_HISTORY - 900_000, 900_000), LAST_HISTORY]
        return [TelemetryEvent(entity="template", metric=metric, ts=ts,
                               value=level + self.rng.gauss(0, level / 20)) for ts in times]

    def batch(self, size: int) -> tuple[list[TelemetryEvent], list[tuple[int, int]]]:
        """In-order samples on random series.  Event time advances so that each series
        is sampled about every 10 s, as a fleet scraped every 10 s would be (the
        steady state: most samples land in the bucket and hour of the previous one)."""
        events, positions = [], []
        step_ms = 10_000 / (self.opts.entities * self.opts.metrics)
        for _ in range(size):
            self.clock += step_ms
            self.ts = max(self.ts, int(self.clock))
            self.offset += 1
            metric = self.rng.choice(self.metrics)
            events.append(TelemetryEvent(entity=self.rng.choice(self.entities), metric=metric,
                                         ts=self.ts, value=self.rng.gauss(100.0, 5.0)))
            positions.append((0, self.offset))
        return events, positions


def template_fields(work: Workload) -> dict[bytes, bytes]:
    """One populated entity's fields (the same bytes are written for every entity)."""
    rec = EntityRecord()
    history = sorted((ev for m in work.metrics for ev in work.history(m)), key=lambda e: e.ts)
    history.append(TelemetryEvent(entity="template", metric="deploy", value=1.0,
                                  ts=history[-1].ts, kind=EventKind.event))
    enrich_events(history, {"template": rec}, [(0, i) for i in range(len(history))])
    return rec.changes()


async def populate(client, store: RedisFeatureStore, entities: list[str],
                   fields: dict[bytes, bytes], chunk: int = 500) -> None:
    for i in range(0, len(entities), chunk):
        async with client.pipeline(transaction=False) as pipe:
            for e in entities[i:i + chunk]:
                pipe.hset(store.keys.entity(e), mapping=fields)
                pipe.expire(store.keys.entity(e), store.ttl_s)
            await pipe.execute()


async def raw_hgetall(client, keys: list[str]) -> None:
    async with client.pipeline(transaction=False) as pipe:
        for k in keys:
            pipe.hgetall(k)
        await pipe.execute()


async def _timed(fn: Callable[[], Awaitable[Any]]) -> tuple[float, float]:
    """Wall time and this process's CPU time of one call.  On a shared machine the
    CPU time is the steadier figure (it leaves out waiting for a core)."""
    wall, cpu = time.perf_counter(), time.process_time()
    await fn()
    return time.perf_counter() - wall, time.process_time() - cpu


def _summary(per_event_s: list[float]) -> dict[str, float]:
    us = [x * 1e6 for x in per_event_s]
    return {"median": round(statistics.median(us), 2), "mean": round(statistics.fmean(us), 2),
            "min": round(min(us), 2)}


async def time_batches(client, store: RedisFeatureStore, work: Workload, size: int,
                       rounds: int) -> dict[str, Any]:
    """Alternate enrichment batches with raw HGETALL pipelines of the same keys."""
    enrich, baseline, enrich_cpu, baseline_cpu = [], [], [], []
    for _ in range(rounds):
        events, positions = work.batch(size)
        keys = [store.keys.entity(e) for e in dict.fromkeys(ev.entity for ev in events)]
        wall, cpu = await _timed(lambda k=keys: raw_hgetall(client, k))
        baseline.append(wall / size)
        baseline_cpu.append(cpu / size)
        wall, cpu = await _timed(lambda ev=events, p=positions: enrich_batch(ev, store, p))
        enrich.append(wall / size)
        enrich_cpu.append(cpu / size)
    e, b = _summary(enrich), _summary(baseline)
    ec, bc = _summary(enrich_cpu), _summary(baseline_cpu)
    return {"enrich_us": e, "hgetall_us": b, "ratio": round(e["median"] / b["median"], 2),
            "enrich_cpu_us": ec, "hgetall_cpu_us": bc,
            "cpu_ratio": round(ec["median"] / max(bc["median"], 1e-9), 2)}


async def stage_breakdown(store: RedisFeatureStore, work: Workload, size: int,
                          rounds: int) -> dict[str, float]:
    """Where one batch's time goes: read, features, write (medians, us per event, wall
    and this process's CPU)."""
    samples: dict[str, list[float]] = {}
    for _ in range(rounds):
        events, positions = work.batch(size)
        marks = [(time.perf_counter(), time.process_time())]
        records = await store.load(ev.entity for ev in events)
        marks.append((time.perf_counter(), time.process_time()))
        enrich_events(events, records, positions)
        marks.append((time.perf_counter(), time.process_time()))
        await store.save(records)
        marks.append((time.perf_counter(), time.process_time()))
        for i, stage in enumerate(("load", "features", "save")):
            samples.setdefault(stage, []).append(marks[i + 1][0] - marks[i][0])
            samples.setdefault(f"{stage}_cpu", []).append(marks[i + 1][1] - marks[i][1])
    return {name: round(statistics.median(xs) / size * 1e6, 2) for name, xs in samples.items()}


async def unpipelined_hgetall(client, store: RedisFeatureStore, work: Workload,
                              n: int = 200) -> float:
    keys = [store.keys.entity(work.rng.choice(work.entities)) for _ in range(n)]
    started = time.perf_counter()
    for k in keys:
        await client.hgetall(k)
    return round((time.perf_counter() - started) / n * 1e6, 2)


async def memory_per_series(client, keys: list[str], series_per_key: int) -> float:
    sizes = [await client.memory_usage(k, samples=0) for k in keys]
    return round(statistics.fmean(sizes) / series_per_key, 1)


async def single_series_memory(client, store: RedisFeatureStore, work: Workload,
                               fields: dict[bytes, bytes]) -> float:
    """Entities with one series: the worst case per (entity, metric)."""
    one = work.metrics[0].encode()
    single = {k: v for k, v in fields.items() if not k.startswith(b"s1:")
              or k == b"s1:" + one}
    names = [f"one-{i:06d}" for i in range(work.opts.memory_samples)]
    await populate(client, store, names, single)
    return await memory_per_series(client, [store.keys.entity(e) for e in names], 1)


async def detector_memory(client, store: RedisFeatureStore, work: Workload,
                          fields: dict[bytes, bytes]) -> float:
    """The same entities with the anomaly detector's per-series state (ia.decisions.detector,
    stored in the same hash but not a feature), for the whole picture."""
    from ia.decisions.detector import DetectorState

    blob = DetectorState().pack()
    with_detector = {**fields, **{b"a:" + m.encode(): blob for m in work.metrics}}
    names = [f"det-{i:06d}" for i in range(work.opts.memory_samples)]
    await populate(client, store, names, with_detector)
    return await memory_per_series(client, [store.keys.entity(e) for e in names], len(work.metrics))


async def cleanup(client, prefix: str) -> None:
    async for batch in _scan_batches(client, Keys(prefix).everything):
        await client.unlink(*batch)


async def _scan_batches(client, pattern: str, size: int = 1000):
    batch = []
    async for key in client.scan_iter(match=pattern, count=size):
        batch.append(key)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


async def run(client, opts: BenchOptions) -> dict[str, Any]:
    # Short, like the production prefix ("ia"): MEMORY USAGE counts the key's name.
    prefix = f"b{uuid.uuid4().hex[:5]}"
    store = RedisFeatureStore(client, prefix)
    work = Workload(opts)
    try:
        await store.load_scripts()
        fields = template_fields(work)
        await populate(client, store, work.entities, fields)
        result: dict[str, Any] = {"redis_prefix": prefix, "options": {**asdict(opts), "rounds": {
            str(k): v for k, v in opts.rounds.items()}}, "environment": environment(),
            "series_state_bytes": DEFAULT_REGISTRY.plan(work.metrics[0]).size}
        sample = [store.keys.entity(e) for e in work.rng.sample(work.entities, opts.memory_samples)]
        result["redis_bytes_per_entity_metric"] = await memory_per_series(
            client, sample, len(work.metrics))
        result["redis_bytes_per_entity_metric_single_series"] = await single_series_memory(
            client, store, work, fields)
        result["redis_bytes_per_entity_metric_with_detector_state"] = await detector_memory(
            client, store, work, fields)
        await time_batches(client, store, work, 100, 3)  # warm up connections and caches
        sizes = {}
        for size, rounds in opts.rounds.items():
            sizes[str(size)] = await time_batches(client, store, work, size, rounds)
            result[f"enrich_us_per_event_batch_{size}"] = sizes[str(size)]["enrich_us"][
                "median"]
            result[f"hgetall_us_per_event_batch_{size}"] = sizes[str(size)]["hgetall_us"][
                "median"]
        result["batches"] = sizes
        largest = max(opts.rounds)
        result[f"stages_us_per_event_batch_{largest}"] = await stage_breakdown(
            store, work, largest, max(3, opts.rounds[largest] // 2))
        result["hgetall_unpipelined_us"] = await unpipelined_hgetall(client, store, work)
        result["environment"]["loadavg_end"] = _loadavg()
        return result
    finally:
        await cleanup(client, prefix)


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def environment() -> dict[str, Any]:
    return {"python": platform.python_version(), "machine": platform.machine(),
            "cpus": os.cpu_count(), "loadavg_start": _loadavg()}


@contextmanager
def redis_url_for_bench(redis: RedisSettings | str | None):
    """The given Redis (settings or a bare URL), or an embedded one (with a password)
    for the duration of the run."""
    if isinstance(redis, str) or (redis is not None and redis.url):
        yield redis
        return
    from ia.runtime.embedded import start_redis

    with tempfile.TemporaryDirectory(prefix="ia-bench-features-") as run_dir:
        info = start_redis(run_dir)
        try:
            yield RedisSettings(url=info.address, password_file=info.password_file)
        finally:
            info.stop()


def run_bench(redis: RedisSettings | str | None, opts: BenchOptions) -> dict[str, Any]:
    """Run the benchmark against ``redis`` (an embedded Redis if None or without a URL)."""
    from ia.core.redis import client as redis_client

    async def main(address: RedisSettings | str) -> dict[str, Any]:
        client = redis_client(address)
        try:
            info = await client.info("server")
            out = await run(client, opts)
            out["environment"]["redis"] = info.get("valkey_version") or info.get(
                "redis_version")
            return out
        finally:
            await client.aclose()

    with redis_url_for_bench(redis) as address:
        return asyncio.run(main(address))


def _verdict(ok: bool) -> str:
    return "ok" if ok else "OVER"


def format_report(r: dict[str, Any]) -> str:
    opts = r["options"]
    lines = [f"feature store bench: {opts['entities']} entities x {opts['metrics']} series, "
             f"state {r['series_state_bytes']} bytes per series "
             f"(load {r['environment']['loadavg_start']} -> {r['environment']['loadavg_end']})",
             "",
             "batch   enrich us/event (median, mean, min)   raw HGETALL us/event   ratio"
             "   client CPU us/event: enrich, HGETALL, ratio"]
    for size, b in r["batches"].items():
        e, h = b["enrich_us"], b["hgetall_us"]
        ec, hc = b["enrich_cpu_us"]["median"], b["hgetall_cpu_us"]["median"]
        lines.append(f"{size:>5}   {e['median']:>8.2f} {e['mean']:>8.2f} {e['min']:>8.2f}"
                     f"              {h['median']:>8.2f}              {b['ratio']:>5.2f}x"
                     f"   {ec:>8.2f} {hc:>8.2f} {b['cpu_ratio']:>5.2f}x")
    largest = max(int(s) for s in r["batches"])
    stages = r[f"stages_us_per_event_batch_{largest}"]
    lines += ["", f"batch {largest} by stage (us/event): " + ", ".join(
        f"{k} {v:.2f}" for k, v in stages.items()),
        f"unpipelined HGETALL: {r['hgetall_unpipelined_us']:.1f} us/call", ""]
    big = [int(s) for s in r["batches"] if int(s) >= 500]
    for size in big:
        b = r["batches"][str(size)]
        us = b["enrich_us"]["median"]
        lines.append(f"target <= {TARGET_US_PER_EVENT:g} us/event at batch {size}: "
                     f"{us:.2f} ({_verdict(us <= TARGET_US_PER_EVENT)}); "
                     f"relative to HGETALL {b['ratio']:.2f}x vs the issue's "
                     f"{REFERENCE_RATIO:.1f}x ({_verdict(b['ratio'] <= REFERENCE_RATIO)})")
    for key, label in (("redis_bytes_per_entity_metric", "per (entity, metric)"),
                       ("redis_bytes_per_entity_metric_single_series",
                        "per (entity, metric), one series per entity")):
        lines.append(f"target <= {TARGET_BYTES} bytes {label}: {r[key]:.0f} "
                     f"({_verdict(r[key] <= TARGET_BYTES)})")
    lines.append(f"with the detector's state (not a feature) in the same hash: "
                 f"{r['redis_bytes_per_entity_metric_with_detector_state']:.0f} bytes "
                 "per (entity, metric)")
    return "\n".join(lines)
