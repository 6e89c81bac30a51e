"""The actuator protocol: one object per action type.

An actuator executes one :class:`~schemas.models.Action` for one decision and
returns a short human-readable detail, or raises :class:`ActionFailed`.
Timeouts, idempotency, locking and the outcome record are the executor's job,
so an actuator stays a few lines long::

    class Echo:
        name = "echo"

        async def execute(self, action, decision):
            return f"echo {action.target}"

A compensating action (run after a failed verification) goes to the
actuator's optional ``compensate(action, decision)`` method, with the
compensating ``action`` and the ``decision`` whose own action it undoes, so
the receiver can tell the two apart; an actuator without one gets
``execute(action, decision)`` with ``decision.action`` set to the
compensating action.
"""

from __future__ import annotations

from typing import Protocol

from ia.schemas.actions import ParamSpec
from ia.schemas.models import Action, Decision

__all__ = ["ActionFailed", "Actuator", "ParamSpec"]


class ActionFailed(Exception):
    """The action ran and did not succeed; ``attempts`` says how many tries it took."""

    def __init__(self, message: str, attempts: int = 1) -> None:
        super().__init__(message)
        self.attempts = attempts


class Actuator(Protocol):
    name: str

    async def execute(self, action: Action, decision: Decision) -> str: ...
