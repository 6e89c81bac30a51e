"""Builds the set of actuators an ``ia actuate`` process offers."""

from __future__ import annotations

from actuators.base import Actuator
from actuators.builtin import CommandActuator, LogActuator, SimulatorActuator, WebhookActuator


def build_actuators(*, commands: dict[str, list[str]] | None = None,
                    webhook_url: str | None = None, simulator_url: str | None = None,
                    retries: int = 3, timeout_s: float = 10.0) -> dict[str, Actuator]:
    acts: list[Actuator] = [
        LogActuator(),
        WebhookActuator(default_url=webhook_url, retries=retries, timeout_s=timeout_s),
        SimulatorActuator(default_url=simulator_url, retries=retries, timeout_s=timeout_s),
        CommandActuator(commands or {}, timeout_s=timeout_s),
    ]
    return {a.name: a for a in acts}
