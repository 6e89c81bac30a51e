"""``ia policy check``'s second half: the rules' actions against what the actuators accept.

:meth:`Policy.from_text <ia.decisions.policy.Policy.from_text>` validates a
document's shape; this checks each rule's ``action`` against a catalog of
action types (:class:`~ia.schemas.actions.ActionTypeSpec`: the built-ins, and
the plug-ins the CLI finds through :mod:`ia.actuators.registry`, which this
layer may not import). It finds what would otherwise fail, or silently do
nothing, only when the action runs: an unknown action type, an unknown or
ill-typed param, a required param missing, and combinations that cannot work
(verification without a time limit or threshold, thresholds no value can meet,
compensation params without a compensation, approval terms on a rule that
never asks). Each problem names the file and line, and a close match where
there is one.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from dataclasses import dataclass

import yaml

from ia.decisions.policy import Policy, PolicyError, Rule, _line_of
from ia.schemas.actions import (
    COMMON_PARAMS,
    COMPENSATE_PREFIX,
    VERIFY_PARAMS,
    ActionTypeSpec,
    ParamSpec,
)


@dataclass(frozen=True)
class Note:
    """Something the checker could not check (a plug-in without declarations)."""

    source: str
    line: int | None
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.message}" if self.line else \
            f"{self.source}: {self.message}"


def did_you_mean(word: str, candidates: object) -> str:
    """``; did you mean 'x'?`` for the closest candidate, or nothing."""
    close = difflib.get_close_matches(word, sorted(candidates), n=1, cutoff=0.6)  # type: ignore[arg-type]
    return f"; did you mean {close[0]!r}?" if close else ""


def check_actions(policy: Policy, catalog: Mapping[str, ActionTypeSpec]
                  ) -> tuple[list[PolicyError], list[Note]]:
    """The problems of ``policy``'s actions against ``catalog``, in file order, and notes."""
    text = policy.text
    root = yaml.compose(text) if text else None
    data = yaml.safe_load(text) if text else {}
    raw_rules = data.get("rules") or [] if isinstance(data, dict) else []
    checker = _Checker(policy.source, root, catalog)
    for i, rule in enumerate(policy.doc.rules):
        raw = raw_rules[i].get("action") if i < len(raw_rules) else None
        if rule.action is not None and isinstance(raw, dict):
            checker.rule(i, rule, raw.get("params") or {})
    checker.problems.sort(key=lambda p: p.line or 0)
    return checker.problems, checker.notes


