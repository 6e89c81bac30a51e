"""Backtests: two policies (or model configurations) over the same history, compared.

Nothing here needs Kafka or Redis.  A *variant* is a policy YAML, or a small
config YAML naming a policy and detector settings::

    policy: candidate-policy.yaml        # relative to this file; default: observe only
    detector: {alert_level: 0.45, suppress_samples: 100}   # ia.decisions.detector.DetectorConfig

Each variant is decided by the one offline runner (:mod:`ia.offline.run`: the
code the worker runs on memory state with event time as its clock, as replay
does), so a backtest is deterministic.  Decision ids use the production
pipeline id, so they match ``ia.decisions`` and the feedback given on it.

Definitions used in the summary (``acting`` = a decision with an action in mode
``auto``, ``needs_approval``, ``notify`` or ``shadow``; ``blocked`` ones are
guard interventions):

* added / removed: an event the candidate acts on and the baseline does not,
  or the reverse; changed: both act, with a different action or mode.
* held by windows (``held_by_windows``): per freeze or maintenance window of the
  variant's policy, the decisions it blocked or downgraded to approval.
* against labelled windows (only on entities the labels cover): a window is
  detected when an acting decision falls inside it; recall = detected /
  windows; precision = acting decisions inside a window / all acting
  decisions; false action rate = acting decisions outside every window /
  events outside every window; time to detect = first acting decision in a
  window - window start.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import json
import statistics
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from ia.core.errors import IaError
from ia.core.times import TimeFormatError, parse_time
from ia.decisions.detector import DetectorConfig
from ia.decisions.policy import Policy
from ia.decisions.shadow import intended_mode
from ia.decisions.windows import held_by
from ia.offline.run import Variant
from ia.schemas.models import Decision, Feedback, Mode

ACTING = frozenset({Mode.auto.value, Mode.needs_approval.value, Mode.notify.value,
                    Mode.shadow.value})
POSITIVE_FEEDBACK = frozenset({"true_positive", "useful"})
DAY_MS = 86_400_000


class BacktestError(IaError):
    """A variant, labels file or input that cannot be used (message says why)."""


# --------------------------------------------------------------------------- variants


def _detector_config(overrides: dict[str, Any], source: str) -> DetectorConfig:
    base = DetectorConfig()
    names = {f.name for f in dataclasses.fields(DetectorConfig)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise BacktestError(f"{source}: unknown detector setting(s) {unknown}; "
                            f"known: {sorted(names)}")
    values: dict[str, Any] = {}
    for key, value in overrides.items():
        current = getattr(base, key)
        # Nested settings (the drift detectors' parameters) are given as mappings.
        values[key] = dataclasses.replace(current, **value) if isinstance(value, dict) \
            else type(current)(value)
    return dataclasses.replace(base, **values)


def load_variant(path: Path, name: str | None = None) -> Variant:
    """A policy YAML, or a config YAML with ``policy`` and/or ``detector``."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise BacktestError(f"{path}: {exc}") from None
    label = name or path.stem
    is_config = isinstance(data, dict) and "rules" not in data and \
        bool({"policy", "detector"} & set(data))
    if not is_config:
        return Variant(label, str(path), Policy.from_file(path))
    policy_ref = data.get("policy")
    policy = Policy.from_file(path.parent / policy_ref) if policy_ref else \
        Policy.observe_only()
    overrides = dict(data.get("detector") or {})
    return Variant(label, str(path), policy, _detector_config(overrides, str(path)), overrides)


def thresholds(policy: Policy, entity: str, metric: str) -> list[tuple[str, float]]:
    """(rule, minimum score) of the rules with an action that may fire on this series."""
    out = []
    for rule in policy.doc.rules:
        if rule.action is None or rule.match.kind != "metric":
            continue
        if not (any(fnmatch.fnmatchcase(entity, g) for g in rule.match.entity)
                and any(fnmatch.fnmatchcase(metric, g) for g in rule.match.metric)):
            continue
        low = max(rule.when.min_score, rule.when.score.min or 0.0)
        if low > 0:
            out.append((rule.name, low))
    return out


# --------------------------------------------------------------------------- decisions


