"""A simulated fleet of services for ``ia demo``: metrics, incidents, remediation.

Why a simulator: the closed loop (telemetry -> decisions -> actions ->
outcomes) is only convincing if actions *change what is measured next*.  Here
a seeded :class:`Fleet` emits realistic metrics for ``svc-00..``, injects
incidents on a deterministic schedule, and an action posted to the
:class:`SimulatorServer` control API really ends an incident -- when it is the
right one -- so the metrics the pipeline sees next return to normal.

Time is *simulated*: every timestamp is event time in milliseconds, starting at
:data:`SIM_EPOCH_MS` (2026-01-01T00:00:00Z) so a seed reproduces the exact same
telemetry, and :func:`run_simulation` paces it against the wall clock at
``speed`` simulated seconds per wall second (60 by default: the 100-minute
default run takes 100 wall seconds).  Kafka message timestamps are left to the
producer (wall clock) so broker retention never sees "old" records; the event
time lives in the JSON ``ts`` field, which is what the pipeline uses.

The model is pure and deterministic given a seed: no I/O, and the random
stream consumed per tick does not depend on actions, so a run with automation
and one without see the same noise.  Noise is Gaussian (latency mildly
right-skewed, as a p99 is) plus a slow Ornstein-Uhlenbeck wobble: realistic
enough to need a learnt baseline, but not heavy-tailed, so an EWMA z-score
detector (``ia.features.series``) stays quiet between incidents.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from aiohttp import web

from ia.core.kafka import Brokers, producer
from ia.schemas.models import EventKind, TelemetryEvent

log = logging.getLogger("ia.simulator")

# -- defaults (the CLI's defaults match) ------------------------------------------------

DEFAULT_SEED = 7
DEFAULT_N_SERVICES = 6
DEFAULT_N_INCIDENTS = 6
DEFAULT_DURATION_S = 6000.0          # 100 simulated minutes
DEFAULT_SPEED = 60.0                 # simulated seconds per wall second
DEFAULT_SAMPLE_INTERVAL_S = 10.0     # one sample per series every 10 simulated seconds
DEFAULT_PROGRESS_EVERY_S = 300.0     # on_progress every 5 simulated minutes
DEFAULT_BENIGN_DEPLOYS = 3
# 2026-01-01T00:00:00Z: a fixed epoch makes a seed reproduce byte-identical telemetry.
SIM_EPOCH_MS = 1_767_225_600_000
# No incident in the first 15 simulated minutes: 90 samples per series, enough
# for the EWMA baselines (20-sample warm-up) and the detector's confidence ramp.
WARMUP_S = 900.0
# Incidents start at least this long before the end, so even a memory leak
# (the slowest to become detectable) has time to be noticed and acted on.
DETECTION_TAIL_S = 1200.0

METRICS = ("latency_p99_ms", "error_rate", "cpu_pct", "memory_pct")
OPS = ("restart", "rollback", "scale_out")
INCIDENT_TYPES = ("memory_leak", "bad_deploy", "latency_spike", "cpu_saturation")
# The op that fixes each incident type; any other op is a no-op on it.  Why a
# restart ends a memory leak here although an OOM kill does not: the leak is
# modelled as triggered by a runtime setting (an unbounded cache) that was
# hot-fixed in the config store when the incident began; the kernel's OOM kill
# restarts the same container with its old in-memory config, whereas the
# control plane's restart is a rolling restart that re-reads configuration.
REMEDIATION = {"memory_leak": "restart", "bad_deploy": "rollback",
               "latency_spike": "scale_out", "cpu_saturation": "scale_out"}
REGIONS = ("eu-west-1", "us-east-1", "ap-southeast-1")

# Modelled human recovery time per incident type, in simulated seconds: the
# "same incidents without automation" baseline.  These are assumptions, not
# measurements, in line with commonly published on-call figures (MTTA of
# 5-15 min, MTTR of 30-60 min for paged incidents):
#   alert delay (rule `for:` window + evaluation)  ~5 min
#   page -> acknowledge                            ~5-10 min
#   diagnose                                       ~10-20 min
#   fix and verify                                 ~5-15 min
# A leak is slow to diagnose (heap dumps), a bad deploy is quick once someone
# looks at the deploy log, a traffic surge is obvious but scaling takes a while.
MANUAL_RECOVERY_S = {"memory_leak": 45 * 60.0, "bad_deploy": 35 * 60.0,
                     "latency_spike": 30 * 60.0, "cpu_saturation": 40 * 60.0}

# Magnitude drawn per incident: leak in memory-% per simulated minute, error
# rate reached by a bad deploy, latency multiplier of a surge, CPU % at saturation.
MAGNITUDE = {"memory_leak": (2.0, 3.0), "bad_deploy": (0.06, 0.10),
             "latency_spike": (3.0, 4.0), "cpu_saturation": (93.0, 97.0)}
# How long an incident takes to reach full strength (rollout, traffic ramp).
RAMP_S = {"memory_leak": 0.0, "bad_deploy": 30.0, "latency_spike": 60.0,
          "cpu_saturation": 60.0}
OOM_PCT = 98.0
BAD_DEPLOY_LATENCY_FACTOR = 1.10     # "modest": below the scale-out rule's threshold
SURGE_CPU_POINTS = 25.0
SATURATION_LATENCY_FACTOR = 2.0

_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,255}")
_MAX_BODY = 64 * 1024


@dataclass(frozen=True)
class MetricSpec:
    """Per-metric noise, all as fractions of the service's baseline level.

    ``noise`` is per-sample; ``wobble`` is the stationary deviation of a slow
    Ornstein-Uhlenbeck drift with time constant ``tau_s`` (no daily cycle).
    """

    noise: float
    wobble: float
    tau_s: float
    lo: float
    hi: float


SPECS = {
    "latency_p99_ms": MetricSpec(noise=0.04, wobble=0.03, tau_s=1200.0, lo=1.0, hi=1e6),
    "error_rate": MetricSpec(noise=0.12, wobble=0.08, tau_s=900.0, lo=0.0, hi=1.0),
    "cpu_pct": MetricSpec(noise=0.045, wobble=0.05, tau_s=900.0, lo=0.0, hi=100.0),
    "memory_pct": MetricSpec(noise=0.0065, wobble=0.015, tau_s=1800.0, lo=0.0, hi=100.0),
}
# Shape of the gamma behind latency noise: a skew of 2/sqrt(100) = 0.2, mildly
# right-tailed like a p99, with a tail still light enough for a z-score detector.
_LATENCY_GAMMA_SHAPE = 100.0


def service_names(n: int) -> list[str]:
    return [f"svc-{i:02d}" for i in range(n)]


# -- incidents and schedule -------------------------------------------------------------

@dataclass
class Incident:
    """One injected incident and what became of it.

    ``end_ts`` stays None while it is active; ``remediated_by`` is the op that
    ended it, or ``"manual"`` when the modelled humans got there first.
    ``detected_ts`` is when the first action of any kind reached its service.
    """

    id: str
    type: str
    service: str
    start_ts: int
    manual_recovery_s: float
    magnitude: float = 1.0
    end_ts: int | None = None
    remediated_by: str | None = None
    detected_ts: int | None = None
    detected_op: str | None = None
    oom_restarts: int = 0

    @property
    def correct_op(self) -> str:
        return REMEDIATION[self.type]

    @property
    def manual_end_ts(self) -> int:
        return self.start_ts + round(self.manual_recovery_s * 1000)

    def active_at(self, ts: int) -> bool:
        return self.start_ts <= ts and (self.end_ts is None or ts < self.end_ts)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _incident_types(rng: random.Random, n: int) -> list[str]:
    """Every type at least once when there is room, so a demo shows them all."""
    if n < len(INCIDENT_TYPES):
        return rng.sample(INCIDENT_TYPES, n)
    kinds = list(INCIDENT_TYPES) + [rng.choice(INCIDENT_TYPES)
                                    for _ in range(n - len(INCIDENT_TYPES))]
    rng.shuffle(kinds)
    return kinds


def _pick_service(rng: random.Random, busy_until: dict[str, float], used: dict[str, int],
                  start_s: float) -> str | None:
    """A free service, preferring the least used, so incidents spread over the fleet."""
    free = [s for s, until in busy_until.items() if until <= start_s]
    if not free:
        return None
    least = min(used[s] for s in free)
    return rng.choice([s for s in free if used[s] == least])


def make_schedule(seed: int = DEFAULT_SEED, n_services: int = DEFAULT_N_SERVICES,
                  duration_s: float = DEFAULT_DURATION_S,
                  n_incidents: int = DEFAULT_N_INCIDENTS, *, start_ts_ms: int = SIM_EPOCH_MS,
                  warmup_s: float = WARMUP_S,
                  manual_recovery_s: Mapping[str, float] | None = None) -> list[Incident]:
    """A deterministic incident schedule spread over the run after the warm-up.

    Starts fall in equal slots of ``[warmup_s, duration_s - DETECTION_TAIL_S]``
    with jitter.  A service is busy until its incident's *manual* end (the
    latest it can end), so no service ever has two incidents at once.
    """
    if n_incidents <= 0:
        return []
    if n_services <= 0:
        raise ValueError("need at least one service")
    rng = random.Random(f"schedule:{seed}")
    recovery = {**MANUAL_RECOVERY_S, **(manual_recovery_s or {})}
    latest = max(warmup_s, duration_s - DETECTION_TAIL_S)
    slot = (latest - warmup_s) / n_incidents
    busy_until = dict.fromkeys(service_names(n_services), 0.0)
    used = dict.fromkeys(busy_until, 0)
    incidents = []
    for i, kind in enumerate(_incident_types(rng, n_incidents)):
        start_s = warmup_s + slot * i + rng.uniform(0.0, 0.6) * slot
        svc = _pick_service(rng, busy_until, used, start_s)
        if svc is None:  # every service busy: wait for the first to free up
            svc = min(busy_until, key=lambda s: busy_until[s])
            start_s = busy_until[svc]
        if start_s >= duration_s:
            raise ValueError(f"cannot fit {n_incidents} incidents on {n_services} services "
                             f"in {duration_s:g}s")
        start_s = float(math.ceil(start_s))
        busy_until[svc] = start_s + recovery[kind]
        used[svc] += 1
        incidents.append(Incident(
            id=f"inc-{i + 1:02d}", type=kind, service=svc,
            start_ts=start_ts_ms + round(start_s * 1000), manual_recovery_s=recovery[kind],
            magnitude=round(rng.uniform(*MAGNITUDE[kind]), 4)))
    return incidents


def make_benign_deploys(seed: int, n_services: int, duration_s: float,
                        incidents: Sequence[Incident], n: int = DEFAULT_BENIGN_DEPLOYS, *,
                        start_ts_ms: int = SIM_EPOCH_MS,
                        warmup_s: float = WARMUP_S) -> list[tuple[int, str]]:
    """Healthy deploys ``(ts_ms, service)``, so a deploy alone never implies a rollback.

    They land after the warm-up on services with no incident planned at the time.
    """
    rng = random.Random(f"deploys:{seed}")
    services = service_names(n_services)
    out: list[tuple[int, str]] = []
    for _ in range(n):
        for _attempt in range(50):
            ts = start_ts_ms + round(rng.uniform(warmup_s, max(warmup_s, duration_s - 60)) * 1000)
            svc = rng.choice(services)
            if not any(i.service == svc and i.start_ts <= ts <= i.manual_end_ts
                       for i in incidents):
                out.append((ts, svc))
                break
    return sorted(out)


# -- the fleet --------------------------------------------------------------------------

@dataclass
class _Service:
    name: str
    labels: dict[str, str]
    base: dict[str, float]
    wobble: dict[str, float]
    replicas: int = 3
    version: int = 1
    leak_origin_ts: int | None = None


@dataclass
class _Counters:
    actions_received: int = 0
    actions_remediating: int = 0
    false_actions: int = 0
    wrong_op_actions: int = 0
    duplicate_actions: int = 0
    oom_restarts: int = 0
    benign_deploys: int = 0


class Fleet:
    """The simulated services: metrics per tick, incidents, and their remediation.

    Pure and deterministic given the seed (and the sequence of ticks and
    actions).  Simulated time only moves forward: ``tick`` and
    ``apply_action`` both advance ``now_ms``, and a tick before it is refused.
    Without an action an incident ends at its modelled manual recovery time
    (the humans still work), with the fix showing up in telemetry as theirs.
    """

    def __init__(self, seed: int = DEFAULT_SEED, n_services: int = DEFAULT_N_SERVICES,
                 duration_s: float = DEFAULT_DURATION_S,
                 n_incidents: int = DEFAULT_N_INCIDENTS, *, start_ts_ms: int = SIM_EPOCH_MS,
                 incidents: Sequence[Incident] | None = None,
                 benign_deploys: Sequence[tuple[int, str]] | None = None,
                 n_benign_deploys: int = DEFAULT_BENIGN_DEPLOYS,
                 manual_recovery_s: Mapping[str, float] | None = None,
                 warmup_s: float = WARMUP_S) -> None:
        self.seed = seed
        self.duration_s = float(duration_s)
        self.start_ts_ms = start_ts_ms
        self.now_ms = start_ts_ms
        self._rng = random.Random(f"fleet:{seed}")
        self._services = {name: self._new_service(i, name)
                          for i, name in enumerate(service_names(n_services))}
        if incidents is None:
            incidents = make_schedule(seed, n_services, duration_s, n_incidents,
                                      start_ts_ms=start_ts_ms, warmup_s=warmup_s,
                                      manual_recovery_s=manual_recovery_s)
        self.incidents = sorted((replace(i) for i in incidents), key=lambda i: i.start_ts)
        unknown = {i.service for i in self.incidents} - self._services.keys()
        if unknown:
            raise ValueError(f"incidents on unknown services: {sorted(unknown)}")
        if benign_deploys is None:
            benign_deploys = make_benign_deploys(seed, n_services, duration_s, self.incidents,
                                                 n_benign_deploys, start_ts_ms=start_ts_ms,
                                                 warmup_s=warmup_s)
        self._pending_deploys = sorted(benign_deploys)
        self._started: set[str] = set()
        self._queued: list[TelemetryEvent] = []
        self._last_sample_ts: int | None = None
        self._results: dict[str, dict[str, Any]] = {}
        self.counters = _Counters()

    # -- construction ------------------------------------------------------------------

    def _new_service(self, index: int, name: str) -> _Service:
        """Per-service baselines differ a little, as real services do."""
        rng = random.Random(f"service:{self.seed}:{index}")
        base = {"latency_p99_ms": 120.0 * rng.uniform(0.85, 1.15),
                "error_rate": 0.005 * rng.uniform(0.7, 1.3),
                "cpu_pct": 40.0 + rng.uniform(-5.0, 5.0),
                "memory_pct": 55.0 + rng.uniform(-5.0, 5.0)}
        wobble = {m: rng.gauss(0.0, SPECS[m].wobble * base[m]) for m in METRICS}
        labels = {"service": name, "env": "demo", "region": REGIONS[index % len(REGIONS)]}
        return _Service(name=name, labels=labels, base=base, wobble=wobble)

    # -- queries -----------------------------------------------------------------------

    @property
    def services(self) -> list[str]:
        return list(self._services)

    @property
    def run_end_ts(self) -> int:
        return self.start_ts_ms + round(self.duration_s * 1000)

    def has_service(self, name: str) -> bool:
        return name in self._services

    def baseline(self, service: str, metric: str) -> float:
        """The healthy level of a series (before wobble and noise)."""
        return self._services[service].base[metric]

    def noise_sd(self, service: str, metric: str) -> float:
        """Per-sample plus wobble standard deviation of a healthy series."""
        spec, base = SPECS[metric], self._services[service].base[metric]
        return math.hypot(spec.noise, spec.wobble) * base

    def active_incident(self, service: str, ts: int | None = None) -> Incident | None:
        at = self.now_ms if ts is None else ts
        return next((i for i in self.incidents
                     if i.service == service and i.id in self._started and i.active_at(at)),
                    None)

    # -- time --------------------------------------------------------------------------

    def tick(self, sim_ts_ms: int) -> list[TelemetryEvent]:
        """All events up to ``sim_ts_ms``: discrete events first, then one sample per series."""
        if sim_ts_ms < self.now_ms:
            raise ValueError("simulated time cannot go backwards")
        self._advance(sim_ts_ms)
        dt_s = 0.0 if self._last_sample_ts is None else (sim_ts_ms - self._last_sample_ts) / 1e3
        self._last_sample_ts = sim_ts_ms
        events = sorted(self._queued, key=lambda e: e.ts)
        self._queued = []
        for svc in self._services.values():
            events.extend(self._sample(svc, sim_ts_ms, dt_s))
        return events

    def _advance(self, ts: int) -> None:
        """Start, OOM-restart and manually end incidents, and deploy, up to ``ts``."""
        self.now_ms = max(self.now_ms, ts)
        while self._pending_deploys and self._pending_deploys[0][0] <= ts:
            dts, name = self._pending_deploys.pop(0)
            self._deploy(self._services[name], dts, change="release")
            self.counters.benign_deploys += 1
        for inc in self.incidents:
            if inc.start_ts > ts:
                break
            if inc.id not in self._started:
                self._start(inc)
            if inc.end_ts is None:
                self._advance_incident(inc, ts)

    def _start(self, inc: Incident) -> None:
        self._started.add(inc.id)
        svc = self._services[inc.service]
        if inc.type == "bad_deploy":
            self._deploy(svc, inc.start_ts, change="release")
        elif inc.type == "memory_leak":
            svc.leak_origin_ts = inc.start_ts

    def _advance_incident(self, inc: Incident, ts: int) -> None:
        horizon = min(ts, inc.manual_end_ts)
        if inc.type == "memory_leak":
            self._oom_restarts(inc, horizon)
        if inc.manual_end_ts <= ts:
            self._end(inc, inc.manual_end_ts, "manual")
            self._queue_op_event(self._services[inc.service], REMEDIATION[inc.type],
                                 inc.manual_end_ts, by="human")

    def _oom_restarts(self, inc: Incident, until_ts: int) -> None:
        """The kernel kills the service each time the leak reaches OOM_PCT; the leak goes on."""
        svc = self._services[inc.service]
        assert svc.leak_origin_ts is not None
        headroom = OOM_PCT - svc.base["memory_pct"]
        while True:
            crash_ts = svc.leak_origin_ts + round(headroom / inc.magnitude * 60_000)
            if crash_ts > until_ts:
                return
            svc.leak_origin_ts = crash_ts
            inc.oom_restarts += 1
            self.counters.oom_restarts += 1
            self._queue(svc, "restart", crash_ts, 1.0, {"reason": "oom_killed"})

    def _end(self, inc: Incident, ts: int, by: str) -> None:
        inc.end_ts = ts
        inc.remediated_by = by
        self._services[inc.service].leak_origin_ts = None

    # -- discrete events ---------------------------------------------------------------

    def _queue(self, svc: _Service, metric: str, ts: int, value: float,
               extra: Mapping[str, str]) -> None:
        self._queued.append(TelemetryEvent(entity=svc.name, metric=metric, value=value, ts=ts,
                                           labels={**svc.labels, **extra},
                                           kind=EventKind.event))

    def _deploy(self, svc: _Service, ts: int, change: str) -> None:
        svc.version = svc.version + 1 if change == "release" else max(1, svc.version - 1)
        self._queue(svc, "deploy", ts, 1.0, {"change": change, "version": f"v1.{svc.version}.0"})

    def _queue_op_event(self, svc: _Service, op: str, ts: int, by: str) -> None:
        """What an operation looks like in telemetry, whoever performed it."""
        if op == "rollback":
            self._deploy(svc, ts, change="rollback")
        elif op == "scale_out":
            svc.replicas += 1
            self._queue(svc, "scale", ts, float(svc.replicas), {"by": by})
        else:
            self._queue(svc, "restart", ts, 1.0, {"reason": "requested", "by": by})

    # -- metrics -----------------------------------------------------------------------

    def _sample(self, svc: _Service, ts: int, dt_s: float) -> list[TelemetryEvent]:
        """One sample per metric.  Draws a fixed amount of randomness whatever the state."""
        values = {m: self._healthy(svc, m, dt_s) for m in METRICS}
        incident_noise = self._rng.gauss(0.0, 1.0)
        inc = self.active_incident(svc.name, ts)
        if inc is not None:
            self._apply_incident(inc, svc, values, ts, incident_noise)
        return [TelemetryEvent(entity=svc.name, metric=m, ts=ts, labels=dict(svc.labels),
                               value=round(min(SPECS[m].hi, max(SPECS[m].lo, values[m])), 6))
                for m in METRICS]

    def _healthy(self, svc: _Service, metric: str, dt_s: float) -> float:
        spec, base = SPECS[metric], svc.base[metric]
        decay = math.exp(-dt_s / spec.tau_s)
        svc.wobble[metric] = (svc.wobble[metric] * decay + spec.wobble * base
                              * math.sqrt(1.0 - decay * decay) * self._rng.gauss(0.0, 1.0))
        if metric == "latency_p99_ms":
            k = _LATENCY_GAMMA_SHAPE
            unit = (self._rng.gammavariate(k, 1.0) - k) / math.sqrt(k)
        else:
            unit = self._rng.gauss(0.0, 1.0)
        return base + svc.wobble[metric] + spec.noise * base * unit

    def _apply_incident(self, inc: Incident, svc: _Service, v: dict[str, float], ts: int,
                        noise: float) -> None:
        ramp = RAMP_S[inc.type]
        sev = 1.0 if ramp <= 0 else min(1.0, (ts - inc.start_ts) / (ramp * 1000))
        if inc.type == "memory_leak" and svc.leak_origin_ts is not None:
            v["memory_pct"] += inc.magnitude * max(0, ts - svc.leak_origin_ts) / 60_000
        elif inc.type == "bad_deploy":
            v["error_rate"] += sev * (inc.magnitude - svc.base["error_rate"]
                                      + 0.08 * inc.magnitude * noise)
            v["latency_p99_ms"] *= 1.0 + (BAD_DEPLOY_LATENCY_FACTOR - 1.0) * sev
        elif inc.type == "latency_spike":
            v["latency_p99_ms"] *= 1.0 + (inc.magnitude - 1.0) * sev
            v["cpu_pct"] += SURGE_CPU_POINTS * sev
        elif inc.type == "cpu_saturation":
            v["cpu_pct"] += sev * (inc.magnitude - svc.base["cpu_pct"])
            v["latency_p99_ms"] *= 1.0 + (SATURATION_LATENCY_FACTOR - 1.0) * sev

    # -- actions -----------------------------------------------------------------------

    def apply_action(self, op: str, service: str, decision_id: str,
                     sim_ts_ms: int | None = None) -> dict[str, Any]:
        """Perform ``op`` on ``service`` and report what it did.

        Idempotent per ``decision_id``: a repeat returns the first result with
        ``duplicate: true`` and changes nothing.  The right op ends the active
        incident; a wrong op does nothing to it; any op on a healthy service is
        a false action.  Time is ``max(sim_ts_ms, now)``: actions cannot land
        in the past.  Raises ValueError for an unknown op, KeyError for an
        unknown service.
        """
        if decision_id in self._results:
            self.counters.duplicate_actions += 1
            return {**self._results[decision_id], "duplicate": True}
        if op not in OPS:
            raise ValueError(f"unknown op; expected one of {', '.join(OPS)}")
        if service not in self._services:
            raise KeyError(service)
        ts = self.now_ms if sim_ts_ms is None else max(sim_ts_ms, self.now_ms)
        self._advance(ts)
        self.counters.actions_received += 1
        inc = self.active_incident(service, ts)
        self._queue_op_event(self._services[service], op, ts, by="automation")
        result = self._judge(op, inc, ts)
        result.update(decision_id=decision_id, service=service, op=op, ts=ts, duplicate=False)
        self._results[decision_id] = result
        return dict(result)

    def _judge(self, op: str, inc: Incident | None, ts: int) -> dict[str, Any]:
        if inc is None:
            self.counters.false_actions += 1
            return {"effect": "false_action", "false_action": True, "incident": None,
                    "remediated_incident": None}
        if inc.detected_ts is None:
            inc.detected_ts, inc.detected_op = ts, op
        if op != inc.correct_op:
            self.counters.wrong_op_actions += 1
            return {"effect": "no_effect", "false_action": False, "incident": inc.id,
                    "remediated_incident": None}
        self._end(inc, ts, op)
        self.counters.actions_remediating += 1
        return {"effect": "remediated", "false_action": False, "incident": inc.id,
                "remediated_incident": inc.id}

    # -- reporting ---------------------------------------------------------------------

    def _incident_report(self, inc: Incident, horizon: int) -> dict[str, Any]:
        """One incident's outcome, open incidents counted as ending at the run end."""
        end_with = min(inc.end_ts if inc.end_ts is not None else inc.manual_end_ts, horizon)
        end_without = min(inc.manual_end_ts, horizon)
        by = inc.remediated_by if inc.end_ts is not None and inc.end_ts <= horizon else None
        if by is None:
            by = "manual" if inc.manual_end_ts <= horizon else "unresolved_at_run_end"
        return {
            "id": inc.id, "type": inc.type, "service": inc.service,
            "magnitude": inc.magnitude, "start_ts": inc.start_ts, "end_ts": end_with,
            "end_without_automation_ts": end_without, "detected_ts": inc.detected_ts,
            "detected_op": inc.detected_op,
            "time_to_detect_s": (None if inc.detected_ts is None
                                 else (inc.detected_ts - inc.start_ts) / 1000),
            "remediated_by": by, "correct_op": inc.correct_op,
            "duration_s": (end_with - inc.start_ts) / 1000,
            "duration_without_automation_s": (end_without - inc.start_ts) / 1000,
            "manual_recovery_s": inc.manual_recovery_s, "oom_restarts": inc.oom_restarts,
        }

    def summary(self) -> dict[str, Any]:
        """The run's outcome: MTTR with automation against the modelled manual baseline.

        Incidents are those started by the run end.  Durations are truncated at
        the run end (an incident still open then counts as ending there), the
        same way for both MTTRs, so without any action they are equal.  The
        MTTRs are 0.0 when no incident started.
        """
        horizon = self.run_end_ts
        reports = [self._incident_report(i, horizon) for i in self.incidents
                   if i.start_ts <= horizon]
        n = len(reports)
        return {
            "seed": self.seed, "services": self.services, "run_start_ts": self.start_ts_ms,
            "run_end_ts": horizon, "duration_s": self.duration_s,
            "incidents": reports, "incidents_injected": n,
            "incidents_remediated_by_action": sum(r["remediated_by"] in OPS for r in reports),
            "mttr_with_automation_seconds": (
                sum(r["duration_s"] for r in reports) / n if n else 0.0),
            "mttr_without_automation_seconds": (
                sum(r["duration_without_automation_s"] for r in reports) / n if n else 0.0),
            **asdict(self.counters),
        }

    def state(self) -> dict[str, Any]:
        """Live view for ``GET /state``: started incidents only (the schedule stays hidden)."""
        return {
            "now_ts": self.now_ms, "run_start_ts": self.start_ts_ms,
            "run_end_ts": self.run_end_ts,
            "services": {s.name: {"replicas": s.replicas, "version": f"v1.{s.version}.0",
                                  "region": s.labels["region"],
                                  "active_incident": getattr(self.active_incident(s.name),
                                                             "id", None)}
                         for s in self._services.values()},
            "incidents": [i.to_dict() for i in self.incidents if i.id in self._started],
            "incidents_scheduled": len(self.incidents),
            "counters": asdict(self.counters),
        }


