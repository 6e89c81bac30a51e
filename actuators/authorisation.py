"""Re-authorisation at execution: only what the actuator's own policy allows runs.

A valid signature says a worker decided it; it does not say the current policy
still allows it (a worker with an older policy, a leaked key, a worker gone wrong).
So right after the signature, the actuator checks every decision that can do
something (mode ``auto``, ``needs_approval`` or ``notify``) against its own copy
of the policy (``IA_POLICY_FILE``, followed on change like the worker's):

* the rule the decision names (its last matched rule step) exists and has an action;
* the action's type and params are exactly the rule's: params come from the
  policy, never from the record;
* the target is the rule's target template rendered for the decision's entity and
  metric, and the rule's entity and metric selectors take that series (labels and
  conditions are the worker's to judge: a decision does not carry the labels);
* the mode is one the rule can produce: a rule's ``mode`` caps the autonomy ladder
  and guards only ever lower it, so an ``auto`` decision of a ``needs_approval``
  rule, or any acting decision of a ``shadow`` rule, is refused;
* every webhook destination (``url`` of ``webhook`` and ``notify`` actions,
  ``notify_url`` of any action, the same of a compensating action) is on the
  allow-list of scheme, host and port.

The allow-list is ``IA_WEBHOOK_ALLOW`` (comma-separated ``scheme://host[:port]``;
no port means the scheme's default port), or, unset, the destinations the policy's
own literal URLs name.  With an explicit list, ``env:``/``file:`` destinations are
resolved here and checked too; without one they are allowed (the policy names
them and the actuator's own environment or files hold them, so no record can
point them elsewhere).

A refusal is a :class:`Refusal`: its ``reason`` is the ``reason`` label of
``ia_decisions_rejected_total`` and the outcome's ``error``.  The checks use only
the decision and the policy (no I/O but reading a ``file:`` secret), so they are
unit-tested on plain objects.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from enum import StrEnum

import httpx

from ia.actuators.base import ActionFailed
from ia.actuators.builtin import redact_url, resolve_secret
from ia.core.errors import ConfigError
from ia.decisions.policy import Policy, Rule, render_action, selects
from ia.schemas.models import Action, Decision, Mode


class Reason(StrEnum):
    """Why the current policy does not allow a decision (a metric label: stable)."""

    unknown_rule = "unknown_rule"  # no such rule now, or it has no action
    action_type = "action_type"
    params = "params"
    target = "target"
    not_selected = "not_selected"  # the rule's selectors do not take the series
    mode = "mode"  # more autonomy than the rule allows
    destination = "destination"  # a webhook destination not on the allow-list


@dataclass(frozen=True)
class Refusal:
    """Why a decision does not run: a stable ``reason`` and a sentence for humans."""

    reason: Reason
    detail: str


# How much autonomy each mode is (a rule's mode caps what its decisions may have).
_RANK = {Mode.notify: 1, Mode.needs_approval: 2, Mode.auto: 3}
# Decisions in these modes can cause something (an action, an approval request, a message).
ACTING = frozenset(_RANK)
_DEFAULT_PORTS = {"http": 80, "https": 443}

Origin = tuple[str, str, int]  # scheme, host, port


def origin(url: str) -> Origin | None:
    """``url``'s scheme, host and port (the scheme's default if none is given); None if
    it is no absolute http(s)-like URL."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError):
        return None
    scheme, host = parsed.scheme.lower(), (parsed.host or "").lower()
    if not scheme or not host:
        return None
    port = parsed.port or _DEFAULT_PORTS.get(scheme)
    return (scheme, host, port) if port is not None else None


def parse_allow(text: str | None) -> frozenset[Origin] | None:
    """The origins of ``IA_WEBHOOK_ALLOW`` (None: unset, derive them from the policy).

    Raises :class:`~ia.core.errors.ConfigError` for an entry that is not
    ``scheme://host[:port]`` (a path would suggest a finer check than is made).
    """
    if text is None or not text.strip():
        return None
    out: set[Origin] = set()
    for entry in (e.strip() for e in text.split(",")):
        if not entry:
            continue
        found = origin(entry)
        if found is None or entry.rstrip("/").count("/") != 2:
            raise ConfigError(f"IA_WEBHOOK_ALLOW: {entry!r} is not scheme://host[:port]")
        out.add(found)
    return frozenset(out)


