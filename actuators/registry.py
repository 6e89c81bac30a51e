"""Builds the set of actuators an ``ia actuate`` process offers: built-ins and plug-ins.

Plug-ins are found through the entry point group ``ia.actuators``.  Each entry
point names a callable (a class or a function) that takes an
:class:`ActuatorContext` and returns an :class:`~actuators.base.Actuator`
whose ``name`` equals the entry point's name.  A package adds one with::

    # pyproject.toml of the plug-in package
    [project.entry-points."ia.actuators"]
    pagerduty = "ia_pagerduty:PagerDutyActuator"

    # ia_pagerduty.py
    class PagerDutyActuator:
        name = "pagerduty"

        def __init__(self, ctx):          # ctx: ia.actuators.registry.ActuatorContext
            self.timeout_s = ctx.timeout_s

        async def execute(self, action, decision) -> str:
            ...                           # raise ia.actuators.base.ActionFailed on failure
            return "incident opened"

Policies then use ``action: {type: pagerduty, ...}``.  The executor gives a
plug-in the same idempotency, per-target lock, timeout, guards and outcome
records as a built-in.  A plug-in cannot replace a built-in (that name is
refused), and one that fails to load is logged and skipped, so its actions
fail with "unknown action type" instead of taking the actuator down.
``IA_ACTUATOR_PLUGINS`` selects plug-ins: ``all`` (default), ``none`` or
a comma-separated list of names.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import EntryPoint, entry_points

from ia.actuators.base import Actuator
from ia.actuators.builtin import (
    CommandActuator,
    LogActuator,
    NotifyActuator,
    SimulatorActuator,
    WebhookActuator,
)

log = logging.getLogger("ia.actuators")

ENTRY_POINT_GROUP = "ia.actuators"
BUILTIN = ("log", "webhook", "notify", "simulator", "command")


@dataclass(frozen=True)
class ActuatorContext:
    """What an actuator may be configured with (plug-ins read their own env too)."""

    commands: dict[str, list[str]] = field(default_factory=dict)
    webhook_url: str | None = None
    simulator_url: str | None = None
    notify_url: str | None = None
    retries: int = 3
    timeout_s: float = 10.0


def _selected(select: str) -> set[str] | None:
    """None means every plug-in."""
    value = select.strip().lower()
    if value in ("", "all", "*"):
        return None
    if value == "none":
        return set()
    return {n.strip() for n in select.split(",") if n.strip()}


def discover(select: str = "all") -> list[EntryPoint]:
    """Installed plug-in entry points (group ``ia.actuators``) that ``select`` allows."""
    wanted = _selected(select)
    found = {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}
    return [ep for name, ep in sorted(found.items()) if wanted is None or name in wanted]


def load_plugins(ctx: ActuatorContext, select: str = "all") -> dict[str, Actuator]:
    out: dict[str, Actuator] = {}
    for ep in discover(select):
        if ep.name in BUILTIN:
            log.error("actuator plug-in %s (%s) refused: it would replace a built-in",
                      ep.name, ep.value)
            continue
        try:
            actuator = ep.load()(ctx)
        except Exception as exc:
            log.error("actuator plug-in %s (%s) failed to load: %s: %s", ep.name, ep.value,
                      type(exc).__name__, exc)
            continue
        if getattr(actuator, "name", None) != ep.name or not callable(
                getattr(actuator, "execute", None)):
            log.error("actuator plug-in %s (%s) refused: it must have name %r and an async "
                      "execute(action, decision)", ep.name, ep.value, ep.name)
            continue
        out[ep.name] = actuator
        log.info("actuator plug-in %s loaded from %s", ep.name, ep.value)
    return out


def build_actuators(*, commands: dict[str, list[str]] | None = None,
                    current_commands: Callable[[], Mapping[str, list[str]]] | None = None,
                    webhook_url: str | None = None, simulator_url: str | None = None,
                    notify_url: str | None = None, retries: int = 3, timeout_s: float = 10.0,
                    plugins: str = "none") -> dict[str, Actuator]:
    """Built-in actuators plus the selected plug-ins (``plugins``: all, none or names).

    ``current_commands`` (the current policy's map; the actuator process passes it so
    the map follows policy reloads) overrides ``commands`` for the command actuator;
    plug-ins get the map as it is now.
    """
    now = current_commands() if current_commands is not None else commands
    ctx = ActuatorContext(commands=dict(now or {}), webhook_url=webhook_url,
                          simulator_url=simulator_url, notify_url=notify_url, retries=retries,
                          timeout_s=timeout_s)
    acts: list[Actuator] = [
        LogActuator(),
        WebhookActuator(default_url=webhook_url, retries=retries, timeout_s=timeout_s),
        NotifyActuator(default_url=notify_url, retries=retries, timeout_s=timeout_s),
        SimulatorActuator(default_url=simulator_url, retries=retries, timeout_s=timeout_s),
        CommandActuator(current_commands or ctx.commands, timeout_s=timeout_s),
    ]
    return {**load_plugins(ctx, plugins), **{a.name: a for a in acts}}
