"""What each action type accepts: the params an actuator reads, declared once.

A policy's ``action: {type: ..., params: {...}}`` is a contract between the
worker (which copies the params into the decision) and the actuator (which
reads them). Each actuator declares its params here as :class:`ParamSpec`s
(built-ins) or on its class as ``params`` (plug-ins, see
:mod:`ia.actuators.registry`), so ``ia policy check`` can refuse a misspelled
type, an unknown or ill-typed param, or a combination that cannot work before
anything runs, and the README's reference of action params is generated from
the same declarations (:func:`reference_markdown`).

Params reach actuators as strings (YAML scalars are stringified), so a type
says which strings are valid. ``templated`` params have ``{entity}`` and
``{metric}`` substituted by the worker, as an action's ``target`` does; in any
other param the braces are sent as written, so the checker refuses them there.

This module sits below both the decision layer and the actuators, which may
each import it (``.importlinter``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

ParamType = Literal["string", "number", "integer", "url", "action_type"]
PLACEHOLDERS = ("{entity}", "{metric}")
# Params of the compensating action are given as ``compensate.<param>``.
COMPENSATE_PREFIX = "compensate."


@dataclass(frozen=True)
class ParamSpec:
    """One param of an action type.

    Parameters
    ----------
    type
        ``string``; ``number`` (finite float); ``integer``; ``url`` (``http(s)://…``
        or a secret reference ``env:NAME`` / ``file:PATH``); ``action_type`` (a
        known action type).
    help
        One line for the README reference and ``ia policy actions``.
    required
        The action cannot run without it.
    templated
        ``{entity}`` and ``{metric}`` are substituted by the worker.
    choices
        The only values allowed, if any.
    positive
        A ``number`` or ``integer`` that must be > 0.
    """

    type: ParamType = "string"
    help: str = ""
    required: bool = False
    templated: bool = False
    choices: tuple[str, ...] = ()
    positive: bool = False

    def problem(self, value: object) -> str | None:
        """Why ``value`` (as written in the YAML) is not valid here, or None."""
        if isinstance(value, dict | list) or value is None:
            return f"expected a {self.type}, got {_yaml_kind(value)}"
        text = str(value)
        if self.choices and text not in self.choices:
            return f"{text!r} is not one of {', '.join(self.choices)}"
        if self.type in ("number", "integer"):
            return self._numeric(value, text)
        if self.type == "url" and not _url_like(text):
            return (f"{text!r} is not a URL (http://…, https://…) or a secret reference "
                    "(env:NAME, file:PATH)")
        if not self.templated and any(p in text for p in PLACEHOLDERS):
            return ("is not templated: {entity}/{metric} would be sent as written "
                    "(only target and templated params are filled in)")
        return None

    def _numeric(self, value: object, text: str) -> str | None:
        if isinstance(value, bool):
            return f"expected a {self.type}, got a boolean"
        try:
            number = int(text) if self.type == "integer" else float(text)
        except ValueError:
            return f"{text!r} is not a{'n integer' if self.type == 'integer' else ' number'}"
        if not math.isfinite(number):
            return "must be finite"
        if self.positive and number <= 0:
            return "must be > 0"
        return None

    def describe(self) -> str:
        """The type column of the reference: ``number > 0``, ``one of: a, b``, ..."""
        kind = f"one of {', '.join(f'`{c}`' for c in self.choices)}" if self.choices \
            else self.type
        if self.positive:
            kind += " > 0"
        flags = [f for f, on in (("required", self.required), ("templated", self.templated))
                 if on]
        return kind + (f" ({', '.join(flags)})" if flags else "")


@dataclass(frozen=True)
class ActionTypeSpec:
    """An action type and the params its actuator reads.

    ``declared`` is False for a plug-in that declares no ``params``: its params
    cannot be checked (any are accepted, and ``ia policy check`` says so).
    """

    name: str
    help: str
    params: Mapping[str, ParamSpec] = field(default_factory=dict)
    declared: bool = True
    builtin: bool = True


def _yaml_kind(value: object) -> str:
    return {dict: "a mapping", list: "a list"}.get(type(value), "nothing (null)")


def _url_like(text: str) -> bool:
    scheme, sep, rest = text.partition(":")
    if scheme in ("env", "file"):
        return bool(rest)
    return scheme in ("http", "https") and rest.startswith("//") and len(rest) > 2 and bool(sep)


# --- the params every action type accepts (read by the executor, not the actuator) ----------

VERIFY_PARAMS = ("verify_metric", "verify_entity", "verify_within_s", "verify_below",
                 "verify_above")

COMMON_PARAMS: Mapping[str, ParamSpec] = {
    "verify_within_s": ParamSpec(
        "number", "verification: the metric must recover within this many seconds "
        "(required with any other verify_* param or compensate)", positive=True),
    "verify_below": ParamSpec("number", "verification: recovered when a newer sample is below "
                                        "this"),
    "verify_above": ParamSpec("number", "verification: recovered when a newer sample is above "
                                        "this"),
    "verify_metric": ParamSpec("string", "verification: the metric to watch (default: the "
                                         "decision's)"),
    "verify_entity": ParamSpec("string", "verification: the entity to watch (default: the "
                                         "decision's)", templated=True),
    "compensate": ParamSpec("action_type", "action type run when verification fails; its params "
                                           "are given as `compensate.<param>`"),
    "compensate_target": ParamSpec("string", "target of the compensation (default: the "
                                             "action's)", templated=True),
    "notify_url": ParamSpec("url", "notification endpoint of this rule's notify-mode decisions "
                                   "and approval announcements (default IA_NOTIFY_URL)"),
}

# --- the built-in actuators (ia.actuators.builtin) -----------------------------------------

BUILTIN_ACTIONS: Mapping[str, ActionTypeSpec] = {
    spec.name: spec for spec in (
        ActionTypeSpec("log", "writes a line to the actuator's log and touches nothing "
                              "(dry runs)"),
        ActionTypeSpec("webhook", "POSTs the decision as JSON with an Idempotency-Key header; "
                                  "retries 5xx, 429 and network errors", {
            "url": ParamSpec("url", "where to POST", required=True),
        }),
        ActionTypeSpec("notify", "posts a Slack-compatible incoming-webhook message about the "
                                 "decision", {
            "url": ParamSpec("url", "the incoming webhook (default: notify_url, then "
                                    "IA_NOTIFY_URL)"),
            "message": ParamSpec("string", "a line to lead the message with", templated=True),
            "channel": ParamSpec("string", "channel, for receivers that honour it"),
        }),
        ActionTypeSpec("simulator", "controls the demo fleet of `ia demo` (IA_SIMULATOR_URL)", {
            "op": ParamSpec("string", "what to do to the target", required=True,
                            choices=("restart", "rollback", "scale_out")),
        }),
        ActionTypeSpec("command", "runs an argv list declared under the policy's `commands`, "
                                  "never through a shell", {
            "command": ParamSpec("string", "name of the argv list in `commands`",
                                 required=True),
        }),
    )
}


def templated_params(catalog: Mapping[str, ActionTypeSpec] = BUILTIN_ACTIONS
                     ) -> dict[str, frozenset[str]]:
    """Per action type, the params the worker fills ``{entity}``/``{metric}`` into."""
    common = {k for k, p in COMMON_PARAMS.items() if p.templated}
    return {name: frozenset(common | {k for k, p in spec.params.items() if p.templated})
            for name, spec in catalog.items()}


def reference_markdown(catalog: Mapping[str, ActionTypeSpec] = BUILTIN_ACTIONS) -> str:
    """The README's reference of action types and params (a test keeps it in sync)."""
    out = ["| action type | param | type | meaning |", "|---|---|---|---|"]
    for name, spec in catalog.items():
        out.append(f"| `{name}` | | | {spec.help} |")
        for param, p in spec.params.items():
            out.append(f"| | `{param}` | {p.describe()} | {p.help} |")
    out.append("| *every type* | | | read by the executor, whatever the actuator |")
    for param, p in COMMON_PARAMS.items():
        out.append(f"| | `{param}` | {p.describe()} | {p.help} |")
    out.append(f"| | `{COMPENSATE_PREFIX}<param>` | as the compensating type declares | "
               "a param of the compensating action |")
    return "\n".join(out)