class _Checker:
    def __init__(self, source: str, root: yaml.Node | None,
                 catalog: Mapping[str, ActionTypeSpec]) -> None:
        self.source, self.root, self.catalog = source, root, catalog
        self.problems: list[PolicyError] = []
        self.notes: list[Note] = []

    def _line(self, *path: object) -> int | None:
        return _line_of(self.root, path)

    def _fail(self, line: int | None, message: str) -> None:
        self.problems.append(PolicyError(self.source, line, message))

    def rule(self, i: int, rule: Rule, params: Mapping[str, object]) -> None:
        assert rule.action is not None
        at = ("rules", i, "action")
        who = f"rule {rule.name!r}"
        spec = self.catalog.get(rule.action.type)
        if spec is None:
            self._fail(self._line(*at, "type"),
                       f"{who}: unknown action type {rule.action.type!r}"
                       f"{did_you_mean(rule.action.type, self.catalog)} "
                       f"(known: {', '.join(sorted(self.catalog))})")
            return
        own = {k: v for k, v in params.items() if not str(k).startswith(COMPENSATE_PREFIX)}
        if not spec.declared:
            self.notes.append(Note(self.source, self._line(*at, "type"),
                                   f"{who}: plug-in {spec.name!r} declares no params; "
                                   "its params are not checked"))
            self._params(at, who, spec, own, common=False, known=None)
        else:
            self._params(at, who, spec, own, common=True, known={**COMMON_PARAMS,
                                                                  **spec.params})
        self._verification(at, who, params)
        self._compensation(at, who, params)
        self._approval(at, who, rule, params)

    def _params(self, at: tuple, who: str, spec: ActionTypeSpec, params: Mapping[str, object],
                *, common: bool, known: Mapping[str, ParamSpec] | None,
                prefix: str = "") -> None:
        """Unknown, ill-typed and missing params (``known`` None: only the common ones)."""
        for key, value in params.items():
            name = str(key)
            line = self._line(*at, "params", prefix + name)
            p = (known or {}).get(name) if known is not None else COMMON_PARAMS.get(name)
            if p is None:
                if known is None:
                    continue  # an undeclared plug-in's own param
                takes = ", ".join(spec.params) or "no params of its own"
                self._fail(line, f"{who}: unknown param {prefix + name!r} for action type "
                                 f"{spec.name!r}{did_you_mean(name, known)} ({spec.name} "
                                 f"takes: {takes}" + ("; every type also takes verify_*, "
                                                      "compensate, notify_url)" if common else ")"))
                continue
            problem = p.problem(value)
            if problem is None and p.type == "action_type" and str(value) not in self.catalog:
                problem = (f"unknown action type {str(value)!r}"
                           f"{did_you_mean(str(value), self.catalog)}")
            if problem:
                self._fail(line, f"{who}: param {prefix + name!r}: {problem}")
        for name, p in spec.params.items():
            if p.required and name not in params:
                self._fail(self._line(*at), f"{who}: action type {spec.name!r} needs param "
                                            f"{prefix + name!r} ({p.help})")

    def _verification(self, at: tuple, who: str, params: Mapping[str, object]) -> None:
        verifying = [k for k in params if k in VERIFY_PARAMS or k == "compensate"]
        if not verifying:
            return
        line = self._line(*at, "params", verifying[0])
        if "verify_within_s" not in params:
            self._fail(line, f"{who}: {verifying[0]} needs verify_within_s (how long the "
                             "metric has to recover)")
        below, above = _number(params.get("verify_below")), _number(params.get("verify_above"))
        if "verify_below" not in params and "verify_above" not in params:
            self._fail(line, f"{who}: {verifying[0]} needs verify_below and/or verify_above "
                             "(what recovered means)")
        elif below is not None and above is not None and below <= above:
            self._fail(self._line(*at, "params", "verify_below"),
                       f"{who}: verify_below {below:g} <= verify_above {above:g}: no value is "
                       "below one and above the other, so verification always fails")

    def _compensation(self, at: tuple, who: str, params: Mapping[str, object]) -> None:
        nested = {str(k)[len(COMPENSATE_PREFIX):]: v for k, v in params.items()
                  if str(k).startswith(COMPENSATE_PREFIX)}
        kind = params.get("compensate")
        if nested and not kind:
            first = COMPENSATE_PREFIX + next(iter(nested))
            self._fail(self._line(*at, "params", first),
                       f"{who}: {first} without compensate (the compensating action type)")
            return
        spec = self.catalog.get(str(kind)) if kind else None
        if spec is None or not spec.declared:
            return  # none, an unknown type (reported with the param), or unchecked
        self._params(at, who, spec, nested, common=False, known=dict(spec.params),
                     prefix=COMPENSATE_PREFIX)

    def _approval(self, at: tuple, who: str, rule: Rule, params: Mapping[str, object]) -> None:
        if rule.approval is None or _may_ask(rule):
            return
        self._fail(self._line("rules", at[1], "approval"),
                   f"{who}: approval terms have no effect: the rule never asks for approval "
                   f"(mode {rule.mode}" + (" without an approval_above band)"
                                            if rule.mode == "auto" else ")"))


def _may_ask(rule: Rule) -> bool:
    """Whether ``rule`` can yield a ``needs_approval`` decision."""
    if rule.mode == "needs_approval":
        return True
    return rule.mode == "auto" and rule.autonomy is not None \
        and rule.autonomy.approval_above is not None


def _number(value: object) -> float | None:
    if value is None or isinstance(value, bool | dict | list):
        return None
    try:
        return float(str(value))
    except ValueError:
        return None