# -- control API ------------------------------------------------------------------------

class _BadRequest(ValueError):
    pass


def _opt_str(obj: Mapping[str, Any], key: str) -> str | None:
    """A bounded non-empty string field, or None when absent."""
    v = obj.get(key)
    if v is None:
        return None
    if not isinstance(v, str) or not v or len(v) > 256:
        raise _BadRequest(f"'{key}' must be a non-empty string of at most 256 characters")
    return v


def parse_action(body: Any, idempotency_key: str | None) -> tuple[str, str, str]:
    """Validate a posted action; return ``(op, service, decision_id)``.

    Everything in the body is untrusted: only known shapes pass, error
    messages never echo the input, and the decision id must look like an id.
    The service is ``action.target`` (falling back to ``entity``).
    """
    if not isinstance(body, dict):
        raise _BadRequest("body must be a JSON object")
    action = body.get("action")
    if not isinstance(action, dict):
        raise _BadRequest("'action' must be an object")
    if _opt_str(action, "type") != "simulator":
        raise _BadRequest("'action.type' must be 'simulator'")
    params = action.get("params")
    op = params.get("op") if isinstance(params, dict) else None
    if not isinstance(op, str) or op not in OPS:
        raise _BadRequest(f"'action.params.op' must be one of {', '.join(OPS)}")
    target = _opt_str(action, "target") or _opt_str(body, "entity")
    if target is None:
        raise _BadRequest("'action.target' is required")
    decision_id = _opt_str(body, "decision_id") or idempotency_key
    if not decision_id or not _ID_RE.fullmatch(decision_id):
        raise _BadRequest("'decision_id' (or Idempotency-Key) must be an id: letters, digits, "
                          "'.', '_', ':' or '-'")
    if idempotency_key is not None and idempotency_key != decision_id:
        raise _BadRequest("Idempotency-Key does not match 'decision_id'")
    return op, target, decision_id


