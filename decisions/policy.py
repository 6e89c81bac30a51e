"""The user-facing policy: a YAML document mapping conditions to actions.

Rules are tried in order; the first whose ``match`` and ``when`` hold decides
the action and mode.  Every rule tried leaves a line in the rule trace, so a
decision explains itself.  Loading validates the document against a schema
and reports errors with the file and line::

    version: 1
    rules:
      - name: restart-on-memory-leak
        match: {entity: "svc-*", metric: memory_pct}
        when: {min_score: 0.8, min_confidence: 0.5, direction: up}
        action: {type: simulator, target: "{entity}", params: {op: restart}}
        mode: auto
        cooldown_s: 300

>>> p = Policy.from_text('''
... version: 1
... rules:
...   - name: cpu
...     match: {metric: cpu}
...     when: {min_score: 0.9}
...     action: {type: log}
... ''')
>>> r = p.evaluate(entity="a", metric="cpu", kind="metric", labels={}, features={},
...                score=0.95, confidence=0.9, drift="stable")
>>> (r.rule, r.action.target, r.mode.value)
('cpu', 'a', 'auto')
"""

from __future__ import annotations

import fnmatch
import hashlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from schemas.models import Action, Mode, RuleTrace


class PolicyError(ValueError):
    """A policy document that cannot be used; names the file and line."""

    def __init__(self, source: str, line: int | None, message: str) -> None:
        self.source, self.line, self.message = source, line, message
        where = f"{source}:{line}" if line else source
        super().__init__(f"{where}: {message}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Range(_Strict):
    min: float | None = None
    max: float | None = None

    def contains(self, v: float) -> bool:
        return (self.min is None or v >= self.min) and (self.max is None or v <= self.max)


class Match(_Strict):
    entity: list[str] = Field(default_factory=lambda: ["*"])
    metric: list[str] = Field(default_factory=lambda: ["*"])
    labels: dict[str, str] = Field(default_factory=dict)
    kind: Literal["metric", "event"] = "metric"

    @field_validator("entity", "metric", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v


class When(_Strict):
    min_score: float = Field(default=0.0, ge=0.0, le=1.0)
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    direction: Literal["up", "down", "any"] = "any"
    drift: list[Literal["stable", "warning", "drift"]] | None = None
    features: dict[str, Range] = Field(default_factory=dict)


class ActionSpec(_Strict):
    # Bounds of schemas.models.Action, so a loadable policy cannot fail at evaluation.
    type: str = Field(min_length=1, max_length=256)
    target: str = Field(default="{entity}", min_length=1)
    params: dict[str, str] = Field(default_factory=dict)

    @field_validator("params", mode="before")
    @classmethod
    def _stringify(cls, v: object) -> object:
        if isinstance(v, dict):
            return {k: str(x) for k, x in v.items()}
        return v


class Rule(_Strict):
    name: str = Field(min_length=1)
    match: Match = Field(default_factory=Match)
    when: When = Field(default_factory=When)
    action: ActionSpec | None = None
    mode: Literal["auto", "needs_approval", "shadow"] = "auto"
    cooldown_s: float | None = Field(default=None, ge=0.0)


class Defaults(_Strict):
    cooldown_s: float = Field(default=300.0, ge=0.0)


class PolicyDocument(_Strict):
    version: Literal[1]
    defaults: Defaults = Field(default_factory=Defaults)
    # Named argv lists for the ``command`` actuator.  Decisions refer to them
    # by name, so nothing on a topic can make an actuator run arbitrary argv.
    commands: dict[str, list[str]] = Field(default_factory=dict)
    rules: list[Rule] = Field(default_factory=list)

    @field_validator("commands")
    @classmethod
    def _non_empty_argv(cls, v: dict[str, list[str]]) -> dict[str, list[str]]:
        for name, argv in v.items():
            if not argv:
                raise ValueError(f"command {name!r} has an empty argv")
        return v


@dataclass
class PolicyResult:
    rule: str | None
    action: Action | None
    mode: Mode
    trace: list[RuleTrace] = field(default_factory=list)
    cooldown_s: float = 0.0


_PLACEHOLDER = re.compile(r"\{(entity|metric)\}")


def _render_target(template: str, entity: str, metric: str) -> str:
    # Plain substitution, never str.format: a template must not be able to
    # reach attributes, and telemetry strings are only ever data.  One pass,
    # so an entity containing "{metric}" is not substituted again.
    return _PLACEHOLDER.sub(lambda m: entity if m.group(1) == "entity" else metric, template)


def _globs(patterns: list[str], value: str) -> bool:
    return any(fnmatch.fnmatchcase(value, p) for p in patterns)


class Policy:
    def __init__(self, doc: PolicyDocument, source: str = "<policy>", text: str = "") -> None:
        self.doc = doc
        self.source = source
        self.version = hashlib.sha256(text.encode()).hexdigest()[:12] if text else "inline"

    @classmethod
    def from_text(cls, text: str, source: str = "<policy>") -> Policy:
        try:
            root = yaml.compose(text)
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            raise PolicyError(source, mark.line + 1 if mark else None, str(exc)) from exc
        if not isinstance(data, dict):
            raise PolicyError(source, 1, "a policy must be a mapping with 'version' and 'rules'")
        try:
            doc = PolicyDocument.model_validate(data)
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err["loc"])
            raise PolicyError(source, _line_of(root, err["loc"]),
                              f"{loc}: {err['msg']}") from exc
        _check_rule_names(doc, source, root)
        return cls(doc, source, text)

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(str(p), None, f"cannot read policy: {exc.strerror}") from exc
        return cls.from_text(text, str(p))

    def evaluate(self, *, entity: str, metric: str, kind: str, labels: dict[str, str],
                 features: dict[str, float], score: float, confidence: float,
                 drift: str) -> PolicyResult:
        trace: list[RuleTrace] = []
        for rule in self.doc.rules:
            reason = _mismatch(rule, entity, metric, kind, labels, features, score, confidence,
                               drift)
            if reason:
                trace.append(RuleTrace(rule=rule.name, matched=False, reason=reason))
                continue
            trace.append(RuleTrace(rule=rule.name, matched=True, reason=(
                f"score {score:.3f} >= {rule.when.min_score}, "
                f"confidence {confidence:.3f} >= {rule.when.min_confidence}")))
            action = None
            if rule.action:
                action = Action(type=rule.action.type,
                                target=_render_target(rule.action.target, entity, metric)[:256],
                                params=rule.action.params)
            cooldown = rule.cooldown_s if rule.cooldown_s is not None \
                else self.doc.defaults.cooldown_s
            return PolicyResult(rule.name, action, Mode(rule.mode) if action else Mode.none,
                                trace, cooldown)
        return PolicyResult(None, None, Mode.none, trace)


def _mismatch(rule: Rule, entity: str, metric: str, kind: str, labels: dict[str, str],
              features: dict[str, float], score: float, confidence: float,
              drift: str) -> str | None:
    m, w = rule.match, rule.when
    if kind != m.kind:
        return f"kind {kind} is not {m.kind}"
    if not _globs(m.entity, entity):
        return "entity not selected"
    if not _globs(m.metric, metric):
        return "metric not selected"
    for k, v in m.labels.items():
        if not fnmatch.fnmatchcase(labels.get(k, ""), v):
            return f"label {k} does not match {v!r}"
    if score < w.min_score:
        return f"score {score:.3f} < {w.min_score}"
    if confidence < w.min_confidence:
        return f"confidence {confidence:.3f} < {w.min_confidence}"
    z = features.get("zscore", 0.0)
    if (w.direction == "up" and z <= 0) or (w.direction == "down" and z >= 0):
        return f"direction is not {w.direction}"
    if w.drift is not None and drift not in w.drift:
        return f"drift state {drift} not in {w.drift}"
    for name, rng in w.features.items():
        if name not in features:
            return f"feature {name} unavailable"
        if not rng.contains(features[name]):
            return f"feature {name}={features[name]:g} outside [{rng.min}, {rng.max}]"
    return None


def _check_rule_names(doc: PolicyDocument, source: str, root: yaml.Node) -> None:
    seen: set[str] = set()
    for i, rule in enumerate(doc.rules):
        if rule.name in seen:
            raise PolicyError(source, _line_of(root, ("rules", i, "name")),
                              f"duplicate rule name {rule.name!r}")
        seen.add(rule.name)
        if rule.action and rule.action.type == "command":
            cmd = rule.action.params.get("command")
            if cmd not in doc.commands:
                raise PolicyError(source, _line_of(root, ("rules", i, "action")),
                                  f"rule {rule.name!r} names unknown command {cmd!r}; "
                                  "declare it under 'commands'")


def _line_of(root: yaml.Node | None, loc: tuple) -> int | None:
    """1-based line of the deepest YAML node on the error's path."""
    node, line = root, (root.start_mark.line + 1 if root else None)
    for part in loc:
        child = None
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == str(part)), None)
            if child is not None:
                line = next(k for k, v in node.value if v is child).start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) \
                and part < len(node.value):
            child = node.value[part]
            line = child.start_mark.line + 1
        if child is None:
            break
        node = child
    return line
