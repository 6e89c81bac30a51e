"""Changes judged over history: every ``kind: event`` change (a deploy, by default) of
an entity, and its effect on the watched metrics (:mod:`ia.decisions.change_judge`).

History is read in order.  Each series keeps its samples of the last ``baseline_s``;
when a change arrives for an entity, each watched metric with enough of them starts a
judgement, fed by that series' later samples until the judge answers.  The peers of a
sample are the other entities that report the metric: the mean of their latest values
at that moment, kept in constant time per sample; baseline samples from before there
were ``min_peers`` of them are left out, and if too few remain the judgement runs on the
series alone.  A second change to the same entity before a verdict closes the first as
``superseded``; judgements still open when history ends are ``open``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from ia.decisions.change_judge import ChangeJudge, JudgeParams, JudgeState, Verdict
from ia.schemas.models import EventKind, TelemetryEvent


@dataclass(frozen=True)
class JudgeSpec:
    """What to judge: which changes, which metrics, over how much baseline."""

    watch: tuple[str, ...]
    changes: tuple[str, ...] = ("deploy",)
    baseline_s: float = 2400.0
    min_peers: int = 2
    params: JudgeParams = field(default_factory=JudgeParams)


@dataclass
class _Sample:
    ts: int
    value: float
    peer: float | None


@dataclass
class _Open:
    change: TelemetryEvent
    metric: str
    state: JudgeState
    peers: bool


class _Latest:
    """One metric's latest value per entity, and their sum: the peers' mean of an
    entity in constant time, however large the fleet."""

    def __init__(self) -> None:
        self.values: dict[str, float] = {}
        self.total = 0.0

    def peer_mean(self, entity: str, min_peers: int) -> float | None:
        own = self.values.get(entity)
        n = len(self.values) - (own is not None)
        return (self.total - (own or 0.0)) / n if n >= min_peers else None

    def set(self, entity: str, value: float) -> None:
        self.total += value - self.values.get(entity, 0.0)
        self.values[entity] = value


class _Fleet:
    """Each series' recent samples, and each metric's latest value per entity."""

    def __init__(self, spec: JudgeSpec) -> None:
        self.spec = spec
        self.recent: dict[tuple[str, str], deque[_Sample]] = {}
        self.latest: dict[str, _Latest] = {}

    def add(self, ev: TelemetryEvent) -> _Sample:
        latest = self.latest.setdefault(ev.metric, _Latest())
        sample = _Sample(ev.ts, ev.value, latest.peer_mean(ev.entity, self.spec.min_peers))
        latest.set(ev.entity, ev.value)
        window = self.recent.setdefault((ev.entity, ev.metric), deque())
        window.append(sample)
        horizon = ev.ts - self.spec.baseline_s * 1000
        while window and window[0].ts < horizon:
            window.popleft()
        return sample


def judge_changes(events: Iterable[TelemetryEvent], spec: JudgeSpec) -> Iterator[dict[str, Any]]:
    """One record per (change, watched metric): the verdict, or why there is none."""
    judge, fleet = ChangeJudge(spec.params), _Fleet(spec)
    open_: dict[tuple[str, str], _Open] = {}
    for ev in events:
        if ev.kind is EventKind.event:
            if ev.metric in spec.changes:
                yield from _start(judge, fleet, open_, ev, spec)
            continue
        sample = fleet.add(ev)
        judging = open_.get((ev.entity, ev.metric))
        if judging is None:
            continue
        verdict = judge.observe(judging.state, sample.value,
                                sample.peer if judging.peers else None)
        if verdict is not None:
            del open_[(ev.entity, ev.metric)]
            yield _record(judging, verdict.outcome, verdict, ev.ts)
    for judging in open_.values():
        yield _record(judging, "open", None, None)


def _start(judge: ChangeJudge, fleet: _Fleet, open_: dict[tuple[str, str], _Open],
           change: TelemetryEvent, spec: JudgeSpec) -> Iterator[dict[str, Any]]:
    for metric in spec.watch:
        key = (change.entity, metric)
        if key in open_:
            yield _record(open_.pop(key), "superseded", None, change.ts)
        baseline = list(fleet.recent.get(key, ()))
        if len(baseline) < spec.params.min_baseline:
            yield {**_about(change, metric), "outcome": "no_baseline",
                   "reason": f"{len(baseline)} samples in the {spec.baseline_s:g} s before the "
                             f"change (min_baseline {spec.params.min_baseline})"}
            continue
        # Samples from before the peers reported are left out, if enough remain.
        with_peers = [(s.value, s.peer) for s in baseline if s.peer is not None]
        relative = len(with_peers) >= spec.params.min_baseline
        if relative:
            values, peer_means = zip(*with_peers, strict=True)
            state = judge.start(values, peer_means)
        else:
            state = judge.start([s.value for s in baseline])
        open_[key] = _Open(change, metric, state, relative)


def _about(change: TelemetryEvent, metric: str) -> dict[str, Any]:
    return {"entity": change.entity, "change": change.metric, "change_ts": change.ts,
            "change_labels": dict(change.labels), "metric": metric}


def _record(judging: _Open, outcome: str, verdict: Verdict | None,
            at: int | None) -> dict[str, Any]:
    out = {**_about(judging.change, judging.metric), "outcome": outcome,
           "relative_to_peers": judging.peers, "samples": judging.state.samples}
    if verdict is not None and at is not None:
        out.update(verdict_ts=at, seconds_to_verdict=(at - judging.change.ts) / 1000,
                   shift=round(verdict.shift, 6),
                   shift_sd=round(verdict.shift_sd, 3), evidence=round(verdict.evidence, 3),
                   reason=verdict.reason)
    return out