@dataclass(frozen=True, slots=True)
class Row:
    """What a backtest keeps of one decision (full decisions would not fit in memory
    for long histories)."""

    event_id: str
    decision_id: str
    entity: str
    metric: str
    ts: int
    value: float
    score: float
    confidence: float
    mode: str
    action: str | None  # "type target {params}" or None
    rule: str | None
    guards: tuple[str, ...] = ()
    windows: tuple[str, ...] = ()  # freeze windows that blocked or downgraded it

    @property
    def acts(self) -> bool:
        return self.action is not None and self.mode in ACTING

    @classmethod
    def of(cls, d: Decision) -> Row:
        """``d`` as a row; a shadow decision counts with the mode its candidate chose."""
        rule, guards, windows = None, [], []
        for t in d.rule_trace:
            if not t.matched:
                continue
            if t.guard is not None:
                guards.append(t.guard)
                if t.guard == "freeze_window" and (name := held_by(t.reason)):
                    windows.append(name)
            elif t.rule != "shadow":
                rule = t.rule
        action = None
        if d.action is not None:
            params = json.dumps(d.action.params, sort_keys=True) if d.action.params else ""
            action = f"{d.action.type} {d.action.target} {params}".rstrip()
        return cls(d.event_id, d.decision_id, d.entity, d.metric, d.ts, d.value,
                   d.anomaly_score, d.confidence, intended_mode(d).value, action, rule,
                   tuple(guards), tuple(windows))

    def brief(self) -> dict[str, Any]:
        return {"mode": self.mode, "action": self.action, "rule": self.rule,
                "guards": list(self.guards), "score": self.score,
                "confidence": self.confidence, "decision_id": self.decision_id}


@dataclass(frozen=True)
class Change:
    kind: str  # added | removed | changed
    baseline: Row
    candidate: Row

    def to_json(self) -> dict[str, Any]:
        b = self.baseline
        return {"kind": self.kind, "event_id": b.event_id, "entity": b.entity,
                "metric": b.metric, "ts": b.ts, "value": b.value,
                "baseline": b.brief(), "candidate": self.candidate.brief()}


def compare(baseline: Sequence[Row], candidate: Sequence[Row]) -> list[Change]:
    """Added, removed and changed action decisions, event by event.

    Both sides decided the same events in the same order (one decision per
    event), so rows pair up by position; the event ids are checked.
    """
    if len(baseline) != len(candidate):
        raise BacktestError(f"baseline has {len(baseline)} decisions, candidate "
                            f"{len(candidate)}: not the same history")
    out = []
    for b, c in zip(baseline, candidate, strict=True):
        if b.event_id != c.event_id:
            raise BacktestError(f"event {b.event_id} vs {c.event_id}: not the same history")
        kind = _change_kind(b, c)
        if kind:
            out.append(Change(kind, b, c))
    return out


def _change_kind(b: Row, c: Row) -> str | None:
    if c.acts and not b.acts:
        return "added"
    if b.acts and not c.acts:
        return "removed"
    if b.acts and (b.action, b.mode) != (c.action, c.mode):
        return "changed"
    return None


def volume(rows: Iterable[Row]) -> dict[str, Any]:
    by_mode: Counter[str] = Counter()
    by_action: Counter[str] = Counter()
    by_rule: Counter[str] = Counter()
    acting = 0
    for r in rows:
        if r.action is None:
            continue
        by_mode[r.mode] += 1
        if r.acts:
            acting += 1
            by_action[r.action.split(" ", 1)[0]] += 1
            by_rule[r.rule or "-"] += 1
    return {"actions": acting, "by_mode": dict(sorted(by_mode.items())),
            "by_action_type": dict(sorted(by_action.items())),
            "by_rule": dict(sorted(by_rule.items()))}


def held_by_windows(rows: Iterable[Row]) -> dict[str, dict[str, int]]:
    """Per freeze window, the decisions it held, by the mode they ended in
    (``blocked``, or ``needs_approval`` for an ``auto`` decision it downgraded)."""
    out: dict[str, Counter[str]] = {}
    for r in rows:
        for name in r.windows:
            out.setdefault(name, Counter())[r.mode] += 1
    return {name: dict(sorted(c.items())) for name, c in sorted(out.items())}


def guard_interventions(rows: Iterable[Row]) -> dict[str, int]:
    counts: Counter[str] = Counter(g for r in rows for g in r.guards)
    return dict(sorted(counts.items()))


# --------------------------------------------------------------------------- labels


@dataclass
class Labels:
    """Labelled anomaly windows per entity (inclusive, event-time ms).

    An entity listed with no windows is labelled "nothing happened here": its
    actions count as false.  Entities not listed are not judged.
    """

    windows: dict[str, list[tuple[int, int]]]
    source: str
    notes: list[str] = field(default_factory=list)

    def covers(self, entity: str) -> bool:
        return entity in self.windows

    def window_index(self, entity: str, ts: int) -> int | None:
        for i, (start, end) in enumerate(self.windows.get(entity, ())):
            if start <= ts <= end:
                return i
        return None

    def count(self) -> int:
        return sum(len(w) for w in self.windows.values())


