"""The user-facing policy: a YAML document mapping conditions to actions.

Rules are tried in order; the first whose ``match`` and ``when`` hold decides
the action and mode.  Every rule tried leaves a line in the rule trace, so a
decision explains itself.  Loading validates the document against a schema
and reports errors with the file and line::

    version: 1
    defaults:                      # every rule inherits these unless it overrides them
      cooldown_s: 300
      max_event_age_s: 600         # older events do not act live (false: no limit)
      circuit_breaker: {failures: 3, window_s: 600, open_s: 300}   # on by default
    cost_cap: {max: 100, window_s: 86400}     # shared budget of rules with a `cost`
    rules:
      - name: restart-on-memory-leak
        match: {entity: "svc-*", metric: memory_pct, labels: {env: [prod, "stag*"]}}
        when: {min_score: 0.8, confidence: {min: 0.3}, direction: up}
        action: {type: simulator, target: "{entity}", params: {op: restart}}
        mode: auto                 # the most autonomy the rule may have
        autonomy: {auto_above: 0.9, approval_above: 0.6, notify_above: 0.3}
        cooldown_s: 300
        rate_limit: {max: 5, window_s: 3600}          # or {once_within: 600}
        blast_radius: {group_label: service, max_concurrent: 2, max_fleet_pct: 25}
        error_budget: {slo: 0.95, window_s: 3600, max_burn_rate: 2, min_actions: 5}
        cost: 10

The guards themselves (what each one does, and their shared state) live in
:mod:`ia.decisions.guards`; the policy only resolves which apply to a decision
(:class:`RuleGuards`).

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
import functools
import hashlib
import re
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from ia.core.errors import IaError
from ia.decisions.windows import FreezeWindow
from ia.schemas.actions import COMPENSATE_PREFIX, PLACEHOLDERS, templated_params
from ia.schemas.models import Action, Mode, RuleTrace


class PolicyError(IaError, ValueError):
    """A policy document that cannot be used; names the file and line."""

    exit_code = 2

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
    # label -> glob, or a list of globs (any of them); a missing label is "".
    labels: dict[str, list[str]] = Field(default_factory=dict)
    kind: Literal["metric", "event"] = "metric"

    @field_validator("entity", "metric", mode="before")
    @classmethod
    def _one_or_many(cls, v: object) -> object:
        return [v] if isinstance(v, str) else v

    @field_validator("labels", mode="before")
    @classmethod
    def _label_globs(cls, v: object) -> object:
        if isinstance(v, dict):
            return {k: [x] if isinstance(x, str) else x for k, x in v.items()}
        return v


class When(_Strict):
    min_score: float = Field(default=0.0, ge=0.0, le=1.0)
    min_confidence: float = Field(default=0.0, ge=0.0, le=1.0)
    # Ranges (inclusive), for bands such as "a mild anomaly": {min: 0.5, max: 0.8}.
    score: Range = Field(default_factory=Range)
    confidence: Range = Field(default_factory=Range)
    direction: Literal["up", "down", "any"] = "any"
    drift: list[Literal["stable", "warning", "drift"]] | None = None
    features: dict[str, Range] = Field(default_factory=dict)


class ActionSpec(_Strict):
    # Bounds of ia.schemas.models.Action, so a loadable policy cannot fail at evaluation.
    type: str = Field(min_length=1, max_length=256)
    target: str = Field(default="{entity}", min_length=1)
    params: dict[str, str] = Field(default_factory=dict)

    @field_validator("params", mode="before")
    @classmethod
    def _stringify(cls, v: object) -> object:
        if isinstance(v, dict):
            return {k: str(x) for k, x in v.items()}
        return v


# --- guards ---------------------------------------------------------------------------------
# Their behaviour is documented in decisions/guards/; these are only their settings.


class RateLimit(_Strict):
    """At most ``max`` actions per ``window_s`` (event time); ``once_within: W`` is max 1 per W."""

    max: int = Field(default=1, ge=1)
    window_s: float | None = Field(default=None, gt=0)
    once_within: float | None = Field(default=None, gt=0)
    per: Literal["rule", "target"] = "rule"

    @model_validator(mode="after")
    def _one_window(self) -> RateLimit:
        if (self.window_s is None) == (self.once_within is None):
            raise ValueError("give exactly one of window_s (with max) or once_within")
        if self.once_within is not None and self.max != 1:
            raise ValueError("once_within means max 1; use max with window_s instead")
        return self

    @property
    def window_ms(self) -> int:
        return int((self.once_within or self.window_s or 0) * 1000)


class CircuitBreaker(_Strict):
    """Per action type and target: opens after ``failures`` within ``window_s``."""

    failures: int = Field(default=3, ge=1)
    window_s: float = Field(default=600.0, gt=0)
    open_s: float = Field(default=300.0, gt=0)
    # A half-open probe that reports nothing within this long is replaced by the next.
    probe_timeout_s: float = Field(default=120.0, gt=0)


class BlastRadius(_Strict):
    """In-flight actions per service group: an absolute cap and/or a share of the fleet."""

    group_label: str | None = Field(default=None, min_length=1, max_length=128)
    max_concurrent: int | None = Field(default=None, ge=1)
    max_fleet_pct: float | None = Field(default=None, gt=0, le=100)
    fleet_size: int | None = Field(default=None, ge=1)
    lease_s: float = Field(default=120.0, gt=0)

    @model_validator(mode="after")
    def _some_limit(self) -> BlastRadius:
        if self.max_concurrent is None and self.max_fleet_pct is None:
            raise ValueError("give max_concurrent and/or max_fleet_pct")
        return self


class ErrorBudget(_Strict):
    """Downgrade ``auto`` to ``needs_approval`` while automation burns its budget too fast."""

    slo: float = Field(default=0.95, gt=0, lt=1)
    window_s: float = Field(default=3600.0, gt=0)
    max_burn_rate: float = Field(default=2.0, gt=0)
    min_actions: int = Field(default=5, ge=1)
    scope: Literal["global", "action_type", "rule"] = "global"


class CapacityFloor(_Strict):
    """Refuse an action that would leave fewer than ``min_healthy_pct`` of its group
    healthy (health from telemetry: the policy's ``health`` section)."""

    group_label: str | None = Field(default=None, min_length=1, max_length=128)
    min_healthy_pct: float = Field(gt=0, le=100)
    # How long an admitted action keeps its target out of the healthy count.
    lease_s: float = Field(default=300.0, gt=0)


class Health(_Strict):
    """What "healthy" means for capacity floors, judged from telemetry.

    An entity of a group is healthy when it sent a sample within ``fresh_s``
    and none of its samples scored ``unhealthy_score`` or more within
    ``anomaly_hold_s``; it belongs to the group while it sent anything
    within ``member_s``.
    """

    unhealthy_score: float = Field(default=0.8, gt=0, le=1)
    fresh_s: float = Field(default=120.0, gt=0)
    anomaly_hold_s: float = Field(default=300.0, gt=0)
    member_s: float = Field(default=86400.0, gt=0)

    @model_validator(mode="after")
    def _horizon(self) -> Health:
        if self.member_s < self.fresh_s:
            raise ValueError("member_s must be at least fresh_s")
        return self


class CostCap(_Strict):
    max: float = Field(gt=0)
    window_s: float = Field(default=86400.0, gt=0)


class Autonomy(_Strict):
    """The autonomy ladder: confidence decides how much the rule may do on its own.

    ``auto`` at or above ``auto_above``, ``needs_approval`` at or above
    ``approval_above``, ``notify`` at or above ``notify_above``; below the
    lowest band the rule does not fire.  The rule's ``mode`` caps the ladder
    (``mode: needs_approval`` never yields ``auto``; ``shadow`` never acts).
    """

    auto_above: float = Field(ge=0.0, le=1.0)
    approval_above: float | None = Field(default=None, ge=0.0, le=1.0)
    notify_above: float | None = Field(default=None, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> Autonomy:
        bands = [b for b in (self.auto_above, self.approval_above, self.notify_above)
                 if b is not None]
        if bands != sorted(bands, reverse=True):
            raise ValueError("bands must satisfy auto_above >= approval_above >= notify_above")
        return self

    def floor(self) -> float:
        return min(b for b in (self.auto_above, self.approval_above, self.notify_above)
                   if b is not None)

    def mode_for(self, confidence: float) -> Mode | None:
        if confidence >= self.auto_above:
            return Mode.auto
        if self.approval_above is not None and confidence >= self.approval_above:
            return Mode.needs_approval
        if self.notify_above is not None and confidence >= self.notify_above:
            return Mode.notify
        return None


# An approver's identity: an API token's name, or ``user@host`` for the CLI.
IDENTITY = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,127}")


def _identity(v: str) -> str:
    if not IDENTITY.fullmatch(v):
        raise ValueError(f"{v!r} is not an identity (a token name or user@host: letters, "
                         "digits and . _ @ + -, at most 128)")
    return v


Identity = Annotated[str, BeforeValidator(lambda v: _identity(v) if isinstance(v, str) else v)]


class ApprovalSpec(_Strict):
    """Who answers a rule's approval requests, how many, and for how long.

    Unset fields come from ``defaults.approval``, then from the settings
    (``IA_APPROVAL_TTL_S``, ``IA_APPROVAL_ON_EXPIRY``).  Never from a decision.
    """

    approvers: list[str] | None = Field(default=None, min_length=1)  # group names
    required: int | None = Field(default=None, ge=1, le=1024)
    four_eyes: bool | None = None
    ttl_s: float | None = Field(default=None, gt=0)
    on_expiry: Literal["reject", "approve"] | None = None


@dataclass(frozen=True)
class ApprovalTerms:
    """The approval terms of one rule, resolved from the policy.

    ``approvers`` are identities (empty: anyone authenticated); ``ttl_s`` and
    ``on_expiry`` are None when the policy leaves them to the settings.
    """

    approvers: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()
    required: int = 1
    ttl_s: float | None = None
    on_expiry: str | None = None

    @property
    def restricted(self) -> bool:
        """Whether the rule limits who answers or asks for several approvers: then an
        unanswered request is never approved by default."""
        return bool(self.approvers) or self.required > 1


# Action params that decided approval terms before the policy did: refused, so a
# policy relying on them does not silently lose its expiry.
_OLD_APPROVAL_PARAMS = ("approval_ttl_s", "on_expiry")


# ``false`` switches a guard off for one rule (or, in defaults, for all rules).
Off = Literal[False]

# Samples older than this (by the worker's clock) do not act: a backlog or a
# back-dated producer describes targets as they were, not as they are.  Twice
# the 5 minutes of future skew validation accepts and the default cooldown;
# a worker that is further behind is catching up, which is a job for humans.
DEFAULT_MAX_EVENT_AGE_S = 600.0


def _event_age_limit(v: object) -> object:
    """``max_event_age_s`` is seconds > 0 or ``false`` (no limit).  Checked before the
    union so ``0`` and ``true`` are refused with one message instead of being read
    as ``false`` and ``1``."""
    if v is False:
        return v
    if isinstance(v, bool) or not isinstance(v, int | float) or v <= 0:
        raise ValueError("give a number of seconds > 0, or false for no limit")
    return v


EventAgeLimit = Annotated[float | Off, BeforeValidator(_event_age_limit)]


class Rule(_Strict):
    name: str = Field(min_length=1)
    match: Match = Field(default_factory=Match)
    when: When = Field(default_factory=When)
    action: ActionSpec | None = None
    mode: Literal["auto", "needs_approval", "notify", "shadow"] = "auto"
    autonomy: Autonomy | None = None
    cooldown_s: float | None = Field(default=None, ge=0.0)
    cooldown_per: Literal["rule", "target"] | None = None
    rate_limit: RateLimit | Off | None = None
    circuit_breaker: CircuitBreaker | Off | None = None
    blast_radius: BlastRadius | Off | None = None
    error_budget: ErrorBudget | Off | None = None
    capacity_floor: CapacityFloor | Off | None = None
    max_event_age_s: EventAgeLimit | None = None
    max_targets: int | None = Field(default=None, ge=1, le=1000)
    cost: float = Field(default=0.0, ge=0.0)
    approval: ApprovalSpec | None = None


class Defaults(_Strict):
    cooldown_s: float = Field(default=300.0, ge=0.0)
    # rule: per rule, action type and target; target: any rule's action on the target.
    cooldown_per: Literal["rule", "target"] = "rule"
    rate_limit: RateLimit | Off | None = None
    circuit_breaker: CircuitBreaker | Off | None = Field(default_factory=CircuitBreaker)
    blast_radius: BlastRadius | Off | None = None
    error_budget: ErrorBudget | Off | None = None
    capacity_floor: CapacityFloor | Off | None = None
    max_event_age_s: EventAgeLimit = DEFAULT_MAX_EVENT_AGE_S
    approval: ApprovalSpec | None = None
    # Parts (split on commas and whitespace) an action's target may name.
    max_targets: int = Field(default=1, ge=1, le=1000)


class PolicyDocument(_Strict):
    version: Literal[1]
    defaults: Defaults = Field(default_factory=Defaults)
    cost_cap: CostCap | None = None
    # Groups of approver identities, named by rules' ``approval.approvers``.
    approvers: dict[str, list[Identity]] = Field(default_factory=dict)
    health: Health = Field(default_factory=Health)
    # Freeze and maintenance windows (ia.decisions.windows); more are added at run time.
    windows: list[FreezeWindow] = Field(default_factory=list)
    # action type -> param -> {min, max}: every rule's params of that type must be a
    # number within them.
    action_bounds: dict[str, dict[str, Range]] = Field(default_factory=dict)
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


def _pick(own: object, default: object) -> object:
    """A rule's guard setting over the default; ``False`` (off) becomes ``None``."""
    value = default if own is None else own
    return None if value is False else value


@dataclass(frozen=True)
class RuleGuards:
    """The guard settings that apply to one rule (its own, else the defaults)."""

    cooldown_s: float = 0.0
    cooldown_per: str = "rule"
    rate_limit: RateLimit | None = None
    circuit_breaker: CircuitBreaker | None = None
    blast_radius: BlastRadius | None = None
    error_budget: ErrorBudget | None = None
    max_event_age_s: float | None = None  # None: events of any age may act
    cost: float = 0.0
    cost_cap: CostCap | None = None
    capacity_floor: CapacityFloor | None = None
    health: Health = field(default_factory=Health)
    max_targets: int = 1
    # The rule's action type's declared bounds (action_bounds), and the policy's windows.
    param_bounds: tuple[tuple[str, Range], ...] = ()
    windows: tuple[FreezeWindow, ...] = ()


@dataclass
class PolicyResult:
    rule: str | None
    action: Action | None
    mode: Mode
    trace: list[RuleTrace] = field(default_factory=list)
    guards: RuleGuards = field(default_factory=RuleGuards)


# Series whose rule selection is remembered (per policy object; cleared when full).
_SELECTION_CACHE = 100_000
_PLACEHOLDER = re.compile(r"\{(entity|metric)\}")


def _render_target(template: str, entity: str, metric: str) -> str:
    # Plain substitution, never str.format: a template must not be able to
    # reach attributes, and telemetry strings are only ever data.  One pass,
    # so an entity containing "{metric}" is not substituted again.
    return _PLACEHOLDER.sub(lambda m: entity if m.group(1) == "entity" else metric, template)


_TEMPLATED = templated_params()


def _templated_keys(rule: Rule) -> frozenset[str]:
    """The params of ``rule``'s action the worker fills ``{entity}``/``{metric}`` into:
    those the built-in action types declare templated (``ia.schemas.actions``) that hold
    a placeholder. Plug-in params are passed as written (the worker loads no plug-ins)."""
    if rule.action is None:
        return frozenset()
    params = rule.action.params
    own = _TEMPLATED.get(rule.action.type, frozenset())
    nested = _TEMPLATED.get(params.get("compensate", ""), frozenset())
    return frozenset(k for k, v in params.items()
                     if (k in own or (k.startswith(COMPENSATE_PREFIX)
                                      and k[len(COMPENSATE_PREFIX):] in nested))
                     and any(p in v for p in PLACEHOLDERS))


def _render_params(params: dict[str, str], templated: frozenset[str], entity: str,
                   metric: str) -> dict[str, str]:
    if not templated:
        return params
    return {k: _render_target(v, entity, metric)[:4096] if k in templated else v
            for k, v in params.items()}


def render_action(rule: Rule, entity: str, metric: str) -> Action | None:
    """The action ``rule`` decides for a sample of ``entity``/``metric`` (None: the rule
    has none): its type and params as written, its target template rendered.  The
    worker decides with it and the actuator re-authorises against it."""
    if rule.action is None:
        return None
    return Action(type=rule.action.type,
                  target=_render_target(rule.action.target, entity, metric)[:256],
                  params=_render_params(rule.action.params, _templated_keys(rule),
                                        entity, metric))


def selects(rule: Rule, entity: str, metric: str) -> bool:
    """Whether ``rule``'s entity and metric selectors take this series (labels, kind and
    conditions are the worker's to judge: a decision does not carry them)."""
    return _globs(rule.match.entity, entity) and _globs(rule.match.metric, metric)


def _globs(patterns: list[str], value: str) -> bool:
    return _compiled(tuple(patterns))(value) is not None


@functools.lru_cache(maxsize=4096)
def _compiled(patterns: tuple[str, ...]):  # -> bound re.Pattern.fullmatch
    """One regex per selector list: rules run once per event, so this is hot."""
    if patterns == ("*",):
        return _MATCH_ANY
    return re.compile("|".join(f"(?:{fnmatch.translate(p)})" for p in patterns),
                      re.DOTALL).fullmatch


def _MATCH_ANY(_value: str) -> bool:  # stands in for a compiled pattern
    return True


class Policy:
    def __init__(self, doc: PolicyDocument, source: str = "<policy>", text: str = "") -> None:
        self.doc = doc
        self.source = source
        self.version = hashlib.sha256(text.encode()).hexdigest()[:12] if text else "inline"
        self.text = text
        self._guards = {r.name: self._resolve(r) for r in doc.rules}
        self._rules = {r.name: r for r in doc.rules}
        self._templated = {r.name: _templated_keys(r) for r in doc.rules}
        self.fleet_labels = _fleet_labels(doc)
        self.health_labels = _health_labels(doc)
        self._selections: dict[tuple[str, str, str], list[str | None]] = {}

    def _resolve(self, rule: Rule) -> RuleGuards:
        d = self.doc.defaults
        return RuleGuards(
            cooldown_s=rule.cooldown_s if rule.cooldown_s is not None else d.cooldown_s,
            cooldown_per=rule.cooldown_per or d.cooldown_per,
            rate_limit=_pick(rule.rate_limit, d.rate_limit),  # type: ignore[arg-type]
            circuit_breaker=_pick(rule.circuit_breaker, d.circuit_breaker),  # type: ignore[arg-type]
            blast_radius=_pick(rule.blast_radius, d.blast_radius),  # type: ignore[arg-type]
            error_budget=_pick(rule.error_budget, d.error_budget),  # type: ignore[arg-type]
            max_event_age_s=_pick(rule.max_event_age_s, d.max_event_age_s),  # type: ignore[arg-type]
            cost=rule.cost, cost_cap=self.doc.cost_cap if rule.cost > 0 else None,
            capacity_floor=_pick(rule.capacity_floor, d.capacity_floor),  # type: ignore[arg-type]
            health=self.doc.health,
            max_targets=rule.max_targets or d.max_targets,
            param_bounds=tuple(sorted(self.doc.action_bounds.get(
                rule.action.type if rule.action else "", {}).items())),
            windows=tuple(self.doc.windows))

    def rule(self, name: str | None) -> Rule | None:
        """The rule called ``name`` (None: there is no such rule)."""
        return self._rules.get(name) if name is not None else None

    def approval_terms(self, rule: str | None) -> ApprovalTerms:
        """Approval terms of the rule named ``rule`` (the defaults' if there is none)."""
        found = next((r for r in self.doc.rules if r.name == rule), None)
        return _terms(self.doc, found.approval if found else None)

    def guards_for(self, rule: str | None) -> RuleGuards:
        """Guard settings of the rule named ``rule``; the defaults' if there is no such rule."""
        if rule in self._guards:
            return self._guards[rule]
        return self._resolve(Rule(name=rule or "-"))

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
            path = _document_path(err["loc"])
            loc = ".".join(str(p) for p in path)
            raise PolicyError(source, _line_of(root, path), f"{loc}: {err['msg']}") from exc
        _check_rule_names(doc, source, root)
        _check_windows(doc, source, root)
        _check_actions(doc, source, root)
        return cls(doc, source, text)

    @classmethod
    def from_file(cls, path: str | Path) -> Policy:
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as exc:
            raise PolicyError(str(p), None, f"cannot read policy: {exc.strerror}") from exc
        return cls.from_text(text, str(p))

    @classmethod
    @functools.cache
    def observe_only(cls) -> Policy:
        """The policy with no rules: every decision has mode ``none``.

        The baseline of replays, backtests and evaluations, read once from the
        packaged ``ia/policies/empty.yaml``.  It is not the worker's default
        (``ia/policies/observe.yaml`` logs strong anomalies): an offline baseline
        decides nothing, and its ``policy_version`` (the hash of that file's
        bytes) is part of replayed output, so the file stays exactly as it is.
        """
        text = (resources.files("ia") / "policies" / "empty.yaml").read_text(encoding="utf-8")
        return cls.from_text(text, "<observe-only>")

    def evaluate(self, *, entity: str, metric: str, kind: str, labels: dict[str, str],
                 features: dict[str, float], score: float, confidence: float,
                 drift: str) -> PolicyResult:
        trace: list[RuleTrace] = []
        selected = self._selection(entity, metric, kind)
        for rule, unselected in zip(self.doc.rules, selected, strict=True):
            reason = unselected or _mismatch(rule, labels, features, score, confidence, drift)
            if reason:
                trace.append(RuleTrace(rule=rule.name, matched=False, reason=reason))
                continue
            mode, ladder = _mode_of(rule, confidence)
            if mode is None:
                trace.append(RuleTrace(rule=rule.name, matched=False, reason=ladder))
                continue
            trace.append(RuleTrace(rule=rule.name, matched=True, reason=(
                f"score {score:.3f} >= {rule.when.min_score}, "
                f"confidence {confidence:.3f} >= {rule.when.min_confidence}" + ladder)))
            action = render_action(rule, entity, metric)
            return PolicyResult(rule.name, action, mode if action else Mode.none,
                                trace, self._guards[rule.name])
        return PolicyResult(None, None, Mode.none, trace)

    def _selection(self, entity: str, metric: str, kind: str) -> list[str | None]:
        """Per rule, why its kind/entity/metric selectors leave this series out (None:
        selected).  Remembered per series: the globs are the same for every sample."""
        key = (entity, metric, kind)
        found = self._selections.get(key)
        if found is None:
            if len(self._selections) >= _SELECTION_CACHE:
                self._selections.clear()  # bounded; rebuilt at the cost of a few globs
            found = self._selections[key] = [_unselected(r, entity, metric, kind)
                                             for r in self.doc.rules]
        return found


_RANK = {Mode.notify: 1, Mode.needs_approval: 2, Mode.auto: 3}


def _mode_of(rule: Rule, confidence: float) -> tuple[Mode | None, str]:
    """The rule's mode after the autonomy ladder, and a note for the trace.

    ``None`` (with the reason) when confidence is below the ladder's lowest band.
    """
    cap = Mode(rule.mode)
    if rule.autonomy is None:
        return cap, ""
    rung = rule.autonomy.mode_for(confidence)
    if rung is None:
        return None, (f"confidence {confidence:.3f} below the autonomy ladder "
                      f"(lowest band {rule.autonomy.floor():g})")
    if cap is Mode.shadow:
        return Mode.shadow, f"; autonomy ladder says {rung.value}, rule is shadow"
    mode = rung if _RANK[rung] <= _RANK[cap] else cap
    capped = f" (capped by mode {cap.value})" if mode is not rung else ""
    return mode, f"; autonomy ladder: {mode.value}{capped}"


def _fleet_labels(doc: PolicyDocument) -> frozenset[str | None]:
    """Group labels whose fleets must be counted (blast radius by share of fleet)."""
    out: set[str | None] = set()
    for br in [doc.defaults.blast_radius, *(r.blast_radius for r in doc.rules)]:
        if isinstance(br, BlastRadius) and br.max_fleet_pct is not None \
                and br.fleet_size is None:
            out.add(br.group_label)
    return frozenset(out)


def _health_labels(doc: PolicyDocument) -> frozenset[str | None]:
    """Group labels whose members' health must be followed (capacity floors)."""
    return frozenset(f.group_label for f in [doc.defaults.capacity_floor,
                                             *(r.capacity_floor for r in doc.rules)]
                     if isinstance(f, CapacityFloor))


def health_group(label: str | None, labels: dict[str, str] | None) -> str:
    """The capacity-floor group of an event's labels: ``label=value``, or ``all``."""
    return "all" if label is None else f"{label}={(labels or {}).get(label, '')}"


def _unselected(rule: Rule, entity: str, metric: str, kind: str) -> str | None:
    m = rule.match
    if kind != m.kind:
        return f"kind {kind} is not {m.kind}"
    if not _globs(m.entity, entity):
        return "entity not selected"
    if not _globs(m.metric, metric):
        return "metric not selected"
    return None


# How far a sample got through a rule before the reason it was not taken: the order of
# _unselected and _mismatch, then the autonomy ladder (ia policy test's "closest rule").
_MISS_ORDER = ("kind ", "entity ", "metric ", "label ", "score ", "confidence ", "direction ",
               "drift ", "feature ")


def miss_depth(reason: str) -> int:
    """How many of a rule's checks a sample passed before ``reason`` (higher: closer)."""
    if "autonomy ladder" in reason:
        return len(_MISS_ORDER)
    return next((i for i, prefix in enumerate(_MISS_ORDER) if reason.startswith(prefix)), 0)


def _mismatch(rule: Rule, labels: dict[str, str], features: dict[str, float], score: float,
              confidence: float, drift: str) -> str | None:
    """Why a rule whose selectors take the series does not match this sample."""
    m, w = rule.match, rule.when
    for k, v in m.labels.items():
        if not _globs(v, labels.get(k, "")):
            return f"label {k} does not match {(v[0] if len(v) == 1 else v)!r}"
    if score < w.min_score:
        return f"score {score:.3f} < {w.min_score}"
    if confidence < w.min_confidence:
        return f"confidence {confidence:.3f} < {w.min_confidence}"
    if not w.score.contains(score):
        return f"score {score:.3f} outside [{w.score.min}, {w.score.max}]"
    if not w.confidence.contains(confidence):
        return f"confidence {confidence:.3f} outside [{w.confidence.min}, {w.confidence.max}]"
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


def _terms(doc: PolicyDocument, own: ApprovalSpec | None) -> ApprovalTerms:
    """A rule's approval spec over the defaults', resolved to identities."""
    base = doc.defaults.approval or ApprovalSpec()
    spec = own or ApprovalSpec()

    def pick(name: str) -> object:
        value = getattr(spec, name)
        return getattr(base, name) if value is None else value

    groups = tuple(pick("approvers") or ())  # type: ignore[arg-type]
    four_eyes = bool(pick("four_eyes"))
    required = pick("required") or (2 if four_eyes else 1)
    members = sorted({m for g in groups for m in doc.approvers.get(g, [])})
    return ApprovalTerms(approvers=tuple(members), groups=groups,
                         required=int(required),  # type: ignore[call-overload]
                         ttl_s=pick("ttl_s"),  # type: ignore[arg-type]
                         on_expiry=pick("on_expiry"))  # type: ignore[arg-type]


def _check_approval(doc: PolicyDocument, spec: ApprovalSpec | None, where: tuple,
                    source: str, root: yaml.Node, is_default: bool = False) -> None:
    """Approver groups exist and can meet ``required``; the terms are consistent."""
    if spec is None:
        return
    for j, group in enumerate(spec.approvers or []):
        if group not in doc.approvers:
            raise PolicyError(source, _line_of(root, (*where, "approvers", j)),
                              f"unknown approver group {group!r}; declare it under "
                              "'approvers'")
    if spec.four_eyes and spec.required == 1:
        raise PolicyError(source, _line_of(root, (*where, "required")),
                          "four_eyes needs at least 2 approvers; drop required: 1")
    terms = _terms(doc, None if is_default else spec)
    line = _line_of(root, where)
    if terms.approvers and terms.required > len(terms.approvers):
        raise PolicyError(source, line, f"required is {terms.required} but the groups "
                          f"{list(terms.groups)} have {len(terms.approvers)} members")
    if terms.on_expiry == "approve" and terms.restricted:
        raise PolicyError(source, line, "on_expiry: approve would run the action without "
                          "its approvers; use reject, or drop approvers/required")


def _check_rule_names(doc: PolicyDocument, source: str, root: yaml.Node) -> None:
    seen: set[str] = set()
    _check_approval(doc, doc.defaults.approval, ("defaults", "approval"), source, root, True)
    for i, rule in enumerate(doc.rules):
        if rule.name in seen:
            raise PolicyError(source, _line_of(root, ("rules", i, "name")),
                              f"duplicate rule name {rule.name!r}")
        seen.add(rule.name)
        _check_approval(doc, rule.approval or ApprovalSpec(), ("rules", i, "approval"),
                        source, root)
        for param in _OLD_APPROVAL_PARAMS:
            if rule.action and param in rule.action.params:
                new = "ttl_s" if param == "approval_ttl_s" else param
                raise PolicyError(
                    source, _line_of(root, ("rules", i, "action", "params", param)),
                    f"action param {param!r} no longer sets approval terms (a decision "
                    f"must not choose its own); write approval: {{{new}: ...}} on the rule")
        if rule.action and rule.action.type == "command":
            cmd = rule.action.params.get("command")
            if cmd not in doc.commands:
                raise PolicyError(source, _line_of(root, ("rules", i, "action")),
                                  f"rule {rule.name!r} names unknown command {cmd!r}; "
                                  "declare it under 'commands'")


def _check_windows(doc: PolicyDocument, source: str, root: yaml.Node) -> None:
    seen: set[str] = set()
    for i, w in enumerate(doc.windows):
        if w.name in seen:
            raise PolicyError(source, _line_of(root, ("windows", i, "name")),
                              f"duplicate window name {w.name!r}")
        seen.add(w.name)


# A target names one thing: these read as "everything matching" to many tools.
_WILDCARDS = frozenset("*?[]")
_EVERYTHING = frozenset({"all", "any", "everything"})
_SEPARATORS = re.compile(r"[,\s]+")


def target_parts(target: str) -> list[str]:
    """The things a target names: split on commas and whitespace (tools such as
    ansible ``--limit`` or pdsh read ``a,b`` as two hosts); ``[]`` for a blank one."""
    return [p for p in _SEPARATORS.split(target.strip()) if p]


def target_problem(target: str, max_targets: int) -> str | None:
    """Why ``target`` must not be acted on (None: it names few enough plain things)."""
    parts = target_parts(target)
    if not parts or target.strip()[:1] == "," or target.strip()[-1:] == "," \
            or re.search(r",\s*,", target):
        return "it is empty or has an empty part, which reads as everything"
    wild = sorted({c for c in target if c in _WILDCARDS})
    if wild:
        return f"it has wildcard characters {''.join(wild)!r}"
    if _EVERYTHING & {p.lower() for p in parts}:
        return "it names everything"
    if len(parts) > max_targets:
        return f"it names {len(parts)} things, more than max_targets {max_targets}"
    return None


def param_problem(name: str, value: str, bound: Range) -> str | None:
    """Why param ``name=value`` is outside its declared ``bound`` (None: within)."""
    try:
        number = float(value)
    except ValueError:
        return f"param {name}={value!r} is not a number (it has declared bounds)"
    if number != number or not bound.contains(number):  # NaN is in no range
        return f"param {name}={value} outside its declared bounds [{bound.min}, {bound.max}]"
    return None


def _check_actions(doc: PolicyDocument, source: str, root: yaml.Node) -> None:
    """Targets and params that could only ever be refused are refused at load."""
    for atype, bounds in doc.action_bounds.items():
        for pname, b in bounds.items():
            if b.min is not None and b.max is not None and b.min > b.max:
                raise PolicyError(source, _line_of(root, ("action_bounds", atype, pname)),
                                  f"action_bounds.{atype}.{pname}: min {b.min:g} > max "
                                  f"{b.max:g}")
    for i, rule in enumerate(doc.rules):
        if rule.action is None:
            continue
        # Placeholders render to one entity or metric name, which is one part.
        literal = _PLACEHOLDER.sub("x", rule.action.target)
        problem = target_problem(literal, rule.max_targets or doc.defaults.max_targets)
        if problem:
            raise PolicyError(source, _line_of(root, ("rules", i, "action", "target")),
                              f"rule {rule.name!r}: target {rule.action.target!r}: {problem}")
        bounds = doc.action_bounds.get(rule.action.type, {})
        for pname, bound in bounds.items():
            value = rule.action.params.get(pname)
            where = ("rules", i, "action", "params", pname)
            if value is None:
                raise PolicyError(source, _line_of(root, ("rules", i, "action")),
                                  f"rule {rule.name!r}: action {rule.action.type} needs param "
                                  f"{pname!r} (it has declared bounds)")
            problem = param_problem(pname, value, bound)
            if problem:
                raise PolicyError(source, _line_of(root, where), f"rule {rule.name!r}: {problem}")


def _document_path(loc: tuple) -> tuple:
    """An error location without pydantic's union-branch tags (``RateLimit``,
    ``function-after[...]``, ``literal[False]``): only keys of the document."""
    tags = {m.__name__ for m in (RateLimit, CircuitBreaker, BlastRadius, ErrorBudget,
                                 CapacityFloor)}
    return tuple(p for p in loc if not (isinstance(p, str) and ("[" in p or p in tags)))


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