class SimulatorServer:
    """The fleet's control plane: ``POST /actions`` and ``GET /state`` on 127.0.0.1.

    Start it before the simulation so the actuator can be given ``.url``; the
    fleet is attached when the run begins (actions before that get 503).
    """

    def __init__(self, fleet: Fleet | None = None, *, host: str = "127.0.0.1",
                 port: int = 0) -> None:
        self.fleet = fleet
        self.host = host
        self.port = port
        self.app = web.Application(client_max_size=_MAX_BODY)
        self.app.router.add_post("/actions", self._post_action)
        self.app.router.add_get("/state", self._get_state)
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    def attach(self, fleet: Fleet) -> None:
        self.fleet = fleet

    @property
    def url(self) -> str:
        if self._url is None:
            raise RuntimeError("SimulatorServer is not started")
        return self._url

    async def start(self) -> str:
        """Bind (port 0 picks a free one) and return the base URL."""
        self._runner = web.AppRunner(self.app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self._url = f"http://{host}:{port}"
        return self._url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        self._runner, self._url = None, None

    async def __aenter__(self) -> SimulatorServer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def _post_action(self, request: web.Request) -> web.Response:
        try:
            body = json.loads(await request.read())
        except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
            return _error(400, "body is not valid JSON")
        try:
            op, service, decision_id = parse_action(body, request.headers.get("Idempotency-Key"))
        except _BadRequest as exc:
            return _error(400, str(exc))
        if self.fleet is None:
            return _error(503, "simulation not running yet")
        if not self.fleet.has_service(service):
            return _error(404, "unknown service")
        return web.json_response(self.fleet.apply_action(op, service, decision_id))

    async def _get_state(self, request: web.Request) -> web.Response:
        if self.fleet is None:
            return web.json_response({"running": False})
        return web.json_response({"running": True, **self.fleet.state()})


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


# -- driving the simulation -------------------------------------------------------------

ProgressCallback = Callable[[dict[str, Any]], Any]


def progress_of(fleet: Fleet, events_emitted: int) -> dict[str, Any]:
    """A small status snapshot for progress output."""
    active = [i for i in fleet.incidents if i.end_ts is None and i.start_ts <= fleet.now_ms]
    return {
        "sim_ts": fleet.now_ms, "elapsed_s": (fleet.now_ms - fleet.start_ts_ms) / 1000,
        "duration_s": fleet.duration_s, "events_emitted": events_emitted,
        "active_incidents": [{"id": i.id, "type": i.type, "service": i.service}
                             for i in active],
        "incidents_started": sum(i.start_ts <= fleet.now_ms for i in fleet.incidents),
        "actions_received": fleet.counters.actions_received,
        "actions_remediating": fleet.counters.actions_remediating,
        "false_actions": fleet.counters.false_actions,
    }


async def _notify(on_progress: ProgressCallback | None, fleet: Fleet, emitted: int) -> None:
    if on_progress is not None:
        res = on_progress(progress_of(fleet, emitted))
        if inspect.isawaitable(res):
            await res


async def drive(fleet: Fleet, emit: Callable[[list[TelemetryEvent]], None], *,
                speed: float = DEFAULT_SPEED,
                sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S,
                on_progress: ProgressCallback | None = None,
                progress_every_s: float = DEFAULT_PROGRESS_EVERY_S) -> int:
    """Tick ``fleet`` from its start to its run end, paced at ``speed``; return events emitted.

    Pacing is against a fixed wall-clock origin, so slow ticks do not
    accumulate drift.  Every tick yields to the event loop, which is what lets
    the control API's handlers (same loop) land actions between samples.
    """
    if speed <= 0 or sample_interval_s <= 0:
        raise ValueError("speed and sample_interval_s must be positive")
    loop = asyncio.get_running_loop()
    interval_ms = max(1, round(sample_interval_s * 1000))
    n_ticks = round(fleet.duration_s * 1000) // interval_ms
    origin, emitted, next_progress = loop.time(), 0, 0.0
    for i in range(n_ticks + 1):
        offset_s = i * interval_ms / 1000
        await asyncio.sleep(max(0.0, origin + offset_s / speed - loop.time()))
        events = fleet.tick(fleet.start_ts_ms + i * interval_ms)
        emit(events)
        emitted += len(events)
        if offset_s >= next_progress or i == n_ticks:
            await _notify(on_progress, fleet, emitted)
            while next_progress <= offset_s:
                next_progress += max(progress_every_s, sample_interval_s)
    return emitted


class _KafkaSink:
    """Produces telemetry: key = entity, value = the event's JSON contract."""

    def __init__(self, kafka: Brokers, topic: str,
                 config: Mapping[str, Any] | None = None) -> None:
        self.topic = topic
        self.producer = producer(kafka, {"linger.ms": 5, "acks": "all", **(config or {})})
        self.delivered = 0
        self.errors = 0
        self.last_error: str | None = None

    def _on_delivery(self, err: Any, _msg: Any) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.errors += 1
            self.last_error = str(err)

    def __call__(self, events: list[TelemetryEvent]) -> None:
        for ev in events:
            value = json.dumps(ev.model_dump(mode="json"), separators=(",", ":")).encode()
            self._produce(ev.entity.encode(), value)
        self.producer.poll(0)

    def _produce(self, key: bytes, value: bytes) -> None:
        while True:
            try:
                self.producer.produce(self.topic, value=value, key=key,
                                      on_delivery=self._on_delivery)
                return
            except BufferError:  # local queue full: let librdkafka drain a little
                self.producer.poll(0.05)

    def flush(self, timeout_s: float) -> int:
        return self.producer.flush(timeout_s)


async def run_simulation(kafka: Brokers, topic: str, *, seed: int = DEFAULT_SEED,
                         speed: float = DEFAULT_SPEED,
                         sample_interval_s: float = DEFAULT_SAMPLE_INTERVAL_S,
                         duration_s: float = DEFAULT_DURATION_S,
                         n_services: int = DEFAULT_N_SERVICES,
                         n_incidents: int = DEFAULT_N_INCIDENTS,
                         server: SimulatorServer | None = None,
                         on_progress: ProgressCallback | None = None,
                         start_ts_ms: int = SIM_EPOCH_MS,
                         progress_every_s: float = DEFAULT_PROGRESS_EVERY_S,
                         producer_config: Mapping[str, Any] | None = None,
                         flush_timeout_s: float = 30.0) -> dict[str, Any]:
    """Stream the simulated fleet into ``topic`` in accelerated time; return the summary.

    The fleet is attached to ``server`` (if given) so actions posted to it
    change the metrics produced from then on.  Pass a different
    ``start_ts_ms`` to re-run a seed against state (Redis features, cooldown
    claims, idempotency keys) left by an earlier run: identical timestamps
    give identical event ids, which the pipeline would treat as duplicates.
    """
    fleet = Fleet(seed, n_services, duration_s, n_incidents, start_ts_ms=start_ts_ms)
    if server is not None:
        server.attach(fleet)
    sink = _KafkaSink(kafka, topic, producer_config)
    emitted = await drive(fleet, sink, speed=speed, sample_interval_s=sample_interval_s,
                          on_progress=on_progress, progress_every_s=progress_every_s)
    undelivered = await asyncio.to_thread(sink.flush, flush_timeout_s)
    if undelivered or sink.errors:
        log.warning("telemetry: %d undelivered, %d delivery errors (last: %s)",
                    undelivered, sink.errors, sink.last_error)
    return {**fleet.summary(), "events_produced": emitted, "events_delivered": sink.delivered,
            "delivery_errors": sink.errors, "events_undelivered": undelivered}