def destinations(action: Action) -> Iterator[str]:
    """The webhook destinations an action's params name (URLs or secret references),
    its compensating action's (``compensate``, ``compensate.url``, ...) included."""
    for kind, prefix in ((action.type, ""), (action.params.get("compensate", ""),
                                             "compensate.")):
        url, notify_url = action.params.get(prefix + "url"), action.params.get(
            prefix + "notify_url")
        if kind in ("webhook", "notify") and url:
            yield url
        if notify_url:
            yield notify_url


def _is_reference(value: str) -> bool:
    return value.partition(":")[0] in ("env", "file")


def policy_origins(policy: Policy) -> frozenset[Origin]:
    """The origins of the literal destination URLs in ``policy``'s rules."""
    out: set[Origin] = set()
    for rule in policy.doc.rules:
        if rule.action is None:
            continue
        action = Action(type=rule.action.type, target="-", params=rule.action.params)
        for dest in destinations(action):
            found = None if _is_reference(dest) else origin(dest)
            if found is not None:
                out.add(found)
    return frozenset(out)


class Authoriser:
    """Checks decisions against the current policy (``policy()``, called per decision).

    ``allow``: the explicit allow-list (:func:`parse_allow`), or None to allow the
    origins of the policy's own URLs.
    """

    def __init__(self, policy: Callable[[], Policy],
                 allow: Iterable[Origin] | None = None) -> None:
        self.policy = policy
        self.allow = frozenset(allow) if allow is not None else None
        self._derived: tuple[Policy, frozenset[Origin]] | None = None

    def check(self, d: Decision) -> Refusal | None:
        """Why ``d`` must not run (None: the current policy allows it, or it cannot act)."""
        if d.action is None or d.mode not in ACTING:
            return None
        policy = self.policy()
        rule = policy.rule(d.chosen_rule)
        if rule is None or rule.action is None:
            return Refusal(Reason.unknown_rule,
                           f"policy {policy.version} has no rule {d.chosen_rule!r} with an action")
        return (self._action(rule, d) or self._mode(rule, d.mode)
                or self._destinations(policy, d.action))

    @staticmethod
    def _action(rule: Rule, d: Decision) -> Refusal | None:
        assert d.action is not None
        expected = render_action(rule, d.entity, d.metric)
        assert expected is not None
        if d.action.type != expected.type:
            return Refusal(Reason.action_type, f"rule {rule.name!r} acts with "
                           f"{expected.type!r}, not {d.action.type!r}")
        if d.action.params != expected.params:
            changed = sorted(k for k in d.action.params.keys() | expected.params.keys()
                             if d.action.params.get(k) != expected.params.get(k))
            # Names only: values may be secrets, or whatever a forger put there.
            return Refusal(Reason.params, f"params {', '.join(changed)} differ from rule "
                           f"{rule.name!r}'s")
        if d.action.target != expected.target:
            return Refusal(Reason.target, f"rule {rule.name!r} targets {expected.target!r} "
                           "for this entity and metric")
        if not selects(rule, d.entity, d.metric):
            return Refusal(Reason.not_selected, f"rule {rule.name!r} does not select "
                           "this entity and metric")
        return None

    @staticmethod
    def _mode(rule: Rule, mode: Mode) -> Refusal | None:
        cap = Mode(rule.mode)
        if cap is Mode.shadow or _RANK[mode] > _RANK[cap]:
            return Refusal(Reason.mode, f"rule {rule.name!r} allows at most mode "
                           f"{cap.value}, not {mode.value}")
        return None

    def _destinations(self, policy: Policy, action: Action) -> Refusal | None:
        for dest in destinations(action):
            if self.allow is None and _is_reference(dest):
                continue  # named by the policy, held by the actuator's own environment
            try:
                url = resolve_secret(dest)
            except ActionFailed:
                continue  # nothing can be sent to it: execution reports the missing secret
            if origin(url) not in self._allowed(policy):
                return Refusal(Reason.destination, f"destination {redact_url(url)} is not on "
                               "the webhook allow-list (IA_WEBHOOK_ALLOW, or the policy's own "
                               "URLs)")
        return None

    def _allowed(self, policy: Policy) -> frozenset[Origin]:
        if self.allow is not None:
            return self.allow
        if self._derived is None or self._derived[0] is not policy:
            self._derived = (policy, policy_origins(policy))  # once per policy version
        return self._derived[1]
