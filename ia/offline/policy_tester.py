"""``ia policy test``: which rules would fire and which guards would intervene, without acting.

Each line of the input (JSON Lines) is one of:

* a **telemetry event** (the ``ia.telemetry`` contract).  It goes through the
  one offline runner (:mod:`ia.offline.run`: the real decision engine with
  memory stores and event time as the clock, exactly as replay), so a model
  warm-up applies: feed enough history for scores to mean something.
* a **scored event**: a telemetry event plus ``score`` and optionally
  ``confidence`` (default: the score), ``drift`` (default ``stable``) and
  ``features`` (e.g. ``{"zscore": 4}`` for ``direction`` rules; ``value``
  is always added).  The model is skipped, so single lines can exercise rules.
* an **outcome**: ``{"outcome": {"action_type": ..., "target": ..., "status":
  "failed", "rule": ..., "at": ms}}`` feeds the circuit breaker and the error
  budgets, as an actuator's outcome would (``at`` defaults to the last event's
  time).

Guard state starts empty and is kept in memory; nothing is executed and no
broker or Redis is contacted.  Blast-radius slots are assumed to be held for
``action_seconds`` of event time (an action's duration), and the kill switch
is off unless ``paused``.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from pydantic import ValidationError

from ia.decisions.guards import (
    MemoryKillSwitch,
    apply_guards,
    budget_scopes,
    observe_anomaly,
    observe_health,
)
from ia.decisions.policy import BlastRadius, Policy, miss_depth
from ia.offline.run import Runner, Variant
from ia.schemas.models import (
    Action,
    Decision,
    DriftState,
    Mode,
    ModelInfo,
    RuleTrace,
    TelemetryEvent,
    derive_decision_id,
)

PIPELINE_ID = "policy-test"
_SCORED_KEYS = ("score", "confidence", "drift", "features")


@dataclass
class LineResult:
    line: int
    kind: str                       # event | scored | outcome | error
    decision: Decision | None = None
    error: str | None = None
    outcome: dict | None = None

    @property
    def rule(self) -> str | None:
        if self.decision is None:
            return None
        fired = [t.rule for t in self.decision.rule_trace if t.matched and t.guard is None]
        return fired[-1] if fired else None

    @property
    def guards(self) -> list[tuple[str, str]]:
        if self.decision is None:
            return []
        return [(t.guard, t.reason) for t in self.decision.rule_trace
                if t.matched and t.guard is not None]

    @property
    def quiet(self) -> bool:
        """Telemetry that fired no rule and met no guard: mostly history."""
        return self.kind == "event" and self.rule is None and not self.guards

    @property
    def closest(self) -> RuleTrace | None:
        """For a line no rule fired for: the rule it got furthest through (the first of
        equals), with the condition that failed as its reason."""
        if self.decision is None or self.rule is not None:
            return None
        missed = [t for t in self.decision.rule_trace if not t.matched and t.guard is None]
        return max(missed, key=lambda t: miss_depth(t.reason), default=None)

    def to_json(self) -> dict:
        out: dict = {"line": self.line, "kind": self.kind}
        if self.error:
            out["error"] = self.error
        if self.outcome:
            out["outcome"] = self.outcome
        d = self.decision
        if d is not None:
            out.update(entity=d.entity, metric=d.metric, value=d.value, ts=d.ts,
                       score=d.anomaly_score, confidence=d.confidence, rule=self.rule,
                       action=d.action.model_dump(mode="json") if d.action else None,
                       mode=d.mode.value,
                       guards=[{"guard": g, "reason": r} for g, r in self.guards],
                       closest=({"rule": self.closest.rule, "failed": self.closest.reason}
                                if self.closest else None),
                       trace=[t.model_dump(mode="json") for t in d.rule_trace])
        return out


@dataclass
class Report:
    source: str
    policy: Policy
    lines: list[LineResult] = field(default_factory=list)

    @property
    def errors(self) -> list[LineResult]:
        return [r for r in self.lines if r.kind == "error"]

    def summary(self) -> dict:
        decided = [r for r in self.lines if r.decision is not None]
        return {
            "policy": self.policy.source, "policy_version": self.policy.version,
            "input": self.source, "events": len(decided),
            "outcomes": sum(r.kind == "outcome" for r in self.lines),
            "errors": len(self.errors),
            "rules_fired": dict(Counter(r.rule for r in decided if r.rule)),
            "guards_intervened": dict(Counter(g for r in decided for g, _ in r.guards)),
            "modes": dict(Counter(r.decision.mode.value for r in decided if r.decision)),
        }


def _with_lease(policy: Policy, seconds: float) -> Policy:
    """The policy with every blast-radius lease set to ``seconds`` (the modelled duration)."""
    doc = policy.doc

    def fix(br: object) -> object:
        return br.model_copy(update={"lease_s": seconds}) if isinstance(br, BlastRadius) else br

    defaults = doc.defaults.model_copy(update={"blast_radius": fix(doc.defaults.blast_radius)})
    new = doc.model_copy(update={
        "defaults": defaults,
        "rules": [r.model_copy(update={"blast_radius": fix(r.blast_radius)}) for r in doc.rules],
    })
    out = Policy(new, policy.source)
    out.version = policy.version
    return out


class PolicyTester:
    def __init__(self, policy: Policy, *, paused: bool = False,
                 action_seconds: float = 30.0) -> None:
        self.policy = policy
        self._effective = _with_lease(policy, action_seconds)
        # Scored and outcome lines use the same guard state the runner decides with.
        self.runner = Runner(Variant("tested", policy.source, self._effective),
                             pipeline_id=PIPELINE_ID,
                             kill_switch=MemoryKillSwitch(paused=paused))
        self.last_ts = 0

    async def run(self, lines: Iterable[str], source: str = "<input>") -> Report:
        report = Report(source, self.policy)
        for n, raw in enumerate(lines, 1):
            if not raw.strip() or raw.lstrip().startswith("#"):
                continue
            report.lines.append(await self.line(n, raw, source))
        return report

    async def line(self, n: int, raw: str, source: str) -> LineResult:
        try:
            data = json.loads(raw)
        except ValueError as exc:
            return LineResult(n, "error", error=f"{source}:{n}: not JSON: {exc}")
        if not isinstance(data, dict):
            return LineResult(n, "error", error=f"{source}:{n}: expected a JSON object")
        try:
            if "outcome" in data:
                return await self._outcome(n, data["outcome"])
            if "score" in data:
                return await self._scored(n, data)
            ev = TelemetryEvent.model_validate(data)
        except (ValidationError, ValueError, TypeError, KeyError) as exc:
            return LineResult(n, "error", error=f"{source}:{n}: invalid input: {_first(exc)}")
        (decision,) = await self.runner.decide([ev])
        self.last_ts = max(self.last_ts, ev.ts)
        return LineResult(n, "event", decision=decision)

    async def _scored(self, n: int, data: dict) -> LineResult:
        extra = {k: data.pop(k) for k in _SCORED_KEYS if k in data}
        ev = TelemetryEvent.model_validate(data)
        score = float(extra["score"])
        confidence = float(extra.get("confidence", score))
        if not (0 <= score <= 1 and 0 <= confidence <= 1):
            raise ValueError("score and confidence must be within [0, 1]")
        drift = DriftState(extra.get("drift", "stable"))
        feats = {str(k): float(v) for k, v in dict(extra.get("features") or {}).items()}
        feats.setdefault("value", ev.value)
        result = self._effective.evaluate(entity=ev.entity, metric=ev.metric,
                                          kind=ev.kind.value, labels=ev.labels, features=feats,
                                          score=score, confidence=confidence, drift=drift.value)
        decision_id = derive_decision_id(ev.event_id or "", PIPELINE_ID)
        # Health as the worker sees it: this sample, and whether it is anomalous.
        await observe_health(self.runner.guards, self._effective, [ev])
        await observe_anomaly(self.runner.guards, self._effective, ev, score)
        verdict = await apply_guards(result, decision_id=decision_id, ts=ev.ts, now=ev.ts,
                                     labels=ev.labels, store=self.runner.guards,
                                     kill_switch=self.runner.kill_switch, entity=ev.entity)
        self.last_ts = max(self.last_ts, ev.ts)
        decision = Decision(
            decision_id=decision_id, correlation_id=ev.event_id or "", event_id=ev.event_id or "",
            entity=ev.entity, metric=ev.metric, value=ev.value, ts=ev.ts, decided_at=ev.ts,
            anomaly_score=score, confidence=confidence, features=feats,
            model=ModelInfo(id="given", version="-"), drift=drift, rule_trace=result.trace,
            action=result.action, mode=verdict.mode, policy_version=self.policy.version)
        return LineResult(n, "scored", decision=decision)

    async def _outcome(self, n: int, o: object) -> LineResult:
        if not isinstance(o, dict):
            raise ValueError("outcome must be an object")
        action = Action(type=str(o["action_type"]), target=str(o["target"]))
        status = str(o.get("status", "failed"))
        at = int(o.get("at", self.last_ts))
        ok = status in ("succeeded", "verified")
        rule = o.get("rule")
        member = str(o.get("decision_id", f"outcome-line-{n}"))
        await self.runner.guards.record_result(f"{action.type}:{action.target}",
                                               budget_scopes(action.type, rule), member, ok, at)
        return LineResult(n, "outcome", outcome={"action_type": action.type,
                                                 "target": action.target, "status": status,
                                                 "at": at})


def _first(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        e = exc.errors()[0]
        return f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}"
    if isinstance(exc, KeyError):
        return f"missing {exc}"
    return str(exc)


#: Telemetry events that fired nothing, shown one line each before the summary (a short
#: input is a newcomer's question: why did this not fire?); ``--all`` shows every one.
QUIET_SHOWN = 5


def _quiet_lines(report: Report) -> list[str]:
    quiet = [r for r in report.lines if r.quiet]
    out = []
    for r in quiet[:QUIET_SHOWN]:
        d = r.decision
        assert d is not None
        out.append(f"{report.source}:{r.line}  {d.entity} {d.metric}={d.value:g} fired no "
                   f"rule; {_why_no_rule(r.closest)}")
    if len(quiet) > QUIET_SHOWN:
        out.append(f"({len(quiet)} telemetry events fired no rule, {QUIET_SHOWN} shown; "
                   "--all shows each in full)")
    return out


def _why_no_rule(near: RuleTrace | None) -> str:
    return f"closest: rule {near.rule} ({near.reason})" if near else "the policy has no rules"


def format_report(report: Report, show_all: bool = False) -> str:
    """The human-readable report: one block per interesting line, then a summary."""
    out = [f"policy {report.policy.source} (version {report.policy.version}); "
           f"input {report.source}"]
    for r in report.lines:
        where = f"{report.source}:{r.line}"
        if r.kind == "error":
            out.append(f"{r.error}")
            continue
        if r.kind == "outcome":
            o = r.outcome or {}
            out.append(f"{where}  outcome {o['status']} of {o['action_type']} on {o['target']}")
            continue
        d = r.decision
        assert d is not None
        if not show_all and r.quiet:
            continue  # telemetry that fired nothing is mostly history; --all shows it
        out.append(f"{where}  {d.entity} {d.metric}={d.value:g} ts={d.ts}  "
                   f"score {d.anomaly_score:.3f} confidence {d.confidence:.3f}")
        if r.rule is None:
            out.append(f"    no rule fired; {_why_no_rule(r.closest)}")
        else:
            fired = next(t for t in reversed(d.rule_trace) if t.rule == r.rule)
            act = "no action"
            if d.action:
                act = f"{d.action.type} {d.action.target}" + (
                    f" {d.action.params}" if d.action.params else "")
            out.append(f"    rule {r.rule} fired: {act}  ({fired.reason})")
        for g, reason in r.guards:
            out.append(f"    guard:{g} intervened: {reason}")
        for t in d.rule_trace:
            if t.guard is not None and not t.matched:
                out.append(f"    {t.rule}: {t.reason}")
        out.append(f"    => mode {d.mode.value}" + (
            "" if d.mode in (Mode.none,) else (" (would execute)" if d.mode is Mode.auto
                                              else " (would not execute)")))
    s = report.summary()

    def fmt(c: dict) -> str:
        return ", ".join(f"{k} {v}" for k, v in sorted(c.items())) or "none"

    if not show_all:
        out += _quiet_lines(report)
    out.append(f"summary: {s['events']} events, {s['outcomes']} outcomes, {s['errors']} errors; "
               f"rules fired: {fmt(s['rules_fired'])}; guards intervened: "
               f"{fmt(s['guards_intervened'])}; modes: {fmt(s['modes'])}")
    return "\n".join(out)