def entity_of_label_key(key: str) -> str:
    """NAB keys are ``category/file.csv``; their entity is the file's stem, as
    ``ia replay --format nab-csv`` names it."""
    name = key.rsplit("/", 1)[-1]
    return name[:-4] if name.endswith(".csv") else key


def _stamp(value: object, where: str) -> int:
    if isinstance(value, int | float) and not isinstance(value, bool):
        return int(value)
    try:
        return parse_time(str(value), now_ms=0)
    except TimeFormatError as exc:
        raise BacktestError(f"{where}: {exc}") from None


def _window(pair: object, where: str) -> tuple[int, int]:
    if isinstance(pair, dict):
        pair = [pair.get("start"), pair.get("end")]
    if not isinstance(pair, list | tuple) or len(pair) != 2:
        raise BacktestError(f"{where}: a window is [start, end] or {{start, end}}")
    start, end = _stamp(pair[0], where), _stamp(pair[1], where)
    if end < start:
        raise BacktestError(f"{where}: window ends before it starts")
    return start, end


def windows_from_json(data: object, source: str) -> Labels:
    """``{"entity": [[start, end], ...]}`` (NAB's combined_windows form, keys may be
    ``category/file.csv``) or ``[{"entity": e, "start": s, "end": e}, ...]``."""
    out: dict[str, list[tuple[int, int]]] = {}
    if isinstance(data, dict):
        for key, wins in data.items():
            if not isinstance(wins, list):
                raise BacktestError(f"{source}: {key}: expected a list of windows")
            out.setdefault(entity_of_label_key(key), []).extend(
                _window(w, f"{source}: {key}") for w in wins)
    elif isinstance(data, list):
        for i, item in enumerate(data):
            if not isinstance(item, dict) or "entity" not in item:
                raise BacktestError(f"{source}: item {i}: expected {{entity, start, end}}")
            out.setdefault(str(item["entity"]), []).append(_window(item, f"{source}: item {i}"))
    else:
        raise BacktestError(f"{source}: labels must be a JSON object or list")
    return Labels({e: sorted(w) for e, w in sorted(out.items())}, source)


def windows_from_feedback(feedback: Iterable[Feedback], rows: Sequence[Row],
                          tolerance_ms: int, source: str) -> Labels:
    """Labels from ``ia.feedback``: a true positive / useful label marks a window of
    ``± tolerance_ms`` around its decision's event; a false positive / harmful one
    only marks the entity as judged.  Decisions are found by id among ``rows``
    (decided with the production pipeline id, so ids match production's)."""
    by_id = {r.decision_id: r for r in rows}
    out: dict[str, list[tuple[int, int]]] = {}
    unmatched = 0
    for fb in feedback:
        row = by_id.get(fb.decision_id)
        if row is None:
            unmatched += 1
            continue
        wins = out.setdefault(row.entity, [])
        if fb.label.value in POSITIVE_FEEDBACK:
            wins.append((row.ts - tolerance_ms, row.ts + tolerance_ms))
    notes = [f"{unmatched} feedback label(s) name decisions outside this history"] \
        if unmatched else []
    return Labels({e: sorted(w) for e, w in sorted(out.items())}, source, notes)


def load_labels_file(path: Path, rows: Sequence[Row], tolerance_ms: int) -> Labels:
    """A JSON file of windows, or JSON Lines of ``Feedback`` records."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, list | dict) and not (isinstance(data, dict) and "decision_id" in data):
        return windows_from_json(data, str(path))
    try:
        feedback = [Feedback.model_validate_json(line) for line in text.splitlines()
                    if line.strip()]
    except ValueError as exc:
        raise BacktestError(f"{path}: neither a JSON file of windows nor JSON Lines of "
                            f"feedback: {str(exc).splitlines()[0]}") from None
    return windows_from_feedback(feedback, rows, tolerance_ms, str(path))


# --------------------------------------------------------------------------- quality


@dataclass
class _EntityScore:
    windows: int = 0
    detected: int = 0
    true_actions: int = 0
    false_actions: int = 0
    negative_events: int = 0
    first_ts: int | None = None
    last_ts: int | None = None
    first_hit: dict[int, int] = field(default_factory=dict)  # window -> first acting ts

    def see(self, ts: int) -> None:
        self.first_ts = ts if self.first_ts is None else min(self.first_ts, ts)
        self.last_ts = ts if self.last_ts is None else max(self.last_ts, ts)


def _score_entities(rows: Iterable[Row], labels: Labels) -> tuple[dict[str, _EntityScore], int]:
    scores: dict[str, _EntityScore] = {}
    unjudged = 0
    for r in rows:
        if not labels.covers(r.entity):
            unjudged += int(r.acts)
            continue
        s = scores.setdefault(r.entity, _EntityScore(windows=len(labels.windows[r.entity])))
        s.see(r.ts)
        w = labels.window_index(r.entity, r.ts)
        if w is None:
            s.negative_events += 1
            s.false_actions += int(r.acts)
        elif r.acts:
            s.true_actions += 1
            s.first_hit[w] = min(s.first_hit.get(w, r.ts), r.ts)
    for s in scores.values():
        s.detected = len(s.first_hit)
    return scores, unjudged


def _ratio(num: float, den: float) -> float | None:
    return round(num / den, 6) if den else None


def detections(rows: Iterable[Row], labels: Labels) -> list[dict[str, Any]]:
    """Every labelled window (of entities seen) and when it was first acted on."""
    scores, _ = _score_entities(rows, labels)
    out = []
    for entity, s in sorted(scores.items()):
        for i, (start, end) in enumerate(labels.windows[entity]):
            hit = s.first_hit.get(i)
            out.append({"entity": entity, "start": start, "end": end, "detected_at": hit,
                        "time_to_detect_s": None if hit is None else (hit - start) / 1000})
    return out


def quality(rows: Sequence[Row], labels: Labels) -> dict[str, Any]:
    scores, unjudged = _score_entities(rows, labels)
    windows = sum(s.windows for s in scores.values())
    detected = sum(s.detected for s in scores.values())
    tp = sum(s.true_actions for s in scores.values())
    fp = sum(s.false_actions for s in scores.values())
    negatives = sum(s.negative_events for s in scores.values())
    days = sum(((s.last_ts or 0) - (s.first_ts or 0)) for s in scores.values()) / DAY_MS
    ttd = [d["time_to_detect_s"] for d in detections(rows, labels) if d["detected_at"]]
    return {
        "entities": len(scores), "windows": windows, "detected_windows": detected,
        "missed_windows": windows - detected, "true_actions": tp, "false_actions": fp,
        "unjudged_actions": unjudged, "negative_events": negatives,
        "precision": _ratio(tp, tp + fp), "recall": _ratio(detected, windows),
        "false_action_rate": _ratio(fp, negatives),
        "false_actions_per_day": _ratio(fp, days),
        "time_to_detect_s": _ttd_stats(ttd),
        "per_entity": {e: {"windows": s.windows, "detected": s.detected,
                           "true_actions": s.true_actions, "false_actions": s.false_actions}
                       for e, s in sorted(scores.items())},
    }


def _ttd_stats(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "median": None, "min": None, "max": None}
    return {"mean": round(statistics.fmean(values), 3),
            "median": round(statistics.median(values), 3),
            "min": round(min(values), 3), "max": round(max(values), 3)}


# --------------------------------------------------------------------------- summary


def side_summary(variant: Variant, rows: Sequence[Row], labels: Labels | None
                 ) -> dict[str, Any]:
    out: dict[str, Any] = {**variant.describe(), "volume": volume(rows),
                           "guard_interventions": guard_interventions(rows),
                           "held_by_windows": held_by_windows(rows)}
    if labels is not None:
        out["quality"] = quality(rows, labels)
    return out


def summarize(source: dict[str, Any], baseline: Variant, candidate: Variant,
              base_rows: Sequence[Row], cand_rows: Sequence[Row],
              labels: Labels | None, changes: Sequence[Change],
              examples: int = 100) -> dict[str, Any]:
    """The JSON summary of a backtest (no wall-clock time: same input, same bytes)."""
    kinds = Counter(c.kind for c in changes)
    return {
        "source": {**source, "events": len(base_rows),
                   "entities": len({r.entity for r in base_rows})},
        "labels": None if labels is None else {
            "source": labels.source, "entities": len(labels.windows),
            "windows": labels.count(), "notes": labels.notes},
        "baseline": side_summary(baseline, base_rows, labels),
        "candidate": side_summary(candidate, cand_rows, labels),
        "diff": {"added": kinds["added"], "removed": kinds["removed"],
                 "changed": kinds["changed"],
                 "examples": [c.to_json() for c in changes[:examples]]},
    }
